"""Expectation decoding of coordinate distributions (`../shared/reference/coordexp_method.md` §4).

At a coordinate position with coordinate logits s (`[..., 1000]`, the static slice
`z[..., coord_start:coord_start + 1000]` of the full logits z): p = softmax(s / tau), and

- `exp`:  c_hat = sum_k p_k k / 999 (differentiable; d c_hat / d s_k = (1/tau) p_k (k/999 - c_hat));
- `hard`: argmax_k s_k / 999 (no gradient);
- `st`:   straight-through, hard + exp - stop_gradient(exp) (value of hard, gradient of exp).

Optional top-k keeps only the k largest logits (ties at the k-th value are kept) before the softmax.
Everything is computed in float32 whatever the input dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from coordexp_jax.coord.codec import MAX_BIN, NUM_BINS

DECODE_MODES = ("exp", "hard", "st")


def coord_logits(logits, coord_start: int | None = None, num_bins: int = NUM_BINS):
    """The coordinate logits `[..., 1000]` from full logits `[..., V]` (with `coord_start`) or already sliced ones."""
    if coord_start is None:
        if logits.shape[-1] != num_bins:
            raise ValueError(f"coord logits must have last axis {num_bins}, got shape {logits.shape} "
                             "(pass coord_start to slice full-vocabulary logits)")
        return logits
    if coord_start < 0 or coord_start + num_bins > logits.shape[-1]:
        raise ValueError(f"coord slice [{coord_start}, {coord_start + num_bins}) outside logits of shape {logits.shape}")
    return jax.lax.slice_in_dim(logits, coord_start, coord_start + num_bins, axis=-1)


def _top_k_mask(s, top_k: int | None):
    if top_k is None or top_k >= s.shape[-1]:
        return s
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    kth = jax.lax.top_k(s, top_k)[0][..., -1:]
    return jnp.where(s >= kth, s, -jnp.inf)


def coord_log_probs(logits, tau: float = 1.0, top_k: int | None = None, coord_start: int | None = None):
    """log softmax(s / tau) over the 1000 bins, float32 `[..., 1000]`."""
    s = coord_logits(logits, coord_start)
    s = s.astype(jnp.promote_types(s.dtype, jnp.float32))  # f32 at least; f64 kept for x64 gradient checks
    return jax.nn.log_softmax(_top_k_mask(s / tau, top_k), axis=-1)


def coord_probs(logits, tau: float = 1.0, top_k: int | None = None, coord_start: int | None = None):
    """softmax(s / tau) over the 1000 bins, float32 `[..., 1000]`."""
    return jnp.exp(coord_log_probs(logits, tau, top_k, coord_start))


def bin_values(dtype=jnp.float32):
    """k / 999 for k = 0..999, `[1000]`."""
    return jnp.arange(NUM_BINS, dtype=dtype) / MAX_BIN


def expectation(logits, tau: float = 1.0, top_k: int | None = None, coord_start: int | None = None):
    """c_hat = sum_k p_k k/999, `[..., 1000] -> [...]` float32."""
    p = coord_probs(logits, tau, top_k, coord_start)
    return p @ bin_values(p.dtype)


def hard(logits, coord_start: int | None = None):
    """argmax_k s_k / 999, `[..., 1000] -> [...]` float32 (no gradient)."""
    s = coord_logits(logits, coord_start)
    return jax.lax.stop_gradient(jnp.argmax(s, axis=-1).astype(jnp.float32) / MAX_BIN)


def straight_through(logits, tau: float = 1.0, top_k: int | None = None, coord_start: int | None = None):
    """Value of `hard`, gradient of `expectation`."""
    soft = expectation(logits, tau, top_k, coord_start)
    return hard(logits, coord_start) + soft - jax.lax.stop_gradient(soft)


def decode(logits, mode: str = "exp", tau: float = 1.0, top_k: int | None = None, coord_start: int | None = None):
    """Dispatch on `mode` in ("exp", "hard", "st"): `[..., 1000] (or [..., V] with coord_start) -> [...]`."""
    if mode == "exp":
        return expectation(logits, tau, top_k, coord_start)
    if mode == "hard":
        return hard(logits, coord_start)
    if mode == "st":
        return straight_through(logits, tau, top_k, coord_start)
    raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")


def gather_positions(x, box_pos):
    """Rows of `x [B, S, ...]` at `box_pos [B, M, 4]` -> `[B, M, 4, ...]` (positions clipped into range)."""
    pos = jnp.clip(box_pos, 0, x.shape[1] - 1)
    return jax.vmap(lambda xb, pb: xb[pb])(x, pos)


def expectation_boxes(logits, box_pos, mode: str = "exp", tau: float = 1.0, top_k: int | None = None,
                      coord_start: int | None = None):
    """Decoded boxes at the positions predicting x1, y1, x2, y2: logits `[B, S, V or 1000]`, box_pos `[B, M, 4]`
    -> `[B, M, 4]` float32. Gathers first, so only `B*M*4` positions are softmaxed."""
    return decode(gather_positions(logits, box_pos), mode, tau, top_k, coord_start)


class CoordStepStats(NamedTuple):
    """(A pytree.) What a sampler records at each decode step (all `[B]` float32 unless noted).

    `token_logprob`: log p(token) under the full-vocabulary softmax of z / tau (the sampling distribution);
    `coord_mass`: probability mass on the 1000 bins under the same softmax; `expectation` and `hard`: the decoded
    coordinate from the bin logits (meaningful where the sampled token is a bin); `is_coord` `[B] bool`.
    """

    token_logprob: jax.Array
    coord_mass: jax.Array
    expectation: jax.Array
    hard: jax.Array
    is_coord: jax.Array


def step_stats(logits, token, coord_start: int, tau: float = 1.0, exp_tau: float | None = None,
               num_bins: int = NUM_BINS) -> CoordStepStats:
    """Per-step statistics from full logits `[B, V]` and the chosen `token [B]` (jittable).

    `tau` is the sampling temperature for `token_logprob` / `coord_mass`; `exp_tau` (default `tau`) the
    temperature of the expectation.
    """
    z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32)) / tau
    lse = jax.nn.logsumexp(z, axis=-1)
    tok_lp = jnp.take_along_axis(z, token[..., None].astype(jnp.int32), axis=-1)[..., 0] - lse
    s = coord_logits(logits, coord_start, num_bins)
    coord_mass = jnp.exp(jax.nn.logsumexp(coord_logits(z, coord_start, num_bins), axis=-1) - lse)
    is_coord = (token >= coord_start) & (token < coord_start + num_bins)
    return CoordStepStats(tok_lp, coord_mass, expectation(s, tau if exp_tau is None else exp_tau), hard(s), is_coord)
