"""Stage-1 losses of CoordExp (`../shared/reference/coordexp_method.md` §5). Pure, jittable and vmappable.

Every loss returns `(sum, count)` as scalars so that callers divide only after summing both across devices and
accumulation steps (`loss = sum / max(count, 1)`, `normalise`). Inputs may be any float dtype; the math runs in
float32 (bf16/f16 inputs are upcast; float64 inputs under x64 stay float64, which the gradient tests use).
Masks may be bool or float (weights).

Conventions follow the training-batch contract of `docs/architecture.md`: the logits at position t are scored
against `targets[:, t]`; `loss_mask [B,S]` marks supervised targets, `coord_mask [B,S]` the coordinate-bin targets
(a subset). Coordinate losses take coordinate logits `s [..., 1000]` (dense `[B,S,1000]` or gathered
`[B,M,4,1000]`) with `target_bins` of the same leading shape (`targets - coord_start`; masked entries may hold
anything, they are clipped). Geometry losses take expectation boxes `[..., 4]` (see
`expectation.expectation_boxes`) with targets `[..., 4]` and a validity mask `[...]`.

Full-vocabulary terms (`ce`, `gate`, `text_gate`) come in two forms: from materialised logits (tests, tiny
models), and from `chunked_vocab_stats(hidden, embedding, ...)`, which scans over sequence chunks with remat so
that `[B, S, V]` logits never exist at once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from coordexp_jax.coord import boxes as box_ops
from coordexp_jax.coord.codec import MAX_BIN, NUM_BINS
from coordexp_jax.coord.expectation import coord_logits

F32 = jnp.float32


def _up(x):
    """At least float32 (bf16/f16 -> f32; f64 stays f64 so that x64 finite-difference checks are exact)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, F32))


def _mask(m):
    return jnp.asarray(m).astype(F32)


def _masked_sum(values, mask):
    m = _mask(mask)
    m = jnp.broadcast_to(m, values.shape)
    return jnp.sum(jnp.where(m != 0, values * m, 0.0)), jnp.sum(m)


# ----------------------------------------------------------------------------------------------- vocabulary terms
def _stats_from_logits(z, targets, coord_start: int | None, tau: float, vocab_size: int | None,
                       coord_by_mask: bool = False):
    """Per-position statistics of full logits `z [..., V]` (float32): see `vocab_stats`; without `coord_start`
    only `logp` and `lse_tau`. `coord_by_mask`: the bins' log-sum-exp over the whole vocabulary with the other ids
    masked, instead of over the 1000-column slice (for a vocabulary-sharded z: the slice's gradient is padded back
    to a full-vocabulary `[..., V]` array on every device)."""
    z = _up(z)
    if vocab_size is not None and vocab_size < z.shape[-1]:
        z = jnp.where(jnp.arange(z.shape[-1]) < vocab_size, z, -jnp.inf)  # padded vocabulary rows
    lse = jax.nn.logsumexp(z, axis=-1)
    # The target logit as a masked sum rather than take_along_axis: its gradient is then an elementwise select that
    # fuses with the softmax gradient, where the gather's is a scatter into a fresh [B, S, V] buffer plus a transpose.
    ids = jnp.arange(z.shape[-1], dtype=jnp.int32)
    tgt = jnp.sum(jnp.where(ids == jnp.clip(targets, 0, z.shape[-1] - 1)[..., None].astype(jnp.int32), z, 0.0), -1)
    zt = z / tau
    out = {"logp": tgt - lse, "lse_tau": jax.nn.logsumexp(zt, axis=-1)}
    if coord_start is not None:
        is_coord = (ids >= coord_start) & (ids < coord_start + NUM_BINS)
        coord = jnp.where(is_coord, zt, -jnp.inf) if coord_by_mask else coord_logits(zt, coord_start)
        out["lse_coord_tau"] = jax.nn.logsumexp(coord, axis=-1)
        out["lse_text_tau"] = jax.nn.logsumexp(jnp.where(is_coord, -jnp.inf, zt), axis=-1)
    return out


