"""Run in a subprocess with 8 simulated CPU devices: the stand-in train step on a (data=2, fsdp=2, tensor=2) mesh
against the same step on a 1-device mesh. Prints one JSON line with the largest differences."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
import numpy as np  # noqa: E402

from coordexp_jax.train import config as C, sharding as shd  # noqa: E402
from standin import build, make_batch  # noqa: E402


def run(sizes, devices, accum):
    cfg = C.base_config()
    cfg.optim.lr = 1e-2
    cfg.optim.eps = 1.0  # smooth update (see test_step)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = sizes
    cfg.train.ema_decay = 0.5
    cfg = C.validate(cfg)
    mesh = shd.make_mesh(cfg.mesh, devices)
    _, st, sh, fn, _ = build(cfg, mesh=mesh)
    losses = []
    for i in range(3):
        b = make_batch(10 + i, 8, micro=accum)
        st, m = fn(st, shd.put_batch(b, shd.batch_shardings(b, mesh)))
        losses.append(float(m["loss"]))
    specs = {jax.tree_util.keystr(p): str(s.spec) for p, s in jax.tree_util.tree_flatten_with_path(sh.params)[0]}
    return losses, jax.tree.map(np.asarray, (st.params, st.opt_state, st.ema)), specs


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.device_count()
    out = {}
    for accum in (1, 2):
        l1, p1, _ = run((1, 1, 1), jax.devices()[:1], accum)
        l8, p8, specs = run((2, 2, 2), jax.devices(), accum)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
        out[f"accum{accum}"] = {"loss1": l1, "loss8": l8, "max_state_diff": diff}
    out["specs"] = specs
    print("RESULT " + json.dumps(out))
