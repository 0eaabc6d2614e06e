"""Per-step sampling math for rollouts: pure, jittable functions over one step's logits `[B, V]`.

Order of the logit processors (the same as transformers' warpers): temperature, then top-k, then top-p on the
distribution renormalised after top-k. Masked entries are set to -inf (never to a large negative number), so
they get probability exactly 0.

Log-probabilities (documented choice, see docs/rollout.md):
- `model_logprob`: log softmax of the RAW model logits at temperature 1, before temperature, top-k, top-p and
  protocol constraints. This is the quantity CoordExp's score rule uses (exp of the mean over the 4 coordinate
  tokens of a box) and the policy log-prob GRPO needs at temperature 1.
- `sample_logprob`: log-prob under the distribution actually sampled from (after every processor and mask);
  0 for greedy decoding (a point mass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -jnp.inf


def apply_temperature(logits, temperature: float):
    """`[B, V]` -> `[B, V]` float32 logits divided by `temperature` (> 0)."""
    return logits.astype(jnp.float32) / jnp.float32(temperature)


def top_k_mask(logits, k: int):
    """Keeps the k largest logits of each row `[B, V]`, -inf elsewhere. Ties at the k-th value are all kept."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [B, 1]
    return jnp.where(logits >= kth, logits, NEG_INF)


def top_p_mask(logits, p: float, *, candidates: int | None = None):
    """Nucleus filter: keeps the smallest set of highest-probability tokens whose mass reaches `p`.

    `logits [B, V]` (already temperature-scaled, possibly -inf masked). The token that crosses `p` is kept (as
    in transformers), ties at the threshold value are all kept. `candidates`: when the row has at most that many
    finite entries (after top-k), only that many are sorted (`lax.top_k`), which avoids a full sort of a 152k
    vocabulary.
    """
    if p >= 1.0:
        return logits
    v = logits.shape[-1]
    n = v if candidates is None else min(int(candidates), v)
    top = jax.lax.top_k(logits, n)[0]  # [B, n] descending
    # probabilities of the sorted candidates under the full row's normaliser (masked entries have mass 0)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    sorted_p = jnp.exp(top - lse)
    before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly before each sorted entry
    keep_sorted = before < p  # the first entry is always kept
    thresh = jnp.min(jnp.where(keep_sorted, top, jnp.inf), axis=-1, keepdims=True)  # smallest kept logit
    return jnp.where(logits >= thresh, logits, NEG_INF)


def process_logits(logits, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """Temperature -> top-k -> top-p. `[B, V]` -> float32 `[B, V]` with -inf where a token cannot be sampled."""
    x = apply_temperature(logits, temperature)
    x = top_k_mask(x, top_k)
    x = top_p_mask(x, top_p, candidates=top_k if top_k > 0 else None)
    return x


def argmax(logits, *, blocks: int = 128):
    """Index of the largest entry of each row: `[B, V]` -> `[B]` int32, equal to `jnp.argmax(logits, -1)` for rows
    without NaN (the first index on ties; ±inf allowed). For a row holding a NaN the index is unspecified (the
    block maxima may skip NaN on XLA:CPU).

    Two levels: the max of each of `blocks` blocks of the row (a plain vectorised reduction), the first block
    holding the row max, then the first max inside that block. XLA:CPU runs `jnp.argmax` as a scalar (value, index)
    reduction: 0.7 ms for one 152k row, about 3% of a 100M-model decode step at batch 1 (BENCHMARKS.md); this
    takes ~0.1 ms. The row is padded with -inf to a multiple of `blocks` (padding is never the first maximum).
    """
    B, V = logits.shape
    if V < 4 * blocks:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    size = -(-V // blocks)
    if size * blocks != V:
        logits = jnp.pad(logits, ((0, 0), (0, size * blocks - V)), constant_values=-jnp.inf)
    xb = logits.reshape(B, blocks, size)
    blk = jnp.argmax(jnp.max(xb, axis=-1), axis=-1)                     # [B]: first block with the row max
    row = jnp.take_along_axis(xb, blk[:, None, None], axis=1)[:, 0]    # [B, size]
    return (blk * size + jnp.argmax(row, axis=-1)).astype(jnp.int32)


def sample(key, logits, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """One token per row. `logits [B, V]` (raw, or already constraint-masked with -inf).

    temperature == 0 means greedy (argmax; top-k/top-p then change nothing). Returns
    `(tokens [B] int32, sample_logprob [B] float32)`.
    """
    if temperature == 0.0:
        tok = argmax(logits)
        return tok, jnp.zeros(tok.shape, jnp.float32)
    x = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    tok = jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
    lp = token_logprob(x, tok)
    return tok, lp


def token_logprob(logits, tokens):
    """log softmax(logits)[b, tokens[b]]: `[B, V]`, `[B]` -> `[B]` float32, without materialising log_softmax."""
    x = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(x, axis=-1)


def coord_expectation(logits, coord_start: int, num_bins: int = 1000, tau: float = 1.0):
    """ĉ = Σ_k softmax(s / τ)_k · k / (num_bins - 1), with s the coordinate logits `[coord_start, +num_bins)`.

    `logits [B, V]` -> `[B]` float32 in [0, 1] (coordexp_method.md §4). Raises ValueError for a static
    `coord_start < 0` (a tokenizer without coordinate tokens: `dynamic_slice` would clamp it to id 0 and slice text
    logits silently).
    """
    if isinstance(coord_start, (int, np.integer)) and coord_start < 0:
        raise ValueError(f"coord_expectation: coord_start {coord_start} < 0 (the tokenizer has no coordinate tokens)")
    s = jax.lax.dynamic_slice_in_dim(logits, coord_start, num_bins, axis=-1).astype(jnp.float32) / jnp.float32(tau)
    p = jax.nn.softmax(s, axis=-1)
    grid = jnp.arange(num_bins, dtype=jnp.float32) / jnp.float32(num_bins - 1)
    return p @ grid
