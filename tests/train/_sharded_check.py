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


def run_real(sizes, devices, data_dir):
    """The real tiny Qwen3-VL with the Stage-1 objective (all terms) on synthetic batches, 2 micro-batches."""
    from coordexp_jax.train import build as B, optim, state as S, step as ST

    cfg = C.base_config()
    cfg.data.path = data_dir
    cfg.data.num_train, cfg.data.num_eval, cfg.data.batch_size, cfg.data.max_objects = 16, 1, 8, 3
    cfg.data.seq_len = 256
    for t in ("coord_ce", "soft_ce", "w1", "gate", "text_gate", "l1", "giou"):
        cfg.loss[t] = 0.5
    cfg.optim.lr, cfg.optim.eps = 1e-2, 1.0
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = sizes
    cfg = C.validate(cfg)
    comps = B.build_components(cfg)
    mesh = shd.make_mesh(cfg.mesh, devices)
    box = {}

    def make_tx(p):
        tx, box["s"] = optim.make_optimizer(cfg, p, 10, comps.vocab_size, comps.coord_start)
        return tx

    g, st, sh, tx = S.create_state(comps.make_model, optim.trainable_filter(cfg), make_tx, mesh, cfg.mesh.rules, 0)
    fn = ST.jit_train_step(ST.make_train_step(g, comps.objective, tx, box["s"]), sh, mesh)
    losses = []
    for _ in range(2):
        micro = [next(comps.data_iter) for _ in range(2)]
        b = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
        st, m = fn(st, shd.put_batch(b, shd.batch_shardings(b, mesh)))
        losses.append({k: float(v) for k, v in m.items()})
    specs = {jax.tree_util.keystr(p): str(s.spec) for p, s in jax.tree_util.tree_flatten_with_path(sh.params)[0]}
    return losses, jax.tree.map(np.asarray, (st.params, st.opt_state)), specs


def state_diff(t1, t8):
    """Largest |a - b| over the leaves of two states, each as a fraction of that leaf's largest |a|: parameters are
    ~0.5 but Adam's moments ~1e-3..1e-8, so one absolute bound would be loose for some leaves and tight for others.
    A leaf that is 0 in one run and not in the other gives inf."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(t1), jax.tree.leaves(t8)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.size == 0:
            continue
        d, scale = float(np.max(np.abs(a - b))), float(np.max(np.abs(a)))
        worst = max(worst, d / scale if scale > 0 else (0.0 if d == 0 else float("inf")))
    return worst


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.device_count()
    out = {}
    if len(sys.argv) > 1:  # the real model
        l1, p1, _ = run_real((1, 1, 1), jax.devices()[:1], sys.argv[1])
        l8, p8, specs = run_real((2, 2, 2), jax.devices(), sys.argv[1])
        print("RESULT " + json.dumps({"loss1": l1, "loss8": l8, "state_rel_diff": state_diff(p1, p8), "specs": specs}))
        sys.exit(0)
    for accum in (2,):
        l1, p1, _ = run((1, 1, 1), jax.devices()[:1], accum)
        l8, p8, specs = run((2, 2, 2), jax.devices(), accum)
        out[f"accum{accum}"] = {"loss1": l1, "loss8": l8, "state_rel_diff": state_diff(p1, p8)}
    out["specs"] = specs
    print("RESULT " + json.dumps(out))
