"""The Qwen3 text decoder layer (spec §3.1): q/k RMSNorm per head before RoPE, GQA, SwiGLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import attention, cache_attention
from .config import TextConfig
from .layers import Dense, RMSNorm
from .rope import apply_rope


def _after(xs, y):
    """xs (a pytree of float arrays) unchanged, but computed from y: whatever consumes them runs after y.

    The decode step reads the old cache (attention) and then writes the new keys into it. XLA:CPU runs independent
    operations concurrently, so without a data dependency from the attention output to the write it cannot update
    the cache in place and copies the whole cache, twice per layer and step (BENCHMARKS.md). The dependency is
    exact: 0 * (y0 != y0) is +0.0 for every y0, NaN included, and x + 0.0 == x.
    """
    y0 = y.reshape(-1)[0]
    zero = (y0 != y0).astype(jnp.float32) * 0.0
    return jax.tree.map(lambda x: x + zero.astype(x.dtype), xs)


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

    def __call__(self, x, cos, sin, mask, cache_k=None, cache_v=None, index=None, layer=None):
        """Without a cache: attention over x itself (mask [B,S,S]); returns (x, k, v) with k, v [B,S,nkv,hd].

        With a cache (cache_k/v [B,nkv,L,hd], kv head major; write position `index`; mask [B,S,L], the cache slots
        the new tokens see, i.e. the earlier tokens): attends over the cache and the S new keys
        (`cache_attention`), then writes the new k, v at `index` with one dynamic_update_slice shared by the batch
        and returns the updated cache arrays. With `layer` (an int32 scalar, under the layer scan) cache_k/v are the
        stacked caches of all layers [n_layers, B, nkv, L, hd]: attention reads that layer's slice, the new k, v
        go to layer `layer` (only the S new slots are written), and the updated stacked caches are returned.
        """
        h = self.input_layernorm(x)
        q, k, v = self.self_attn.qkv(h, cos, sin)
        if cache_k is None:
            a = attention(q, k, v, mask, self.dtype)  # mask: an AttentionMask (ModelConfig.attention) or [B,S,S] bool
        else:
            old_k, old_v = cache_k, cache_v
            if layer is not None:
                old_k = jax.lax.dynamic_index_in_dim(cache_k, layer, keepdims=False)
                old_v = jax.lax.dynamic_index_in_dim(cache_v, layer, keepdims=False)
            k, v = k.astype(cache_k.dtype), v.astype(cache_v.dtype)  # attended as stored
            a = cache_attention(q, old_k, old_v, mask, k, v, self.dtype)
            k, v = _after((k, v), a)  # so the cache is written in place after attention has read it
            kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            if layer is not None:
                k = jax.lax.dynamic_update_slice(cache_k, kt[None], (layer, 0, 0, index, 0))
                v = jax.lax.dynamic_update_slice(cache_v, vt[None], (layer, 0, 0, index, 0))
            else:
                k = jax.lax.dynamic_update_slice(cache_k, kt, (0, 0, index, 0))
                v = jax.lax.dynamic_update_slice(cache_v, vt, (0, 0, index, 0))
        x = x + self.self_attn.o_proj(a)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v
