"""The model of a training checkpoint: `load_trained_model(workdir, step)`, and a CLI writing it in the weights
package's format (model_config.json + params/, LoRA merged) for `tools/export_hf.py` and evaluation.

    python -m coordexp_jax.train.export --workdir runs/demo [--step N] [--ema] --out runs/demo/model_N
    python tools/export_hf.py --checkpoint runs/demo/model_N --out hf_dir

The model is rebuilt from the run's resolved config (`WORKDIR/config.json`), its TrainState restored from
`WORKDIR/checkpoints/<step>` (the latest by default) on one device, and LoRA merged.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from coordexp_jax.cli import ArgumentParser, guard


def run_config(workdir: str) -> ml_collections.ConfigDict:
    """The validated resolved config of a run (lists back to tuples)."""
    from coordexp_jax.train import config as C

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir}: no config.json (not a training workdir)")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise C.ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None

    def tup(x):
        if isinstance(x, list):
            return tuple(tup(v) for v in x)
        if isinstance(x, dict):
            return {k: tup(v) for k, v in x.items()}
        return x

    return C.validate(ml_collections.ConfigDict(tup(raw)))


def load_trained_model(workdir: str, step: int | None = None, use_ema: bool = False):
    """(ModelConfig, nnx.Module with LoRA merged, step) of checkpoint `step` (default: latest) of a run. A run with
    `model.spatial_linking.enabled` gives the model its trained spatial-linking module (saved beside the Qwen3-VL
    parameters by `weights.checkpoint.save_checkpoint`)."""
    from coordexp_jax.model.qwen3vl import Qwen3VL
    from coordexp_jax.model.spatial_linking import maybe_attach
    from coordexp_jax.train import build, checkpoint as ckpt_lib, lora, optim, sharding as shd, state as state_lib

    cfg = run_config(workdir)
    ids = build.token_ids(cfg)
    mc = build.model_config(cfg, ids)
    dtype, pdtype = build._DT[cfg.model.dtype], build._DT[cfg.model.param_dtype]

    def make():  # the structure only (weights come from the checkpoint)
        m = maybe_attach(Qwen3VL(mc, dtype=dtype, param_dtype=pdtype, rngs=nnx.Rngs(0)), cfg)
        if cfg.lora.enabled:
            exclude = None if cfg.lora.include_vision else r"(^|/)(vision|visual)\w*(/|$)"
            lora.apply_lora(m, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, nnx.Rngs(1), exclude=exclude)
        return nnx.split(m, optim.trainable_filter(cfg), ...)

    graphdef, params_abs, frozen_abs = nnx.eval_shape(make)
    tx, _ = optim.make_optimizer(cfg, params_abs, cfg.train.steps, mc.padded_vocab_size, ids.coord_start)

    def init():
        _, p, f = make()
        return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p, frozen=f, opt_state=tx.init(p),
                                    rng=jax.random.PRNGKey(0),
                                    ema=jax.tree.map(lambda x: x.astype(jnp.float32), p) if cfg.train.ema_decay > 0 else None,
                                    skipped=jnp.zeros((), jnp.int32))

    abstract = jax.eval_shape(init)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    shardings = state_lib.state_shardings(abstract, tx, mesh, cfg.mesh.rules)
    names = [optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract.params)[0]]
    ck = ckpt_lib.Checkpointer(workdir, ckpt_lib.fingerprint(cfg, mc.padded_vocab_size, names), async_save=False)
    try:
        restored = ck.restore(state_lib.abstract_state(abstract, shardings), None, step)
    finally:
        ck.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir}: no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    st, step = restored
    params = st.ema if (use_ema and st.ema is not None) else st.params
    params = jax.tree.map(lambda e, p: e.astype(p.dtype), params, st.params)
    model = nnx.merge(graphdef, params, st.frozen)
    lora.merge_lora(model)
    return mc, model, step


@guard
def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m coordexp_jax.train.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a training workdir (config.json + checkpoints/)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--ema", action="store_true", help="export the EMA weights (runs with train.ema_decay > 0)")
    ap.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    args = ap.parse_args(argv)
    from coordexp_jax.weights.checkpoint import save_checkpoint
    from coordexp_jax.weights.cli import atomic_dir

    if not os.path.isdir(args.workdir):
        raise FileNotFoundError(f"--workdir {args.workdir}: not a directory")
    with atomic_dir(args.out) as tmp:  # --out must not exist or be empty; nothing is left there on a failure
        mc, model, step = load_trained_model(args.workdir, args.step, args.ema)
        save_checkpoint(tmp, model, mc)
    print(f"step {step} of {args.workdir} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
