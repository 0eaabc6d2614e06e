"""Softmax attention shared by the text decoder (GQA, causal/padding masks) and the ViT (segment masks).

`attention(q, k, v, mask, dtype)` is what the layers call. `mask` is either a dense boolean array `[B,S,T]`
(always computed densely) or an `AttentionMask`, the structured mask of a self-attention pass (causal + key
padding for the text decoder, segment ids for the ViT), which also carries the implementation chosen by
`ModelConfig.attention`:

- "dense": `gqa_attention`, the reference (f32 scores `[B,nh,S,T]`); the default.
- "blockwise": `blockwise_attention`, pure JAX, any backend: online softmax over key blocks, never more than one
  `[query block, key block]` tile of scores, with a custom VJP that recomputes the tiles in the backward pass.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (cuDNN flash attention; GPU, bf16/fp16).
- "splash": the Pallas TPU splash attention kernel (TPU; runs in interpret mode on CPU for the tests).

The KV-cache decode step (a few queries over the head-major cache) calls `cache_attention`, always dense.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from coordexp_jax.errors import CoordExpError

from .config import ATTENTION_IMPLEMENTATIONS

NEG_INF = -1e30


def gqa_attention(q, k, v, mask, dtype):
    """q [B,S,nh,hd]; k, v [B,T,nkv,hd]; mask [B,S,T] bool -> [B,S,nh*hd]. Softmax in float32.

    Query head h uses kv head h // (nh/nkv) (HF repeat_kv). Fully masked rows (left-pad queries) give a uniform
    average instead of NaN; their outputs are never used. On CPU the same math runs with a hand-written VJP
    (`_attention_cpu`); elsewhere XLA differentiates the einsums.
    """
    if jax.default_backend() == "cpu":
        return _attention_cpu(q, k, v, mask, dtype)
    return _attention_einsum(q, k, v, mask, dtype)


def _attention_einsum(q, k, v, mask, dtype):
    B, S, nh, hd = q.shape
    nkv = k.shape[2]
    g = nh // nkv
    qg = q.reshape(B, S, nkv, g, hd)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v.astype(dtype))
    return out.reshape(B, S, nh * hd)


# --- CPU attention with a hand-written VJP -------------------------------------------------------------------
# Autodiff of the einsums computes dv = P^T dO and dk = dS^T Q, contracting over the query axis, which is the
# leading axis of the large [queries, keys] matrices; XLA:CPU then transposes those matrices (B*nh*S*T floats, per
# layer) before its matmul kernel. Computing dv^T = dO^T P and dk^T = Q^T dS instead transposes only the small
# [queries, hd] operands. Same math, same float32 softmax (tests/model/test_attention.py).

def _heads_first(x, nkv):
    """[B,S,nh,hd] -> [B,nkv,g*S,hd]: kv head major, then the query heads sharing it, then positions."""
    B, S, nh, hd = x.shape
    return x.reshape(B, S, nkv, nh // nkv, hd).transpose(0, 2, 3, 1, 4).reshape(B, nkv, (nh // nkv) * S, hd)


def _heads_last(x, S):
    """[B,nkv,g*S,hd] -> [B,S,nkv*g*hd] (inverse of _heads_first, heads flattened)."""
    B, nkv, M, hd = x.shape
    return x.reshape(B, nkv, M // S, S, hd).transpose(0, 3, 1, 2, 4).reshape(B, S, nkv * (M // S) * hd)


def _grouped_mask(mask, g):
    """[B,S,T] -> [B,1,g*S,T] matching _heads_first's row order."""
    B, S, T = mask.shape
    return jnp.broadcast_to(mask[:, None], (B, g, S, T)).reshape(B, 1, g * S, T)


