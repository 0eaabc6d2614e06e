"""The pure train step on the stand-in model: gradient accumulation by summed counts, parameter groups and
freezing, coordinate rows, LoRA merge, NaN handling, EMA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coordexp_jax.train import config as C, lora as L, optim, sharding as shd

from standin import COORD_START, VOCAB, Objective, StandIn, build, make_batch


def _cfg(**kw):
    cfg = C.base_config()
    cfg.optim.lr = 1e-2
    cfg.optim.schedule = "constant"
    for k, v in kw.items():
        node = cfg
        *head, leaf = k.split(".")
        for h in head:
            node = node[h]
        node[leaf] = v
    return C.validate(cfg)


def _flat(state):
    from coordexp_jax.train.optim import path_str

    return {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def _put(b, mesh):
    return shd.put_batch(b, shd.batch_shardings(b, mesh))


def _ulp(before, *deltas):
    """float32 spacing at the largest stored value among `before` and every `before + delta`. A delta read back
    as float32(p + step) - p carries the rounding of p + step (<= ulp/2 of the larger of |p|, |p + step|) however
    small the step is, so two deltas that should be proportional can differ by ~0.6 ulp of the parameter
    (ISA-independent: it is the storage rounding, not the arithmetic)."""
    mag = max([float(np.abs(before).max())] + [float(np.abs(before + d).max()) for d in deltas])
    return float(np.spacing(np.float32(mag)))


def test_grad_accum_equals_big_batch_with_uneven_counts():
    # a large Adam eps makes the update a smooth function of the gradient (first-step Adam is ~sign(g), which
    # turns float32 round-off in near-zero gradients into full-size differences)
    cfg = _cfg(**{"optim.eps": 1.0})
    big = make_batch(3, 4, micro=1)
    acc = make_batch(3, 4, micro=2)
    # the micro-batches really differ in token and box counts (else dividing per micro-batch would also pass)
    assert acc["loss_mask"][0].sum() != acc["loss_mask"][1].sum()
    _, s1, _, f1, mesh = build(cfg)
    _, s2, _, f2, _ = build(cfg)
    p0 = {k: np.array(v) for k, v in _flat(s1.params).items()}  # a copy: the step donates s1
    s1, m1 = f1(s1, _put(big, mesh))
    s2, m2 = f2(s2, _put(acc, mesh))
    # sums of 2 micro-batches vs one sum: float32 reassociation, ~1e-7 relative (seen: 2e-7 / 7e-8)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
    a, b = _flat(s1.params), _flat(s2.params)
    for k in a:
        # the step lr * g / (|g| + 1) inherits the gradient's reassociation error (~1e-6 of the largest step;
        # 1e-5 here), plus the storage rounding of p + step in each run (<= ulp/2 each: 2 ulps here)
        step = np.abs(a[k] - p0[k]).max()
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5 * step + 2 * _ulp(p0[k], a[k] - p0[k]), err_msg=k)
    # independent reference of the loss: per-term means over the whole batch, by numpy from the same model
    model = StandIn(0)
    logits = np.asarray(model(jnp.asarray(big["input_ids"][0]), jnp.asarray(big["feat"][0])), np.float64)
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(lp, big["targets"][0][..., None], -1)[..., 0]
    ce = (nll * big["loss_mask"][0]).sum() / big["loss_mask"][0].sum()
    pred = 1 / (1 + np.exp(-logits[:, 1, :4]))
    box = (((pred - big["box"][0]) ** 2).sum(-1) * big["box_valid"][0]).sum() / big["box_valid"][0].sum()
    # float32 forward (matmuls, log-softmax over 1088 ids) vs float64 numpy on the same float32 logits: ~1e-6 rel
    np.testing.assert_allclose(float(m1["loss"]), ce + 0.5 * box, rtol=1e-5)


@functools.lru_cache(maxsize=None)
def _delta_cached(overrides: tuple):
    """One step from the same init under `_cfg(**overrides)`: (param deltas, params before, frozen before/after).
    Cached: each distinct config compiles once for the module."""
    cfg = _cfg(**dict(overrides))
    _, s0, _, fn, mesh = build(cfg)
    before = _flat(jax.tree.map(np.asarray, s0.params))
    frozen_before = _flat(jax.tree.map(np.asarray, s0.frozen))
    s1, _ = fn(s0, _put(make_batch(0, 4), mesh))
    after = _flat(s1.params)
    return {k: after[k] - before[k] for k in after}, before, frozen_before, _flat(s1.frozen)


def _delta(**overrides):
    return _delta_cached(tuple(sorted(overrides.items())))


def test_groups_scale_and_freeze():
    # Both runs compute the same gradients (the lr multipliers only scale the Adam update), so the deltas differ
    # by the update arithmetic (a few float32 ops: rtol 1e-5 of each element's step) and by the storage rounding
    # of p + step (atol: one ulp of the largest parameter, see _ulp). Seen: <= 0.5 ulp, on AVX2 and AVX-512.
    base, before, *_ = _delta()
    half, *_ = _delta(**{"optim.merger.lr_mult": 0.5, "optim.vision.lr_mult": 0.0})
    for k in base:
        if k.startswith("merger"):
            np.testing.assert_allclose(half[k], 0.5 * base[k], rtol=1e-5, atol=_ulp(before[k], base[k], half[k]),
                                       err_msg=k)
            assert np.abs(base[k]).max() > 0
        elif k.startswith("visual"):
            assert np.all(half[k] == 0), k
        elif not k.startswith("lm_head") and not k.startswith("embed"):
            np.testing.assert_allclose(half[k], base[k], rtol=1e-5, atol=_ulp(before[k], base[k], half[k]),
                                       err_msg=k)
    # a frozen group is not trainable at all: no gradient, no optimizer state, unchanged
    d, _, fb, fa = _delta(**{"optim.vision.freeze": True})
    assert not any(k.startswith("visual") for k in d)
    assert any(k.startswith("visual") for k in fb)
    for k in fb:
        np.testing.assert_array_equal(fb[k], fa[k])


def test_coord_rows_own_lr_and_trainable_when_lm_frozen():
    base, before, *_ = _delta()
    rows = np.zeros(VOCAB, bool)
    rows[COORD_START:COORD_START + 1000] = True
    d, *_ = _delta(**{"optim.coord_rows.lr_mult": 0.25})
    # Same gradients in both runs (the multiplier only scales the update): the deltas differ by the update
    # arithmetic (rtol 1e-5 of each element's step) and by the storage rounding of p + step, up to ~0.6 ulp of the
    # parameter whatever the step's size (atol: one ulp of the largest parameter, see _ulp; ~2e-5 of the step). A
    # fixed atol of 1e-9 failed on a 2-core EPYC (AVX2): an element with step -9.5e-5 and |p| = 0.2 was 3.7e-9 off.
    emb, head = "embed_tokens/embedding", "lm_head/kernel"
    tol_emb, tol_head = _ulp(before[emb], base[emb], d[emb]), _ulp(before[head], base[head], d[head])
    np.testing.assert_allclose(d[emb][rows], 0.25 * base[emb][rows], rtol=1e-5, atol=tol_emb)
    np.testing.assert_allclose(d[emb][~rows], base[emb][~rows], rtol=1e-5, atol=tol_emb)
    np.testing.assert_allclose(d[head][:, rows], 0.25 * base[head][:, rows], rtol=1e-5, atol=tol_head)
    # 'lm' frozen: only the coordinate rows of the embedding / lm_head move
    d, *_ = _delta(**{"optim.lm.freeze": True})
    assert set(d) == {"embed_tokens/embedding", "lm_head/kernel", "visual/proj/kernel", "visual/proj/bias",
                      "merger/fc/kernel", "merger/fc/bias"}
    assert np.all(d["embed_tokens/embedding"][~rows] == 0) and np.all(d["lm_head/kernel"][:, ~rows] == 0)
    used = np.unique(make_batch(0, 4)["targets"])
    used = used[(used >= COORD_START) & (used < COORD_START + 1000)]
    assert np.abs(d["lm_head/kernel"][:, used]).max() > 0


def test_lora_trains_adapters_and_coord_rows_only_then_merges_exactly():
    cfg = _cfg(**{"lora.enabled": True, "lora.rank": 4, "lora.targets": ("q_proj", "v_proj", "up_proj")})
    g, s0, _, fn, mesh = build(cfg)
    names = set(_flat(s0.params))
    assert names == {f"layers/{i}/{p}/{ab}" for i in range(2) for p in ("q_proj", "v_proj", "up_proj")
                     for ab in ("lora_a", "lora_b")} | {"embed_tokens/embedding", "lm_head/kernel"}
    frozen0 = _flat(jax.tree.map(np.asarray, s0.frozen))
    for _ in range(3):
        s0, _ = fn(s0, _put(make_batch(1, 4), mesh))
    assert np.abs(_flat(s0.params)["layers/0/q_proj/lora_b"]).max() > 0  # adapters moved (B starts at zero)
    for k, v in _flat(s0.frozen).items():
        np.testing.assert_array_equal(v, frozen0[k], err_msg=k)
    model = nnx.merge(g, s0.params, s0.frozen)
    b = make_batch(5, 3)
    ids, feat = jnp.asarray(b["input_ids"][0]), jnp.asarray(b["feat"][0])
    adapted = np.asarray(model(ids, feat))
    assert L.merge_lora(model) == 6
    assert not any(isinstance(m, L.ScaledLoRA) for _, m in nnx.iter_graph(model))
    assert isinstance(model.layers[0].q_proj, nnx.Linear)
    # merging reassociates x @ W + (x @ A) @ B into x @ (W + A @ B): float32 rounding of the logits' size
    np.testing.assert_allclose(np.asarray(model(ids, feat)), adapted, rtol=1e-5, atol=1e-5 * np.abs(adapted).max())


def test_lora_unknown_target_is_an_error():
    with pytest.raises(ValueError, match="no linear layer"):
        L.apply_lora(StandIn(0), ("qkv",), 4, 8.0, nnx.Rngs(0))


def test_nonfinite_batch_is_skipped_and_counted_and_ema():
    cfg = _cfg(**{"train.ema_decay": 0.9})
    _, s, _, fn, mesh = build(cfg)
    p0 = _flat(jax.tree.map(np.asarray, s.params))
    s, _ = fn(s, _put(make_batch(0, 4), mesh))
    p1, e1 = _flat(s.params), _flat(s.ema)
    for k in p0:  # EMA of the parameters, starting from the initial ones
        # elementwise float32 (2 mults, 1 add): a few ulps of the parameter
        np.testing.assert_allclose(e1[k], 0.9 * p0[k] + 0.1 * p1[k], rtol=1e-5, atol=4 * _ulp(p0[k], p1[k] - p0[k]))
    before = jax.tree.map(np.asarray, (s.params, s.opt_state, s.ema))
    bad = make_batch(1, 4)
    bad["feat"][0, 1, 0] = np.nan
    s, m = fn(s, _put(bad, mesh))
    assert int(m["nonfinite"]) == 1 and int(s.skipped) == 1 and int(s.step) == 2
    after = jax.tree.map(np.asarray, (s.params, s.opt_state, s.ema))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    s, m = fn(s, _put(make_batch(2, 4), mesh))
    assert int(m["nonfinite"]) == 0 and np.isfinite(float(m["loss"]))


def test_nan_guard_does_not_copy_the_optimizer_state():
    # The NaN guard must not keep the old and the new optimizer state both alive: a tree-wide where(finite, new,
    # old) made XLA copy every moment buffer on every step (~0.8 GB/step at 100M parameters). The donated state is
    # updated in place only if no `copy` reads an optimizer-state argument.
    cfg = _cfg(**{"train.ema_decay": 0.9})
    _, s, _, fn, mesh = build(cfg)
    hlo = fn.lower(s, _put(make_batch(0, 4), mesh)).compile().as_text()
    copies = [ln for ln in hlo.splitlines() if " copy(%state_opt_state" in ln or " copy(%state_ema" in ln]
    assert hlo.count("opt_state") > 0 and not copies, copies[:3]


def test_schedule_warmup_cosine():
    cfg = _cfg(**{"optim.schedule": "cosine", "optim.warmup_steps": 10, "optim.min_lr_ratio": 0.1})
    s = optim.schedule(cfg, 110)
    lr = cfg.optim.lr
    # scalar float32 schedule arithmetic (a cosine): ~1e-7 relative; atol only for the exact 0 at step 0
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)],
                               [0, lr / 2, lr, lr * (0.1 + 0.9 * 0.5), lr * 0.1], rtol=1e-5, atol=1e-6 * lr)
