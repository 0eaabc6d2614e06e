"""Parameter-holding building blocks (Flax NNX). Every parameter carries logical axis names (docs/model.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, shape, names: tuple[str | None, ...], dtype, init: str = "normal", std: float = 0.02):
    """An nnx.Param with logical axis names `names` (stored as `out_sharding` metadata, no eager sharding)."""
    assert len(names) == len(shape), (names, shape)
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, sharding_names=names, eager_sharding=False)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (the transpose of a torch Linear weight)."""

    def __init__(self, din, dout, names, *, bias: bool, dtype, param_dtype, rngs, std=0.02):
        self.kernel = param(rngs, (din, dout), names, param_dtype, std=std)
        self.bias = param(rngs, (dout,), (names[1],), param_dtype, init="zeros") if bias else None
        self.dtype = dtype

    def __call__(self, x):
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias (eps 1e-6 in the ViT); statistics in float32."""

    def __init__(self, dim, name, *, eps=1e-6, dtype, param_dtype):
        self.scale = param(None, (dim,), (name,), param_dtype, init="ones")
        self.bias = param(None, (dim,), (name,), param_dtype, init="zeros")
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mu = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mu).mean(-1, keepdims=True)
        y = (x32 - mu) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """w * (x32 * rsqrt(mean(x32^2) + eps)).astype(x.dtype), as HF Qwen3 (spec §3.1)."""

    def __init__(self, dim, *, eps, dtype, param_dtype, name="norm"):
        self.scale = param(None, (dim,), (name,), param_dtype, init="ones")
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)).astype(x.dtype)
        return (self.scale[...].astype(self.dtype) * y).astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table [V_padded, H] (rows >= the real vocab are zero and never produced)."""

    def __init__(self, vocab, dim, names, *, dtype, param_dtype, rngs, std=0.02):
        self.embedding = param(rngs, (vocab, dim), names, param_dtype, std=std)
        self.dtype = dtype

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