def _attention_cpu_fwd_impl(q, k, v, mask, dtype):
    B, S, nh, hd = q.shape
    nkv = k.shape[2]
    qh = _heads_first(q, nkv)                                                  # [B,K,M,hd]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                  # [B,K,T,hd]
    scores = jnp.einsum("bkmd,bktd->bkmt", qh, kh, preferred_element_type=jnp.float32) * (hd ** -0.5)
    keep = _grouped_mask(mask, nh // nkv)
    probs = jax.nn.softmax(jnp.where(keep, scores, NEG_INF), axis=-1)          # [B,K,M,T] float32
    out = jnp.einsum("bkmt,bktd->bkmd", probs.astype(dtype), vh.astype(dtype))
    return _heads_last(out, S), (qh, kh, vh, keep, probs)


def cache_attention(q, k_cache, v_cache, cache_mask, k_new, v_new, dtype):
    """The KV-cache step: the S new queries (usually 1) over the cache and over the S new keys.

    q [B,S,nh,hd]; k_cache, v_cache [B,nkv,L,hd] (kv head major, as `Qwen3VL.init_cache` stores them) as they
    were before this step's write; cache_mask [B,S,L] bool, the slots query s sees (the earlier tokens); k_new, v_new
    [B,S,nkv,hd], this step's keys and values, seen causally (query s sees new tokens 0..s) -> [B,S,nh*hd] in
    `dtype`. The same float32 softmax as `gqa_attention` over the cache with the new keys written in (query head h
    reads kv head h // (nh/nkv)), forward only.

    Why the new keys come separately: the cache is read in its stored layout and before the caller's in-place
    write, so XLA:CPU neither copies the cache into another layout nor duplicates the write into a second, fresh
    buffer (both cost a copy of the whole cache per layer and step; tests/model/test_attention.py,
    BENCHMARKS.md).
    """
    B, S, nh, hd = q.shape
    nkv, L = k_cache.shape[1], k_cache.shape[2]
    g = nh // nkv
    qh = _heads_first(q, nkv)                                                  # [B,K,M,hd], M = g*S
    kn, vn = k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3)          # [B,K,S,hd]
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((S, S), bool))[None], (B, S, S))
    keep = jnp.concatenate([_grouped_mask(cache_mask, g), _grouped_mask(causal, g)], -1)     # [B,1,M,L+S]
    scores = jnp.concatenate([jnp.einsum("bkmd,bktd->bkmt", qh, k_cache, preferred_element_type=jnp.float32),
                              jnp.einsum("bkmd,bktd->bkmt", qh, kn, preferred_element_type=jnp.float32)], -1)
    probs = jax.nn.softmax(jnp.where(keep, scores * (hd ** -0.5), NEG_INF), axis=-1).astype(dtype)
    out = (jnp.einsum("bkmt,bktd->bkmd", probs[..., :L], v_cache.astype(dtype))
           + jnp.einsum("bkmt,bktd->bkmd", probs[..., L:], vn.astype(dtype)))
    return _heads_last(out, S)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention_cpu(q, k, v, mask, dtype):
    return _attention_cpu_fwd_impl(q, k, v, mask, dtype)[0]


def _attention_cpu_bwd(dtype, res, d_out):
    qh, kh, vh, keep, probs = res  # qh, kh, vh keep the dtypes of q, k, v
    B, nkv, M, hd = qh.shape
    S = d_out.shape[1]
    g = M // S
    d_out_h = _heads_first(d_out.reshape(B, S, nkv * g, hd), nkv)              # [B,K,M,hd]
    p = probs.astype(dtype)
    d_probs = jnp.einsum("bkmd,bktd->bkmt", d_out_h, vh.astype(d_out_h.dtype), preferred_element_type=jnp.float32)
    # dv^T = dO^T P: transpose the small dO (an optimization barrier keeps XLA from folding it back into the dot).
    d_out_t = jax.lax.optimization_barrier(jnp.swapaxes(d_out_h, 2, 3))        # [B,K,hd,M]
    dv = jnp.swapaxes(jnp.einsum("bkdm,bkmt->bkdt", d_out_t, p.astype(d_out_t.dtype)), 2, 3)
    # softmax backward, then the where(): masked scores get no gradient (also in fully masked rows)
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    d_scores = jnp.where(keep, d_scores, 0.0) * (hd ** -0.5)                   # [B,K,M,T] float32
    dq = jnp.einsum("bkmt,bktd->bkmd", d_scores, kh.astype(jnp.float32))
    q_t = jax.lax.optimization_barrier(jnp.swapaxes(qh, 2, 3).astype(jnp.float32))
    dk = jnp.swapaxes(jnp.einsum("bkdm,bkmt->bkdt", q_t, d_scores), 2, 3)
    dq = _heads_last(dq, S).reshape(B, S, nkv * g, hd)
    return (dq.astype(qh.dtype), dk.transpose(0, 2, 1, 3).astype(kh.dtype), dv.transpose(0, 2, 1, 3).astype(vh.dtype),
            None)