def vocab_stats(logits, targets, coord_start: int | None, tau: float = 1.0, vocab_size: int | None = None):
    """From full logits `[B, S, V]` and `targets [B, S]`: a dict of `[B, S]` float32 arrays

    - `logp`: log softmax(z)[target] (temperature 1, for CE);
    - `lse_tau`, `lse_coord_tau`, `lse_text_tau`: logsumexp of z/tau over all ids, over the 1000 bins, and over
      all ids except the bins (for `gate` and `text_gate`).
    Ids >= `vocab_size` (vocabulary padding) are excluded.
    """
    return _stats_from_logits(logits, targets, coord_start, tau, vocab_size)


# Mesh axes of the vocabulary-parallel head (the axis names of `train/sharding.py`): the output embedding's rows are
# split over VOCAB_AXES inside the chunked statistics; hidden rows keep ROW_AXES (their data-parallel axis) and are
# gathered over the others chunk by chunk. Axes absent from the mesh or of size 1 are ignored.
VOCAB_AXES = ("fsdp", "tensor")
ROW_AXES = ("data",)
BATCH_AXES = ("data", "fsdp")


def _axes(names, size: dict, dim: int):
    """The longest prefix of `names` (present, size > 1) whose product divides `dim`, as a PartitionSpec entry."""
    axes = [a for a in names if size.get(a, 1) > 1]
    while axes and dim % math.prod(size[a] for a in axes):
        axes.pop()
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def vocab_parallel_specs(rows: int, vocab: int):
    """PartitionSpecs of the vocabulary-parallel head under the mesh being traced, or None without one.

    The mesh comes from `jax.sharding.get_abstract_mesh()` (set by `train.step.jit_train_step` with
    `jax.sharding.use_abstract_mesh`); None when it is empty, has an Explicit axis, or no vocabulary axis > 1
    divides `vocab`. Returns a dict of specs: `weight` `[V, H]` (rows over VOCAB_AXES), `rows` `[B, C, H]` (the
    hidden chunk gathered to ROW_AXES), `own` `[B, C, H]` (the hidden rows' own batch sharding, BATCH_AXES),
    `logits` `[B, C, V]` and `stats` `[B, C]`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
        return None
    size = dict(zip(mesh.axis_names, mesh.axis_sizes))
    v = _axes(VOCAB_AXES, size, vocab)
    if v is None:
        return None
    r = _axes(ROW_AXES, size, rows)
    own = _axes(BATCH_AXES, size, rows)
    return {"weight": P(v, None), "rows": P(r, None, None), "own": P(own, None, None), "logits": P(r, None, v),
            "stats": P(r, None)}


def maybe_constrain(x, spec):
    """`jax.lax.with_sharding_constraint(x, spec)`, or x unchanged for spec None (no mesh)."""
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def chunked_vocab_stats(hidden, embedding, targets, coord_start: int | None, tau: float = 1.0, chunk_size: int = 256,
                        vocab_size: int | None = None, dtype=None):
    """`vocab_stats` from hidden states `[B, S, H]` and the output embedding `[V, H]` without materialising
    `[B, S, V]`: logits are computed chunk by chunk (`chunk_size` positions) inside a `lax.scan` whose body is
    rematerialised in the backward pass. S is padded up to a multiple of the chunk.

    `dtype`: the matmul's operand dtype (the model's compute dtype, e.g. bfloat16; None = as given); hidden and
    embedding are cast inside the chunk, the product accumulates in float32 (`preferred_element_type`), and the
    embedding's gradient accumulates over chunks in the embedding's own dtype (float32 parameters: float32).

    Vocabulary-parallel under a mesh (`vocab_parallel_specs`): the embedding's rows are split over the fsdp/tensor
    axes, each chunk's hidden rows are gathered over them (a `[B, C, H]` chunk, not the weight), logits are
    `[B, C, V / n]` per device and the log-sum-exps reduce across devices. Neither the weight nor its gradient is
    ever whole on a device (Megatron-LM's vocabulary-parallel cross-entropy, Shoeybi et al. 2019, §3).
    """
    b, s, h = hidden.shape
    c = min(chunk_size, s)
    n = -(-s // c)
    pad = n * c - s
    hid = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(targets, ((0, 0), (0, pad)))
    hid = hid.reshape(b, n, c, h).swapaxes(0, 1)  # [n, B, C, H]
    tgt = tgt.reshape(b, n, c).swapaxes(0, 1)  # [n, B, C]
    sp = vocab_parallel_specs(b, embedding.shape[0]) or {}
    emb = maybe_constrain(embedding, sp.get("weight"))  # one reshard [V, H/n] -> [V/n, H] (all-to-all), before the scan

    @jax.checkpoint
    def chunk(hc, tc):
        w = maybe_constrain(emb, sp.get("weight"))  # the weight's cotangent stays row-sharded in the backward scan
        hc = maybe_constrain(maybe_constrain(hc, sp.get("own")), sp.get("rows"))  # gather the chunk (reduce-scatter its grad)
        if dtype is not None:
            hc, w = hc.astype(dtype), w.astype(dtype)
        z = jnp.einsum("bch,vh->bcv", hc, w, preferred_element_type=jnp.promote_types(hc.dtype, F32))
        z = maybe_constrain(z, sp.get("logits"))
        out = _stats_from_logits(z, maybe_constrain(tc, sp.get("stats")), coord_start, tau, vocab_size,
                                 coord_by_mask=bool(sp))
        return {k: maybe_constrain(v, sp.get("stats")) for k, v in out.items()}

    _, out = jax.lax.scan(lambda carry, xs: (carry, chunk(*xs)), None, (hid, tgt))
    return {k: v.swapaxes(0, 1).reshape(b, n * c)[:, :s] for k, v in out.items()}


def ce_from_stats(stats, loss_mask, coord_mask):
    """CE on supervised non-coordinate targets from `vocab_stats` / `chunked_vocab_stats` output."""
    m = _mask(loss_mask) * (1.0 - _mask(coord_mask))
    return _masked_sum(-stats["logp"], m)


def ce(logits, targets, loss_mask, coord_mask, vocab_size: int | None = None):
    """Full-vocabulary CE over supervised targets with the coordinate targets masked out.

    logits `[B, S, V]`, targets `[B, S]`, loss_mask `[B, S]`, coord_mask `[B, S]` -> (sum, count).
    """
    z = _up(logits)
    if vocab_size is not None and vocab_size < z.shape[-1]:
        z = jnp.where(jnp.arange(z.shape[-1]) < vocab_size, z, -jnp.inf)
    logp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1),
                               jnp.clip(targets, 0, z.shape[-1] - 1)[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return ce_from_stats({"logp": logp}, loss_mask, coord_mask)


def ce_chunked(hidden, embedding, targets, loss_mask, coord_mask, chunk_size: int = 256,
               vocab_size: int | None = None, dtype=None):
    """`ce` from hidden states `[B, S, H]` and output embedding `[V, H]` (see `chunked_vocab_stats`)."""
    stats = chunked_vocab_stats(hidden, embedding, targets, None, 1.0, chunk_size, vocab_size, dtype)
    return ce_from_stats(stats, loss_mask, coord_mask)


def gate_from_stats(stats, coord_mask):
    """max(0, lse(z/tau) - lse(s/tau)) = -log(coord mass) at coordinate targets."""
    return _masked_sum(jnp.maximum(stats["lse_tau"] - stats["lse_coord_tau"], 0.0), coord_mask)


def text_gate_from_stats(stats, loss_mask, coord_mask):
    """-log(1 - coord mass) = lse(z/tau) - lse(z_text/tau) at supervised non-coordinate targets."""
    m = _mask(loss_mask) * (1.0 - _mask(coord_mask))
    return _masked_sum(jnp.maximum(stats["lse_tau"] - stats["lse_text_tau"], 0.0), m)


def gate(logits, coord_mask, coord_start: int, tau: float = 1.0, vocab_size: int | None = None):
    """Coordinate-vocabulary gate from full logits `[..., V]`, coord_mask `[...]` -> (sum, count)."""
    z = _up(logits)
    dummy = jnp.zeros(z.shape[:-1], jnp.int32)
    return gate_from_stats(_stats_from_logits(z, dummy, coord_start, tau, vocab_size), coord_mask)


def text_gate(logits, loss_mask, coord_mask, coord_start: int, tau: float = 1.0, vocab_size: int | None = None):
    """Text gate from full logits `[..., V]` -> (sum, count) over supervised non-coordinate targets."""
    z = _up(logits)
    dummy = jnp.zeros(z.shape[:-1], jnp.int32)
    return text_gate_from_stats(_stats_from_logits(z, dummy, coord_start, tau, vocab_size), loss_mask, coord_mask)


# -------------------------------------------------------------------------------------------- distribution terms
def _bins(target_bins):
    return jnp.clip(jnp.asarray(target_bins), 0, MAX_BIN).astype(jnp.int32)


def gaussian_targets(target_bins, sigma: float = 1.0, truncate: float = 8.0):
    """q `[..., 1000]`: w_i = exp(-((i - k)/sigma)^2 / 2), zero where |i - k| > truncate, normalised.

    `sigma == 0` gives the one-hot target.
    """
    k = _bins(target_bins)[..., None].astype(F32)
    i = jnp.arange(NUM_BINS, dtype=F32)
    d = i - k
    if sigma == 0:
        return (d == 0).astype(F32)
    w = jnp.where(jnp.abs(d) <= truncate, jnp.exp(-0.5 * (d / sigma) ** 2), 0.0)
    return w / jnp.sum(w, axis=-1, keepdims=True)


def coord_ce(coord_logits_, target_bins, mask):
    """Hard CE over the 1000 coordinate logits only (temperature 1): s `[..., 1000]`, bins `[...]` -> (sum, count)."""
    logp = jax.nn.log_softmax(_up(coord_logits(coord_logits_)), axis=-1)
    nll = -jnp.take_along_axis(logp, _bins(target_bins)[..., None], axis=-1)[..., 0]
    return _masked_sum(nll, mask)


def soft_ce(coord_logits_, target_bins, mask, tau: float = 1.0, sigma: float = 1.0, truncate: float = 8.0):
    """-sum_i q_i log softmax(s/tau)_i with q the truncated discrete Gaussian (`gaussian_targets`)."""
    logp = jax.nn.log_softmax(_up(coord_logits(coord_logits_)) / tau, axis=-1)
    q = gaussian_targets(target_bins, sigma, truncate)
    return _masked_sum(-jnp.sum(q * logp, axis=-1), mask)


def w1(coord_logits_, target_bins, mask, tau: float = 1.0, sigma: float = 1.0, truncate: float = 8.0):
    """1-D Wasserstein distance sum_i |CDF_p(i) - CDF_q(i)| / 999, p = softmax(s/tau), q = `gaussian_targets`
    (`sigma=0`: one-hot). In units of the normalised coordinate."""
    p = jax.nn.softmax(_up(coord_logits(coord_logits_)) / tau, axis=-1)
    q = gaussian_targets(target_bins, sigma, truncate)
    dist = jnp.sum(jnp.abs(jnp.cumsum(p - q, axis=-1)), axis=-1) / MAX_BIN  # CDF_p - CDF_q in one cumsum
    return _masked_sum(dist, mask)


# --------------------------------------------------------------------------------------------------- geometry
def l1(pred, target, valid):
    """sum over the 4 coordinates of |pred - target| per box; `[..., 4], [..., 4], [...]` -> (sum, box count)."""
    d = jnp.sum(jnp.abs(_up(pred) - _up(target)), axis=-1)
    return _masked_sum(d, valid)


def smooth_l1(pred, target, valid, beta: float = 1.0):
    """Smooth L1 (Huber / beta), summed over the 4 coordinates per box -> (sum, box count)."""
    d = jnp.abs(_up(pred) - _up(target))
    v = jnp.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta)
    return _masked_sum(jnp.sum(v, axis=-1), valid)


def giou(pred, target, valid):
    """1 - GIoU of canonicalised (min/max, clamped to [0, 1]) boxes -> (sum, box count)."""
    p = box_ops.canonicalize(_up(pred))
    t = box_ops.canonicalize(_up(target))
    return _masked_sum(1.0 - box_ops.giou(p, t), valid)


def ciou(pred, target, valid):
    """1 - CIoU of canonicalised boxes (alpha treated as a constant in the gradient) -> (sum, box count)."""
    p = box_ops.canonicalize(_up(pred))
    t = box_ops.canonicalize(_up(target))
    return _masked_sum(1.0 - box_ops.ciou(p, t), valid)


def normalise(sum_count, eps_count: float = 1.0):
    """sum / max(count, 1) for a (sum, count) pair (after any cross-device summation)."""
    s, c = sum_count
    return s / jnp.maximum(c, eps_count)
