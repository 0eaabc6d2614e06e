"""Parameter-holding building blocks (Flax NNX). Every parameter carries logical axis names (docs/model.md)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, shape, names: tuple[str | None, ...], dtype, init: str = "normal",
          std: float | None = None):
    """An nnx.Param with logical axis names `names` (stored as `out_sharding` metadata, no eager sharding).

    init "normal" draws N(0, std^2); std has no default so every caller passes the config's initializer_range.
    """
    assert len(names) == len(shape), (names, shape)
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        if std is None:
            raise ValueError(f"param {names}: init='normal' needs std (the config's initializer_range)")
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, sharding_names=names, eager_sharding=False)


def linear(x, w, preferred_element_type=None):
    """x [..., K] @ w [K, N] -> [..., N]; on CPU with a hand-written VJP whose weight gradient XLA:CPU runs as a fast
    (YNNPACK) matmul.

    Why: for dW = x^T dy, XLA:CPU's layout assignment transposes the large dy ([tokens, N], e.g. the logits gradient)
    and then runs a dot with both operands transposed, which YNNPACK does not take, so it falls back to a slower
    kernel (BENCHMARKS.md). Transposing the small x explicitly (behind an optimization barrier, so the transpose is
    not folded back into the dot) gives a canonical [K, T] x [T, N] matmul. Other backends get jnp.dot: their
    matmul libraries take transposed operands natively.
    """
    if jax.default_backend() != "cpu":
        return jnp.dot(x, w, preferred_element_type=preferred_element_type)
    return _linear_cpu(x, w, preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear_cpu(x, w, preferred_element_type):
    return jnp.dot(x, w, preferred_element_type=preferred_element_type)


def _linear_cpu_fwd(x, w, preferred_element_type):
    return _linear_cpu(x, w, preferred_element_type), (x, w)


def _linear_cpu_bwd(preferred_element_type, res, dy):
    x, w = res
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dx = jnp.dot(dy2, w.T.astype(dy2.dtype)).astype(x.dtype).reshape(x.shape)
    x2t = jax.lax.optimization_barrier(x2.T)
    dw = jnp.dot(x2t.astype(dy2.dtype), dy2).astype(w.dtype)
    return dx, dw


_linear_cpu.defvjp(_linear_cpu_fwd, _linear_cpu_bwd)


def row_logits(h, table, *, groups: int = 2, preferred_element_type=None):
    """One row h [..., H] (the leading dims multiply to 1) against a row-major table [V, H] -> [..., V] = h @ table.T.

    For decoding at batch 1 on CPU (the tied LM head). XLA:CPU runs the plain [1, H] x [H, V] product as an Eigen
    matrix-vector product on one thread; this runs it as the matrix product [V/g, g*H] x [g*H, g] with the block
    diagonal kron(I_g, h) on the right, which XLA:CPU hands to YNNPACK and splits over the threads. The reshape of
    the table is free (same row-major bytes) and the table is still read once; g times the flops (the zero blocks)
    cost nothing next to reading it. Same products as h @ table.T, summed in another order (float rounding only).
    Falls back to the plain product when V is not a multiple of `groups`. BENCHMARKS.md has the measurement.
    """
    V, H = table.shape
    if V % groups or h.size != H:
        return jnp.einsum("...h,vh->...v", h, table, preferred_element_type=preferred_element_type)
    x = jnp.kron(jnp.eye(groups, dtype=h.dtype), h.reshape(H, 1))                  # [g*H, g]
    y = jnp.dot(table.reshape(V // groups, groups * H), x, preferred_element_type=preferred_element_type)
    return y.reshape(h.shape[:-1] + (V,))                                        # row-major [V/g, g] = [V]


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel [in, out] (the transpose of a torch Linear weight)."""

    def __init__(self, din, dout, names, *, bias: bool, dtype, param_dtype, rngs, std: float):
        self.kernel = param(rngs, (din, dout), names, param_dtype, std=std)
        self.bias = param(rngs, (dout,), (names[1],), param_dtype, init="zeros") if bias else None
        self.dtype = dtype

    def __call__(self, x):
        y = linear(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
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

    def __init__(self, vocab, dim, names, *, dtype, param_dtype, rngs, std: float):
        self.embedding = param(rngs, (vocab, dim), names, param_dtype, std=std)
        self.dtype = dtype

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
