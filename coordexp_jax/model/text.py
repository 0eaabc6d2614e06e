"""The Qwen3 text decoder layer (spec §3.1): q/k RMSNorm per head before RoPE, GQA, SwiGLU MLP."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from .config import TextConfig
from .layers import Dense, RMSNorm
from .rope import apply_rope

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
# [queries, hd] operands. Same math, same float32 softmax (tests/model/test_text_attention.py).

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


def _attention_cpu_fwd(q, k, v, mask, dtype):
    return _attention_cpu_fwd_impl(q, k, v, mask, dtype)


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


_attention_cpu.defvjp(_attention_cpu_fwd, _attention_cpu_bwd)


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs):
        H, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, std=cfg.initializer_range)
        self.q_proj = Dense(H, nh * hd, ("embed", "q_heads"), bias=b, **kw)
        self.k_proj = Dense(H, nkv * hd, ("embed", "kv_heads"), bias=b, **kw)
        self.v_proj = Dense(H, nkv * hd, ("embed", "kv_heads"), bias=b, **kw)
        self.o_proj = Dense(nh * hd, H, ("q_heads", "embed"), bias=b, **kw)
        self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, name="head_dim")
        self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, name="head_dim")
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.dtype = dtype

    def qkv(self, x, cos, sin):
        """x [B,S,H] -> q [B,S,nh,hd], k, v [B,S,nkv,hd] (k after k_norm and RoPE, as stored in the cache)."""
        B, S, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, S, self.nh, self.hd))
        k = self.k_norm(self.k_proj(x).reshape(B, S, self.nkv, self.hd))
        v = self.v_proj(x).reshape(B, S, self.nkv, self.hd)
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        return apply_rope(q, c, s), apply_rope(k, c, s), v


class MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs):
        kw = dict(bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs, std=cfg.initializer_range)
        self.gate_proj = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up_proj = Dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down_proj = Dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, param_dtype, rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x, cos, sin, mask, cache_k=None, cache_v=None, index=None):
        """Without a cache: attention over x itself (mask [B,S,S]); returns (x, k, v) with k, v [B,S,nkv,hd].

        With a cache (cache_k/v [B,L,nkv,hd], write position `index`, mask [B,S,L]): writes the new k, v at
        `index` with one dynamic_update_slice shared by the batch, attends over the cache and returns the
        updated cache arrays.
        """
        h = self.input_layernorm(x)
        q, k, v = self.self_attn.qkv(h, cos, sin)
        if cache_k is not None:
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
        a = gqa_attention(q, k, v, mask, self.dtype)
        x = x + self.self_attn.o_proj(a)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v