_attention_cpu.defvjp(_attention_cpu_fwd_impl, _attention_cpu_bwd)


# --- the structured mask and the dispatcher -------------------------------------------------------------------

@struct.dataclass
class AttentionMask:
    """The mask of a self-attention pass over S positions (queries and keys are the same positions).

    Key j is visible to query i iff `kv_valid[b, j]` (when given) and `segment_ids[b, i] == segment_ids[b, j]` (when
    given) and `j <= i` (when `causal`). Text decoder: `AttentionMask.causal_padding(attention_mask)`; ViT:
    `AttentionMask.segments(vision_segment_ids)` (padding id -1 attends padding, so no ViT row is fully masked).
    `impl` (static) is the implementation that `attention` runs, one of ATTENTION_IMPLEMENTATIONS.
    """
    kv_valid: Any = None     # [B,T] bool
    segment_ids: Any = None  # [B,T] int32
    causal: bool = struct.field(pytree_node=False, default=False)
    impl: str = struct.field(pytree_node=False, default="dense")

    @classmethod
    def causal_padding(cls, attention_mask, impl: str = "dense") -> "AttentionMask":
        """Causal + key padding from attention_mask [B,S] (1 = real token)."""
        return cls(kv_valid=attention_mask > 0, causal=True, impl=impl)

    @classmethod
    def segments(cls, segment_ids, impl: str = "dense") -> "AttentionMask":
        """Attention only between equal segment ids [B,S] (the ViT's images in a slot; -1 = padding)."""
        return cls(segment_ids=segment_ids, impl=impl)

    def dense(self):
        """[B,S,S] bool, the mask the dense reference uses."""
        ref = self.kv_valid if self.kv_valid is not None else self.segment_ids
        B, S = ref.shape
        keep = jnp.ones((1, S, S), bool)
        if self.causal:
            keep = keep & jnp.tril(jnp.ones((S, S), bool))[None]
        if self.kv_valid is not None:
            keep = keep & self.kv_valid[:, None, :]
        if self.segment_ids is not None:
            keep = keep & (self.segment_ids[:, :, None] == self.segment_ids[:, None, :])
        return jnp.broadcast_to(keep, (B, S, S))


def attention(q, k, v, mask, dtype):
    """q [B,S,nh,hd]; k, v [B,T,nkv,hd] -> [B,S,nh*hd] in `dtype` (softmax in float32).

    `mask`: an `AttentionMask` (self-attention, S == T; computed by `mask.impl`) or a dense bool array [B,S,T]
    (always the dense reference, whatever the configured implementation). Raises ValueError for an unknown
    implementation name.
    """
    if not isinstance(mask, AttentionMask):
        return gqa_attention(q, k, v, mask, dtype)
    if mask.impl == "dense":
        return gqa_attention(q, k, v, mask.dense(), dtype)
    if mask.impl == "blockwise":
        return blockwise_attention(q, k, v, mask, dtype)
    if mask.impl == "cudnn":
        return cudnn_attention(q, k, v, mask, dtype)
    if mask.impl == "splash":
        return splash_attention(q, k, v, mask, dtype)
    raise ValueError(f"unknown attention implementation {mask.impl!r}; choose one of {ATTENTION_IMPLEMENTATIONS}")


