"""The one coordinate codec: pixels <-> normalised c in [0, 1] <-> bins k <-> token ids.

Definitions (`../shared/reference/coordexp_method.md` §2):
- bins: k = clamp(round(999 c), 0, 999), c = k / 999 (`round` is round-half-to-even, as numpy/jnp/Python do);
- pixels, `mode="continuous"` (default, COCO): c = x / W, c = y / H; a full-image box is [0, 0, W, H];
- pixels, `mode="coordexp"` (data written by the CoordExp project): c = x / (W - 1), c = y / (H - 1), and when a
  BOX is quantised x1, y1 are floored and x2, y2 ceiled (`box_to_bins(..., mode="coordexp")`).

Qwen3-VL's own text grounding grid ("qwen1000", `coordexp_method.md` §2) is a separate scale, never mixed with
the bins: integers q = clamp(round(1000 c), 0, 1000), c = q / 1000 (1001 values, 1000 included). It is what a
released, unexpanded Qwen3-VL checkpoint writes as text (`protocols`' `qwen_text`) and what `box_format:
qwen1000` data holds. Quantisation always rounds (the coordexp floor/ceil rule is for bins); `mode` only sets the
pixel extent.

Every function accepts numpy arrays (returns numpy) or jax arrays / tracers (returns jax arrays), so the same
code serves the host-side data pipeline and jitted losses. Boxes are (x1, y1, x2, y2) in the last axis;
point arrays are (x, y) in the last axis; both are interleaved x, y, so the pixel functions take either.
"""

from __future__ import annotations

import numpy as np

NUM_BINS = 1000
MAX_BIN = NUM_BINS - 1  # 999
MODES = ("continuous", "coordexp")
QWEN_SCALE = 1000  # qwen1000: q in 0..1000, c = q / 1000
# Slack against float error when flooring/ceiling in the coordexp mode (999 * x / (W - 1) may land a hair
# above an integer that is exact in decimal).
_QUANT_EPS = 1e-6


def _xp(*arrays):
    """numpy for host data, jax.numpy when any argument is a jax array or tracer."""
    for a in arrays:
        if type(a).__module__.startswith("jax") or hasattr(a, "aval"):
            import jax.numpy as jnp

            return jnp
    return np


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"codec mode must be one of {MODES}, got {mode!r}")


def _float(xp, x):
    x = xp.asarray(x)
    return x if xp.issubdtype(x.dtype, xp.floating) else x.astype(xp.float32 if xp is not np else np.float64)


