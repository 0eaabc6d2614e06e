"""One process of a jax.distributed run on localhost (or a single-process reference): trains the stand-in for a few
steps through `loop.train` and prints the per-step losses. Usage: _multiproc_check.py WORKDIR (env: COORDEXP_*)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from coordexp_jax.train import sharding as shd  # noqa: E402

shd.maybe_initialize_distributed()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from coordexp_jax.train import config as C, loop  # noqa: E402
from standin import ListIterator, components  # noqa: E402


class ShardIterator(ListIterator):
    """This process's rows of the global batch (what the Grain pipeline's per-host shard gives)."""

    def __next__(self):
        b = super().__next__()
        n, i = jax.process_count(), jax.process_index()
        rows = self.batch // n
        return {k: v[i * rows:(i + 1) * rows] for k, v in b.items()}


if __name__ == "__main__":
    workdir = sys.argv[1]
    cfg = C.base_config()
    cfg.optim.lr = 1e-2
    cfg.optim.eps = 1.0
    cfg.train.steps = 4
    cfg.train.log_every = 1
    cfg.train.ckpt_every = 2
    cfg.train.progress = False
    cfg.train.tensorboard = False
    cfg.eval.at_end = False
    cfg.mesh.data = -1
    comps = components()
    comps.data_iter = ShardIterator(batch=4)
    res = loop.train(cfg, workdir, components=comps)
    if jax.process_index() == 0:
        recs = loop.read_metrics(workdir)
        print("RESULT " + json.dumps({"devices": jax.device_count(), "processes": jax.process_count(),
                                      "losses": [recs[s]["loss"] for s in sorted(recs)]}))
