"""Softmax attention shared by the text decoder (GQA, causal/padding masks) and the ViT (segment masks)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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