def _scale(xp, width, height, n: int, dtype):
    """[n] of (W, H, W, H, ...) as the divisor for interleaved x, y."""
    return xp.asarray([width, height] * (n // 2), dtype=dtype)


def _pixel_extent(width, height, mode: str):
    _check_mode(mode)
    if mode == "continuous":
        return width, height
    return width - 1, height - 1


def pixels_to_norm(v_px, width, height, mode: str = "continuous"):
    """Pixel coordinates -> normalised, `[..., 2n]` interleaved x, y (points `[...,2]`, boxes `[...,4]`).

    No clamping: out-of-image pixels give c outside [0, 1] (quantisation clamps).
    """
    xp = _xp(v_px)
    v = _float(xp, v_px)
    if v.shape[-1] % 2:
        raise ValueError(f"pixels_to_norm expects interleaved x, y in the last axis, got shape {v.shape}")
    w, h = _pixel_extent(width, height, mode)
    if w <= 0 or h <= 0:
        raise ValueError(f"image size too small for mode {mode!r}: width={width}, height={height}")
    return v / _scale(xp, w, h, v.shape[-1], v.dtype)


def norm_to_pixels(v, width, height, mode: str = "continuous"):
    """Normalised coordinates -> pixels, `[..., 2n]` interleaved x, y. Inverse of `pixels_to_norm`."""
    xp = _xp(v)
    v = _float(xp, v)
    if v.shape[-1] % 2:
        raise ValueError(f"norm_to_pixels expects interleaved x, y in the last axis, got shape {v.shape}")
    w, h = _pixel_extent(width, height, mode)
    return v * _scale(xp, w, h, v.shape[-1], v.dtype)


def norm_to_bins(c):
    """c -> k = clamp(round(999 c), 0, 999) as int32 (any shape)."""
    xp = _xp(c)
    c = _float(xp, c)
    return xp.clip(xp.rint(c * MAX_BIN), 0, MAX_BIN).astype(xp.int32)


def bins_to_norm(k, dtype=None):
    """k -> c = k / 999 (any shape; float32 for jax, float64 for numpy unless `dtype`)."""
    xp = _xp(k)
    dtype = dtype or (np.float64 if xp is np else xp.float32)
    return xp.asarray(k).astype(dtype) / MAX_BIN


def box_to_bins(box, mode: str = "continuous"):
    """Normalised box `[..., 4]` -> bins `[..., 4]` int32.

    `continuous`: round each coordinate. `coordexp`: floor x1, y1 and ceil x2, y2 (the box never shrinks).
    """
    _check_mode(mode)
    xp = _xp(box)
    b = _float(xp, box)
    if b.shape[-1] != 4:
        raise ValueError(f"box_to_bins expects boxes [..., 4], got shape {b.shape}")
    if mode == "continuous":
        return norm_to_bins(b)
    v = b * MAX_BIN
    lo = xp.floor(v[..., :2] + _QUANT_EPS)
    hi = xp.ceil(v[..., 2:] - _QUANT_EPS)
    return xp.clip(xp.concatenate([lo, hi], axis=-1), 0, MAX_BIN).astype(xp.int32)


def bins_to_box(bins, dtype=None):
    """Bins `[..., 4]` -> normalised box `[..., 4]` (k / 999)."""
    return bins_to_norm(bins, dtype)


def box_px_to_bins(box_px, width, height, mode: str = "continuous"):
    """Pixel box `[..., 4]` -> bins `[..., 4]` with the mode's pixel convention and quantisation."""
    return box_to_bins(pixels_to_norm(box_px, width, height, mode), mode)


def bins_to_box_px(bins, width, height, mode: str = "continuous"):
    """Bins `[..., 4]` -> pixel box `[..., 4]`. Bin 0 decodes to 0, bin 999 to W (continuous) or W - 1."""
    return norm_to_pixels(bins_to_box(bins), width, height, mode)


def point_px_to_bins(pt_px, width, height, mode: str = "continuous"):
    """Pixel points `[..., 2]` -> bins `[..., 2]` (rounded in both modes)."""
    return norm_to_bins(pixels_to_norm(pt_px, width, height, mode))


def bins_to_point_px(bins, width, height, mode: str = "continuous"):
    """Bins `[..., 2]` -> pixel points `[..., 2]`."""
    return norm_to_pixels(bins_to_norm(bins), width, height, mode)


def norm_to_qwen1000(c):
    """c -> q = clamp(round(1000 c), 0, 1000) as int32 (any shape; Qwen3-VL's text grounding grid)."""
    xp = _xp(c)
    c = _float(xp, c)
    return xp.clip(xp.rint(c * QWEN_SCALE), 0, QWEN_SCALE).astype(xp.int32)


def qwen1000_to_norm(q, dtype=None):
    """q -> c = q / 1000 (any shape; float32 for jax, float64 for numpy unless `dtype`). No range check."""
    xp = _xp(q)
    dtype = dtype or (np.float64 if xp is np else xp.float32)
    return xp.asarray(q).astype(dtype) / QWEN_SCALE


def px_to_qwen1000(v_px, width, height, mode: str = "continuous"):
    """Pixel coordinates `[..., 2n]` (interleaved x, y: points or boxes) -> qwen1000 ints, rounded and clamped."""
    return norm_to_qwen1000(pixels_to_norm(v_px, width, height, mode))


def qwen1000_to_px(q, width, height, mode: str = "continuous"):
    """qwen1000 ints `[..., 2n]` -> pixels: 0 -> 0, 1000 -> W (continuous) or W - 1 (coordexp)."""
    return norm_to_pixels(qwen1000_to_norm(q), width, height, mode)


def bins_to_ids(bins, token_ids):
    """Bins -> token ids (`token_ids.coord_start + k`); raises on bins outside 0..999 for host arrays."""
    xp = _xp(bins)
    k = xp.asarray(bins)
    if xp is np and k.size and (k.min() < 0 or k.max() > MAX_BIN):
        raise ValueError(f"bins out of range 0..{MAX_BIN}: min {k.min()}, max {k.max()}")
    return (k + token_ids.coord_start).astype(xp.int32)


def ids_to_bins(ids, token_ids):
    """Token ids -> bins; -1 where the id is not a bin token."""
    xp = _xp(ids)
    ids = xp.asarray(ids)
    k = ids - token_ids.coord_start
    return xp.where((k >= 0) & (k <= MAX_BIN), k, -1).astype(xp.int32)


def is_coord_id(ids, token_ids):
    """True where ids are bin tokens (the wildcard is not a bin)."""
    xp = _xp(ids)
    ids = xp.asarray(ids)
    return (ids >= token_ids.coord_start) & (ids < token_ids.coord_start + NUM_BINS)
