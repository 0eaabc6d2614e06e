"""The Stage-1 objective on the real tiny Qwen3-VL against an independent numpy computation from the materialised
logits; chunked statistics equal full ones; parameter groups and LoRA on the real model's layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coordexp_jax.train import build as B, config as C, lora as L, optim
from coordexp_jax.train.objective import Stage1Objective, TERMS, vision_inputs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = C.base_config()
    cfg.data.path = str(tmp_path_factory.mktemp("syn"))
    cfg.data.num_train, cfg.data.num_eval, cfg.data.batch_size, cfg.data.max_objects = 8, 1, 3, 3
    for t in TERMS:
        cfg.loss[t] = 1.0
    cfg.loss.tau, cfg.loss.sigma, cfg.loss.truncate = 0.7, 1.5, 4
    cfg = C.validate(cfg)
    comps = B.build_components(cfg)
    model = comps.make_model()
    batch = {k: jnp.asarray(v) for k, v in next(comps.data_iter).items()}
    return cfg, comps, model, batch


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _logits_masks_nll(model, batch, V):
    """float64 logits `[B, S, V]`, targets, loss mask, coordinate-target mask and the full-vocabulary token NLL."""
    h = model(batch["input_ids"], batch["positions"], batch["attention_mask"], vision_inputs(batch))
    z = np.asarray(model.lm_logits(h), np.float64)[..., :V]
    t = np.asarray(batch["targets"])
    lm = np.asarray(batch["loss_mask"], np.float64)
    cm = np.asarray(batch["coord_mask"], np.float64) * (lm > 0)
    nll = -np.take_along_axis(_log_softmax(z), np.clip(t, 0, V - 1)[..., None], -1)[..., 0]
    return z, t, lm, cm, nll


def _reference(model, batch, ids, V, tau, sigma, trunc):
    """Every term as sums and counts, in float64 numpy from the full logits."""
    z, t, lm, cm, nll = _logits_masks_nll(model, batch, V)
    tm = lm * (1 - cm)
    cs = ids.coord_start
    lse = lambda x: np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)  # noqa: E731
    zt = z / tau
    s = z[..., cs:cs + 1000]
    lse_c = lse(s / tau)
    text = np.concatenate([zt[..., :cs], zt[..., cs + 1000:]], -1)
    out = {"ce": (nll * tm).sum(), "gate": (np.maximum(lse(zt) - lse_c, 0) * cm).sum(),
           "text_gate": (np.maximum(lse(zt) - lse(text), 0) * tm).sum()}
    k = np.clip(t - cs, 0, 999)
    out["coord_ce"] = (-np.take_along_axis(_log_softmax(s), k[..., None], -1)[..., 0] * cm).sum()
    i = np.arange(1000)
    w = np.exp(-0.5 * ((i - k[..., None]) / sigma) ** 2) * (np.abs(i - k[..., None]) <= trunc)
    q = w / w.sum(-1, keepdims=True)
    lps = _log_softmax(s / tau)
    out["soft_ce"] = (-(q * lps).sum(-1) * cm).sum()
    p = np.exp(lps)
    out["w1"] = (np.abs(np.cumsum(p, -1) - np.cumsum(q, -1)).sum(-1) / 999 * cm).sum()
    bp = np.asarray(batch["box_pos"])
    pb = np.stack([np.exp(lps[b][bp[b]]) @ (i / 999) for b in range(len(bp))])  # [B, M, 4]
    tb = np.asarray(batch["box_target"], np.float64)
    valid = np.asarray(batch["box_valid"], np.float64)
    out["l1"] = (np.abs(pb - tb).sum(-1) * valid).sum()
    d = np.abs(pb - tb)
    out["smooth_l1"] = (np.where(d < 1, 0.5 * d**2, d - 0.5).sum(-1) * valid).sum()

    def canon(b):
        b = np.clip(b, 0, 1)
        return np.stack([np.minimum(b[..., 0], b[..., 2]), np.minimum(b[..., 1], b[..., 3]),
                         np.maximum(b[..., 0], b[..., 2]), np.maximum(b[..., 1], b[..., 3])], -1)

    a, g = canon(pb), canon(tb)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    iw = np.clip(np.minimum(a[..., 2], g[..., 2]) - np.maximum(a[..., 0], g[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], g[..., 3]) - np.maximum(a[..., 1], g[..., 1]), 0, None)
    inter = iw * ih
    union = area(a) + area(g) - inter
    cw = np.maximum(a[..., 2], g[..., 2]) - np.minimum(a[..., 0], g[..., 0])
    ch = np.maximum(a[..., 3], g[..., 3]) - np.minimum(a[..., 1], g[..., 1])
    giou = inter / union - (cw * ch - union) / (cw * ch)
    out["giou"] = ((1 - giou) * valid).sum()
    counts = {"text": tm.sum(), "coord": cm.sum(), "box": valid.sum()}
    return out, counts


def test_objective_matches_numpy_reference(setup):
    cfg, comps, model, batch = setup
    obj = comps.objective
    assert set(obj.weights) == set(TERMS)
    got = jax.jit(lambda b: obj.sums(model, b))(batch)
    counts = obj.counts(batch)
    ref, n = _reference(model, batch, comps.token_ids, comps.model_config.vocab_size, 0.7, 1.5, 4)
    assert n["coord"] > 0 and n["box"] > 0 and n["text"] > 0
    assert n["coord"] == 4 * n["box"]  # every valid box has its 4 coordinate targets
    # Sums of non-negative per-position terms, float32 vs float64 from the same logits: rtol 2e-4 (W1's float32
    # cumsums over 1000 bins are the least accurate; seen <= 3e-7 relative). A term of order 10 (a log-sum-exp)
    # that nearly cancels to 0 (gate) keeps ~1e-6 absolute error per position: atol 1e-6 per counted position.
    atol = 1e-6 * sum(float(v) for v in n.values())
    for t in TERMS:
        if t == "ciou":
            continue  # no independent CIoU reference here (coord/boxes tests cover it)
        np.testing.assert_allclose(float(got[t]), ref[t], rtol=2e-4, atol=atol, err_msg=t)
    kind = {"ce": "text", "text_gate": "text", "l1": "box", "giou": "box", "smooth_l1": "box", "ciou": "box"}
    for t in TERMS:
        assert float(counts[t]) == n[kind.get(t, "coord")], t


def test_chunked_stats_equal_full(setup):
    cfg, comps, model, batch = setup
    full = comps.objective
    import dataclasses

    chunked = dataclasses.replace(full, ce_chunk=64)
    a = jax.jit(lambda b: full.sums(model, b))(batch)
    b = jax.jit(lambda b: chunked.sums(model, b))(batch)
    for t in ("ce", "gate", "text_gate"):  # the same float32 sums in chunks: ~1e-7 relative (equal here)
        np.testing.assert_allclose(float(b[t]), float(a[t]), rtol=1e-5, err_msg=t)


def test_real_model_groups_and_lora_merge(setup):
    cfg, comps, model, batch = setup
    state = nnx.state(model, nnx.Param)
    groups = {}
    for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = optim.path_str(p)
        groups.setdefault(optim.param_group(name, cfg.optim.group_patterns), []).append(name)
    assert all(n.startswith("visual/merger") or n.startswith("visual/deepstack_merger") for n in groups["merger"])
    assert groups["vision"] and all(n.startswith("visual/") and "merger" not in n for n in groups["vision"])
    assert all(n.startswith(("language_model/", "lm_head/")) for n in groups["lm"])
    # LoRA on the model's own Dense layers: adapted forward == forward after merging
    m = comps.make_model()
    n = L.apply_lora(m, ("q_proj", "v_proj", "down_proj"), 4, 8.0, nnx.Rngs(3))
    assert n == 3 * comps.model_config.text.num_hidden_layers
    for _, mod in nnx.iter_graph(m):
        if isinstance(mod, L.ScaledLoRA):  # non-zero B so the adapters change the output
            mod.lora_b[...] = 0.05 * jax.random.normal(jax.random.PRNGKey(1), mod.lora_b[...].shape)
    args = (batch["input_ids"], batch["positions"], batch["attention_mask"], vision_inputs(batch))
    base = np.asarray(comps.make_model().lm_logits(comps.make_model()(*args)))
    adapted = np.asarray(m.lm_logits(m(*args)))
    V = comps.model_config.vocab_size
    scale = np.abs(adapted[..., :V]).max()  # the padded ids hold float32's lowest value, equal in both
    assert np.abs(adapted - base).max() > 1e-3 * scale
    L.merge_lora(m)
    # merging reassociates x @ W + (x @ A) @ B as x @ (W + A @ B): float32 rounding, ~1e-6 of the largest logit
    # through the layers (seen 3e-7 absolute); 2e-4 of it, well below the adapters' effect checked above
    np.testing.assert_allclose(np.asarray(m.lm_logits(m(*args))), adapted, atol=2e-4 * scale, rtol=1e-4)
    # the adapters carry the kernel's logical axis names, so the mesh rules shard them with their layer
    m2 = comps.make_model()
    L.apply_lora(m2, ("q_proj",), 4, 8.0, nnx.Rngs(3))
    specs = nnx.get_partition_spec(nnx.state(m2, nnx.LoRAParam))
    leaves = [s for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))]
    assert jax.sharding.PartitionSpec("embed", "lora_rank") in leaves
    assert jax.sharding.PartitionSpec("lora_rank", "q_heads") in leaves


def test_gathered_coordinate_positions_equal_all_positions(setup):
    """coord_positions = K (logits only at the first K coordinate targets of each row) gives the same sums and
    counts as scoring every position when K covers every row; with a smaller K the counts are min(row, K)."""
    import dataclasses

    cfg, comps, model, batch = setup
    full = comps.objective
    most = int(np.asarray(batch["coord_mask"]).sum(-1).max())
    gathered = dataclasses.replace(full, coord_positions=most)
    a, b = full.sums(model, batch), gathered.sums(model, batch)
    for t in ("coord_ce", "soft_ce", "w1", "l1", "giou", "gate", "ce"):  # other float32 order: seen 1.7e-7 rel
        np.testing.assert_allclose(float(b[t]), float(a[t]), rtol=1e-5, err_msg=t)
    assert {k: float(v) for k, v in gathered.counts(batch).items()} == {k: float(v) for k, v in full.counts(batch).items()}
    small = dataclasses.replace(full, coord_positions=2)
    want = float(np.minimum(np.asarray(batch["coord_mask"]).sum(-1), 2).sum())
    assert float(small.counts(batch)["soft_ce"]) == want and float(small.counts(batch)["gate"]) == float(
        full.counts(batch)["gate"])


def test_plain_sft_is_ce_plus_coord_ce_plus_gate(setup):
    """The spec's `ce` masks coordinate targets out; at tau 1, ce + coord_ce + gate (each over its own count) is
    exactly the plain full-vocabulary token CE of ordinary SFT: -log p(k) = -log p_coord(k) - log(coord mass). The
    ablation's 'plain SFT' arm (docs/training.md) relies on this."""
    cfg, comps, model, batch = setup
    obj = Stage1Objective(weights={"ce": 1.0, "coord_ce": 1.0, "gate": 1.0}, coord_start=comps.coord_start,
                          vocab_size=comps.model_config.vocab_size, tau=1.0)
    sums = obj.sums(model, batch)
    counts = obj.counts(batch)
    assert float(counts["coord_ce"]) == float(counts["gate"]) > 0  # every coordinate target counted once by both
    _, _, lm, cm, nll = _logits_masks_nll(model, batch, comps.model_config.vocab_size)
    # float32 objective vs float64 numpy on the same logits, sums of positive terms: relative (seen 1e-7)
    np.testing.assert_allclose(float(sums["ce"]), (nll * lm * (1 - cm)).sum(), rtol=1e-4)
    np.testing.assert_allclose(float(sums["coord_ce"] + sums["gate"]), (nll * cm).sum(), rtol=1e-4)