# --- blockwise (memory-efficient) attention in pure JAX -------------------------------------------------------
# Rabe & Staats 2021, "Self-attention does not need O(n^2) memory" (arXiv:2112.05682): the softmax is accumulated
# over key blocks with a running max (online softmax), so the forward never holds more than one [query block,
# key block] tile of scores. Differentiating that loop would store its carries per step (O(S * T / block));
# instead the custom VJP saves only the output and the row max and sum (O(S)) and recomputes each tile in the
# backward pass, P = exp(S - m) / l, dS = P * (dP - rowsum(dO * O)) (the FlashAttention-2 backward, Dao 2023,
# arXiv:2307.08691, Algorithm 2). Same float32 softmax as the dense reference, including its masked rows: a masked
# score is NEG_INF, so a fully masked row (a left-pad query) averages every key, as `gqa_attention` does, and
# masked scores get no gradient. Keys past T (block padding) are -inf and take no part at all. With a causal mask,
# tiles wholly above the diagonal are skipped (lax.cond; about half the tiles at long S), except in query blocks
# that hold a fully masked row, which keep every tile so that such rows still average every key.

BLOCK_Q = 512
BLOCK_K = 512


def blockwise_attention(q, k, v, mask: AttentionMask, dtype, *, block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """q [B,S,nh,hd]; k, v [B,S,nkv,hd]; mask an AttentionMask -> [B,S,nh*hd] in `dtype`.

    Memory: one [B, nh, block_q, block_k] float32 score tile at a time (forward and backward) plus O(S) residuals
    (output, row max and sum); no [S, S] array. Blocks are min(block, S); S is zero-padded up to a multiple.
    """
    S, T = q.shape[1], k.shape[1]
    if S != T:
        raise ValueError(f"blockwise_attention is self-attention (S == T), got S={S}, T={T}")
    kv_valid = None if mask.kv_valid is None else mask.kv_valid.astype(bool)
    seg = None if mask.segment_ids is None else mask.segment_ids.astype(jnp.int32)
    return _blockwise(q, k, v, kv_valid, seg, mask.causal, min(block_q, S), min(block_k, T), jnp.dtype(dtype))


def _q_blocks(x, nkv, bq):
    """[B,S,nh,hd] -> [nq,B,nkv,g,bq,hd] (positions zero-padded to nq*bq; head h = kv head h // g, as HF)."""
    B, S, nh, hd = x.shape
    nq = -(-S // bq)
    x = jnp.pad(x, ((0, 0), (0, nq * bq - S), (0, 0), (0, 0)))
    return x.reshape(B, nq, bq, nkv, nh // nkv, hd).transpose(1, 0, 3, 4, 2, 5)


def _q_unblocks(x, S):
    """[nq,B,nkv,g,bq,hd] -> [B,S,nh,hd] (inverse of _q_blocks)."""
    nq, B, K, G, bq, hd = x.shape
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, K * G, hd)[:, :S]


def _kv_blocks(x, bk):
    """[B,T,nkv,hd] -> [nk,B,nkv,bk,hd] (zero-padded)."""
    B, T, K, hd = x.shape
    nk = -(-T // bk)
    x = jnp.pad(x, ((0, 0), (0, nk * bk - T), (0, 0), (0, 0)))
    return x.reshape(B, nk, bk, K, hd).transpose(1, 0, 3, 2, 4)


def _kv_unblocks(x, T):
    nk, B, K, bk, hd = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(B, nk * bk, K, hd)[:, :T]


def _vec_blocks(x, block, fill):
    """[B,N] -> [nb,B,block] (padded with `fill`); None stays None."""
    if x is None:
        return None
    B, N = x.shape
    nb = -(-N // block)
    return jnp.pad(x, ((0, 0), (0, nb * block - N)), constant_values=fill).reshape(B, nb, block).transpose(1, 0, 2)


def _block_info(kv_valid, seg, S, bq, bk):
    """Per query block: positions [nq,bq], segments [nq,B,bq], `full` [nq] (the block holds a fully masked row);
    per key block: positions, real (not padding) [nk,bk], kv_valid and segments [nk,B,bk]."""
    nq, nk = -(-S // bq), -(-S // bk)
    if kv_valid is None:  # causal rows see themselves: none is fully masked
        full = jnp.zeros((nq,), bool)
    else:  # (causal) row i is fully masked when no key j <= i is valid: a left-pad query
        empty = jnp.cumsum(kv_valid.astype(jnp.int32), axis=1) == 0
        full = _vec_blocks(empty, bq, False).any(axis=(1, 2))
    qi = dict(pos=jnp.arange(nq * bq, dtype=jnp.int32).reshape(nq, bq), seg=_vec_blocks(seg, bq, -2), full=full)
    kpos = jnp.arange(nk * bk, dtype=jnp.int32).reshape(nk, bk)
    ki = dict(pos=kpos, real=kpos < S, valid=_vec_blocks(kv_valid, bk, False), seg=_vec_blocks(seg, bk, -2))
    return qi, ki


def _tile_needed(qi, ki, causal):
    """False for a tile that only holds scores above the causal diagonal, in a query block without a fully masked
    row (those average every key, as dense does, so their blocks keep every tile). Skipping it changes nothing."""
    return (ki["pos"][0] <= qi["pos"][-1]) | qi["full"] if causal else None


def _maybe(needed, compute, skip, operand):
    """lax.cond(needed, compute, skip, operand), or compute(operand) when needed is None (no skipping)."""
    return compute(operand) if needed is None else jax.lax.cond(needed, compute, skip, operand)


def _tile(qt, kt, qi, ki, causal, scale):
    """Masked float32 scores of one tile: qt [B,K,G,bq,hd], kt [B,K,bk,hd] -> s [B,K,G,bq,bk], keep [.,1,1,bq,bk]."""
    s = jnp.einsum("bkgqd,bktd->bkgqt", qt, kt, preferred_element_type=jnp.float32) * scale
    bq, bk = s.shape[-2:]
    keep = jnp.ones((1, bq, bk), bool)
    if ki["valid"] is not None:
        keep = keep & ki["valid"][:, None, :]
    if ki["seg"] is not None:
        keep = keep & (qi["seg"][:, :, None] == ki["seg"][:, None, :])
    if causal:
        keep = keep & (ki["pos"][None, None, :] <= qi["pos"][None, :, None])
    keep = keep[:, None, None]
    s = jnp.where(keep, s, NEG_INF)
    s = jnp.where(ki["real"], s, -jnp.inf)
    return s, keep & ki["real"]


def _blockwise_fwd(q, k, v, kv_valid, seg, causal, bq, bk, dtype):
    B, S, nh, hd = q.shape
    nkv = k.shape[2]
    scale = hd ** -0.5
    qb, kb, vb = _q_blocks(q, nkv, bq), _kv_blocks(k, bk), _kv_blocks(v, bk)
    qi, ki = _block_info(kv_valid, seg, S, bq, bk)

    def one_q_block(args):
        qt, qit = args
        shape = qt.shape[:-1]  # [B,K,G,bq]

        def step(carry, x):
            kt, vt, kit = x

            def compute(carry):
                m, l, acc = carry
                s, _ = _tile(qt, kt, qit, kit, causal, scale)
                m_new = jnp.maximum(m, s.max(-1))
                p = jnp.exp(s - m_new[..., None])
                c = jnp.exp(m - m_new)
                acc = acc * c[..., None] + jnp.einsum("bkgqt,bktd->bkgqd", p.astype(dtype), vt.astype(dtype),
                                                      preferred_element_type=jnp.float32)
                return m_new, l * c + p.sum(-1), acc

            return _maybe(_tile_needed(qit, kit, causal), compute, lambda c: c, carry), None

        init = (jnp.full(shape, NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(shape + (hd,), jnp.float32))
        (m, l, acc), _ = jax.lax.scan(step, init, (kb, vb, ki))
        # l >= 1 (the row max contributes exp(0)). m and l are kept apart: m + log(l) would round to m for a
        # fully masked row (m = NEG_INF), and its backward would then see p = 1 instead of 1/T
        return acc / l[..., None], (m, l)

    out_b, stats = jax.lax.map(one_q_block, (qb, qi))  # [nq,B,K,G,bq,hd] f32; m, l [nq,B,K,G,bq]
    out = _q_unblocks(out_b.astype(dtype), S).reshape(B, S, nh * hd)
    return out, (q, k, v, kv_valid, seg, out_b, stats)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _blockwise(q, k, v, kv_valid, seg, causal, bq, bk, dtype):
    return _blockwise_fwd(q, k, v, kv_valid, seg, causal, bq, bk, dtype)[0]


def _blockwise_bwd(causal, bq, bk, dtype, res, d_out):
    q, k, v, kv_valid, seg, out_b, (m, l) = res
    B, S, nh, hd = q.shape
    nkv = k.shape[2]
    scale = hd ** -0.5
    qb, kb, vb = _q_blocks(q, nkv, bq), _kv_blocks(k, bk), _kv_blocks(v, bk)
    qi, ki = _block_info(kv_valid, seg, S, bq, bk)
    dob = _q_blocks(d_out.reshape(B, S, nh, hd).astype(jnp.float32), nkv, bq)   # zero on padded queries
    delta = jnp.sum(dob * out_b, axis=-1)                                       # rowsum(dO * O) [nq,B,K,G,bq]

    def one_q_block(carry, x):
        dk_acc, dv_acc = carry
        qt, qit, dot, mt, lt, dt = x

        def step(dq, y):
            kt, vt, kit = y

            def compute(dq):
                s, keep = _tile(qt, kt, qit, kit, causal, scale)
                p = jnp.exp(s - mt[..., None]) / lt[..., None]                  # the forward's probabilities
                dv = jnp.einsum("bkgqt,bkgqd->bktd", p.astype(dtype), dot.astype(dtype),
                                preferred_element_type=jnp.float32)
                dp = jnp.einsum("bkgqd,bktd->bkgqt", dot.astype(dtype), vt.astype(dtype),
                                preferred_element_type=jnp.float32)
                ds = jnp.where(keep, p * (dp - dt[..., None]), 0.0) * scale     # masked scores: no gradient
                dq = dq + jnp.einsum("bkgqt,bktd->bkgqd", ds, kt.astype(jnp.float32))
                dk = jnp.einsum("bkgqt,bkgqd->bktd", ds, qt.astype(jnp.float32))
                return dq, (dk, dv)

            zero = jnp.zeros(kt.shape, jnp.float32)
            return _maybe(_tile_needed(qit, kit, causal), compute, lambda dq: (dq, (zero, zero)), dq)

        dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(qt.shape, jnp.float32), (kb, vb, ki))
        return (dk_acc + dk, dv_acc + dv), dq

    zeros = jnp.zeros(kb.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(one_q_block, (zeros, zeros), (qb, qi, dob, m, l, delta))
    T = k.shape[1]
    return (_q_unblocks(dq, S).astype(q.dtype), _kv_unblocks(dk, T).astype(k.dtype),
            _kv_unblocks(dv, T).astype(v.dtype), None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# --- cuDNN flash attention (GPU) -------------------------------------------------------------------------------

class AttentionConfigError(CoordExpError, ValueError):
    """The configured attention implementation cannot run with the model's settings (e.g. 'cudnn' in float32)."""


def cudnn_attention(q, k, v, mask: AttentionMask, dtype, *, implementation: str = "cudnn"):
    """q [B,S,nh,hd]; k, v [B,S,nkv,hd] -> [B,S,nh*hd] via `jax.nn.dot_product_attention` (GQA native).

    Text (causal + key padding): cuDNN's padding mask covers only right padding (`query/key_value_seq_lengths`), so
    each row is rotated to put its real tokens first (they must be one contiguous run: left- or right-padded
    rows), attended with `is_causal=True` and the real lengths, and rotated back; padded queries output 0 (they
    are never used). The ViT (segments): a boolean `[B,1,S,S]` mask (one byte per pair per image slot, no
    per-head scores). `implementation="xla"` runs the same plumbing on any backend (the CPU tests).
    Raises AttentionConfigError when `implementation="cudnn"` and dtype is not bfloat16/float16 (cuDNN's flash
    kernels have no float32 path).
    """
    B, S, nh, hd = q.shape
    if implementation == "cudnn" and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise AttentionConfigError(f"attention 'cudnn' needs a bfloat16 or float16 compute dtype (model.dtype), "
                                   f"got {jnp.dtype(dtype).name}")
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    if mask.causal and mask.kv_valid is not None and mask.segment_ids is None:
        valid = mask.kv_valid.astype(bool)
        n = jnp.sum(valid, axis=-1).astype(jnp.int32)                   # real tokens per row [B]
        start = jnp.argmax(valid, axis=-1).astype(jnp.int32)            # first real token (0 if none)
        ar = jnp.arange(S, dtype=jnp.int32)
        fwd_idx = ((ar[None] + start[:, None]) % S)[:, :, None, None]  # rotated[i] = x[(i + start) % S]
        rot = [jnp.take_along_axis(x, fwd_idx, axis=1) for x in (q, k, v)]
        n1 = jnp.maximum(n, 1)  # an all-padding row (never used) still gets a well-defined kernel call
        out = jax.nn.dot_product_attention(*rot, is_causal=True, query_seq_lengths=n1, key_value_seq_lengths=n1,
                                           implementation=implementation)
        back_idx = ((ar[None] - start[:, None]) % S)[:, :, None, None]
        out = jnp.take_along_axis(out, back_idx, axis=1)
        out = jnp.where(valid[:, :, None, None], out, 0)
    elif mask.kv_valid is None or mask.segment_ids is None:
        out = jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, None], implementation=implementation)
    else:
        raise NotImplementedError("cudnn_attention: kv_valid together with segment_ids")
    return out.astype(dtype).reshape(B, S, nh * hd)


# --- Pallas splash attention (TPU) -----------------------------------------------------------------------------

def splash_attention(q, k, v, mask: AttentionMask, dtype, *, block: int = 512, interpret: bool = False):
    """q [B,S,nh,hd]; k, v [B,S,nkv,hd] -> [B,S,nh*hd] via the Pallas TPU splash attention kernel (GQA native).

    Causal structure as the kernel's static `CausalMask`, the rest as segment ids: the ViT's own ids, or for the
    text 1 = real token, 0 = padding (a padded query then sees only padding, never fully masked; its output is
    never used). S is padded to a multiple of 128 with its own segment (-2); block sizes are the largest of
    `block`, ..., 128 dividing it. `interpret=True` runs the kernel in Pallas's interpreter (any backend; tests).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    B, S, nh, hd = q.shape
    if mask.kv_valid is not None and mask.segment_ids is not None:
        raise NotImplementedError("splash_attention: kv_valid together with segment_ids")
    if mask.segment_ids is not None:
        seg = mask.segment_ids.astype(jnp.int32)
    elif mask.kv_valid is not None:
        seg = mask.kv_valid.astype(jnp.int32)
    else:
        seg = jnp.zeros((B, S), jnp.int32)
    Sp = -(-S // 128) * 128
    bs = next(b for b in (block, 1024, 512, 256, 128) if b <= block and Sp % b == 0)
    pad = ((0, 0), (0, 0), (0, Sp - S), (0, 0))
    # [B,heads,Sp,hd]; the kernel does not scale the scores, so q is scaled first (as MaxText does)
    qs = jnp.pad((q.astype(jnp.float32) * hd ** -0.5).astype(dtype).transpose(0, 2, 1, 3), pad)
    ks, vs = (jnp.pad(x.astype(dtype).transpose(0, 2, 1, 3), pad) for x in (k, v))
    seg = jnp.pad(seg, ((0, 0), (0, Sp - S)), constant_values=-2)
    head_mask = sa.CausalMask((Sp, Sp)) if mask.causal else sa.FullMask((Sp, Sp))
    sizes = sa.BlockSizes(block_q=bs, block_kv=bs, block_kv_compute=bs, block_q_dkv=bs, block_kv_dkv=bs,
                          block_kv_dkv_compute=bs, block_q_dq=bs, block_kv_dq=bs)
    kernel = sa.make_splash_mha(sa.MultiHeadMask([head_mask] * nh), head_shards=1, q_seq_shards=1,
                                block_sizes=sizes, interpret=interpret)
    out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=sa.SegmentIds(q=s, kv=s)))(qs, ks, vs, seg)
    return out[:, :, :S].transpose(0, 2, 1, 3).astype(dtype).reshape(B, S, nh * hd)
