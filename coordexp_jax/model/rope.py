"""Rotary embeddings as pure functions: interleaved M-RoPE for the text (spec §3.3), axial 2-D RoPE for the ViT (§2.4)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def inv_freq(theta: float, dim: int) -> jnp.ndarray:
    """1 / theta^(arange(0, dim, 2)/dim) in float32, [dim/2] (computed as HF does)."""
    exps = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return jnp.asarray((1.0 / (np.float32(theta) ** exps)).astype(np.float32))


def mrope_axis_map(head_dim: int, mrope_section) -> np.ndarray:
    """For each of the head_dim/2 frequencies, which position axis (0=t, 1=h, 2=w) drives it (interleaved layout)."""
    j = np.arange(head_dim // 2)
    axis = np.zeros_like(j)
    axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    return axis


def mrope_cos_sin(positions, head_dim: int, theta: float, mrope_section, dtype):
    """positions [3,...] int -> cos, sin [..., head_dim] in `dtype` (computed in float32, then cast, as HF)."""
    inv = inv_freq(theta, head_dim)  # [hd/2]
    axis = mrope_axis_map(head_dim, mrope_section)
    pos = positions.astype(jnp.float32)  # [3, ...]
    sel = pos[axis]  # [hd/2, ...]: the position driving each frequency
    freq = jnp.moveaxis(sel, 0, -1) * inv  # [..., hd/2]
    emb = jnp.concatenate([freq, freq], -1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], -1)


def apply_rope(x, cos, sin):
    """x [..., heads, hd]; cos/sin broadcastable to [..., 1, hd]."""
    return x * cos + rotate_half(x) * sin


def vision_cos_sin(rc, head_dim: int, theta: float):
    """rc [..., 2] (row, col) -> float32 cos, sin [..., head_dim], layout [row | col | row | col] (spec §2.4)."""
    inv = inv_freq(theta, head_dim // 2)  # [hd/4]
    rcf = rc.astype(jnp.float32)
    ang = jnp.concatenate([rcf[..., 0:1] * inv, rcf[..., 1:2] * inv], -1)  # [..., hd/2]
    emb = jnp.concatenate([ang, ang], -1)
    return jnp.cos(emb), jnp.sin(emb)
