"""Box operations: format conversions, canonicalisation, IoU / GIoU / CIoU (elementwise and pairwise).

Boxes are `[..., 4]`; xyxy = (x1, y1, x2, y2) unless a name says otherwise. Functions take numpy arrays (and
return numpy) or jax arrays / tracers (and return jax arrays). Elementwise ops broadcast their two arguments;
`pairwise_*` take `[N, 4]` and `[M, 4]` (with optional leading batch axes shared by both) and return `[..., N, M]`.

Degenerate boxes: areas are clipped at 0 and every division has an `eps` in the denominator, so IoU of two
empty boxes is 0 and gradients stay finite. Inverted boxes (x2 < x1) have zero area unless canonicalised first;
the IoU losses canonicalise (`canonicalize`) before calling these.
"""

from __future__ import annotations

import math

import numpy as np

from coordexp_jax.coord.codec import _xp

EPS = 1e-7


def _split(b):
    return b[..., 0], b[..., 1], b[..., 2], b[..., 3]


def xyxy_to_cxcywh(b):
    xp = _xp(b)
    x1, y1, x2, y2 = _split(xp.asarray(b))
    return xp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(b):
    xp = _xp(b)
    cx, cy, w, h = _split(xp.asarray(b))
    return xp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_xywh(b):
    xp = _xp(b)
    x1, y1, x2, y2 = _split(xp.asarray(b))
    return xp.stack([x1, y1, x2 - x1, y2 - y1], axis=-1)


def xywh_to_xyxy(b):
    xp = _xp(b)
    x, y, w, h = _split(xp.asarray(b))
    return xp.stack([x, y, x + w, y + h], axis=-1)


def canonicalize(b, clamp: bool = True, lo: float = 0.0, hi: float = 1.0):
    """(min(x1,x2), min(y1,y2), max(x1,x2), max(y1,y2)), then clamped to [lo, hi] (normalised: [0, 1])."""
    xp = _xp(b)
    x1, y1, x2, y2 = _split(xp.asarray(b))
    out = xp.stack([xp.minimum(x1, x2), xp.minimum(y1, y2), xp.maximum(x1, x2), xp.maximum(y1, y2)], axis=-1)
    return xp.clip(out, lo, hi) if clamp else out


def area(b):
    """Area with negative extents clipped to 0: `[..., 4] -> [...]`."""
    xp = _xp(b)
    x1, y1, x2, y2 = _split(xp.asarray(b))
    return xp.maximum(x2 - x1, 0) * xp.maximum(y2 - y1, 0)


def _inter_union(a, b, xp):
    ax1, ay1, ax2, ay2 = _split(a)
    bx1, by1, bx2, by2 = _split(b)
    iw = xp.maximum(xp.minimum(ax2, bx2) - xp.maximum(ax1, bx1), 0)
    ih = xp.maximum(xp.minimum(ay2, by2) - xp.maximum(ay1, by1), 0)
    inter = iw * ih
    union = area(a) + area(b) - inter
    return inter, union


def _enclosing(a, b, xp):
    """Width and height of the smallest enclosing box (negative only when both boxes are inverted)."""
    ax1, ay1, ax2, ay2 = _split(a)
    bx1, by1, bx2, by2 = _split(b)
    return xp.maximum(ax2, bx2) - xp.minimum(ax1, bx1), xp.maximum(ay2, by2) - xp.minimum(ay1, by1)


def iou(a, b, eps: float = EPS):
    """IoU of corresponding boxes (broadcast): `[..., 4], [..., 4] -> [...]`."""
    xp = _xp(a, b)
    a, b = xp.asarray(a), xp.asarray(b)
    inter, union = _inter_union(a, b, xp)
    return inter / (union + eps)


def giou(a, b, eps: float = EPS):
    """Generalised IoU = IoU - (|C| - |A u B|) / |C|, C the smallest enclosing box. In [-1, 1]."""
    xp = _xp(a, b)
    a, b = xp.asarray(a), xp.asarray(b)
    inter, union = _inter_union(a, b, xp)
    cw, ch = _enclosing(a, b, xp)
    c_area = xp.maximum(cw, 0) * xp.maximum(ch, 0)
    return inter / (union + eps) - (c_area - union) / (c_area + eps)


def ciou(a, b, eps: float = EPS, stop_alpha_grad: bool = True):
    """Complete IoU = IoU - rho^2 / c^2 - alpha v (Zheng et al. 2020).

    rho: distance between centres, c: diagonal of the enclosing box, v = 4/pi^2 (atan(w_b/h_b) - atan(w_a/h_a))^2,
    alpha = v / (1 - IoU + v). As in torchvision's `complete_box_iou_loss`, alpha is treated as a constant in
    the gradient (`stop_alpha_grad`, jax inputs only). Heights are floored at `eps` inside the aspect ratio so that
    degenerate boxes keep finite values and gradients.
    """
    xp = _xp(a, b)
    a, b = xp.asarray(a), xp.asarray(b)
    inter, union = _inter_union(a, b, xp)
    u = inter / (union + eps)
    cw, ch = _enclosing(a, b, xp)
    c2 = cw**2 + ch**2 + eps
    ax1, ay1, ax2, ay2 = _split(a)
    bx1, by1, bx2, by2 = _split(b)
    rho2 = ((ax1 + ax2 - bx1 - bx2) / 2) ** 2 + ((ay1 + ay2 - by1 - by2) / 2) ** 2
    wa, ha = xp.maximum(ax2 - ax1, 0), xp.maximum(ay2 - ay1, eps)
    wb, hb = xp.maximum(bx2 - bx1, 0), xp.maximum(by2 - by1, eps)
    v = (4 / math.pi**2) * (xp.arctan(wb / hb) - xp.arctan(wa / ha)) ** 2
    alpha = v / (1 - u + v + eps)
    if stop_alpha_grad and xp is not np:
        import jax

        alpha = jax.lax.stop_gradient(alpha)
    return u - rho2 / c2 - alpha * v


def pairwise_iou(a, b, eps: float = EPS):
    """`[..., N, 4], [..., M, 4] -> [..., N, M]`."""
    xp = _xp(a, b)
    return iou(xp.asarray(a)[..., :, None, :], xp.asarray(b)[..., None, :, :], eps)


def pairwise_iou_exact(a, b) -> np.ndarray:
    """Host-side IoU with no epsilon, for thresholds that must hold exactly (IoU >= 0.5 in evaluation):
    `[N, 4], [M, 4] -> [N, M]` float64; pairs with zero union give 0. Inverted boxes have zero area."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def pairwise_giou(a, b, eps: float = EPS):
    """`[..., N, 4], [..., M, 4] -> [..., N, M]`."""
    xp = _xp(a, b)
    return giou(xp.asarray(a)[..., :, None, :], xp.asarray(b)[..., None, :, :], eps)


def pairwise_ciou(a, b, eps: float = EPS):
    """`[..., N, 4], [..., M, 4] -> [..., N, M]`."""
    xp = _xp(a, b)
    return ciou(xp.asarray(a)[..., :, None, :], xp.asarray(b)[..., None, :, :], eps)


def pairwise_l1(a, b):
    """Sum of absolute coordinate differences: `[..., N, 4], [..., M, 4] -> [..., N, M]`."""
    xp = _xp(a, b)
    return xp.abs(xp.asarray(a)[..., :, None, :] - xp.asarray(b)[..., None, :, :]).sum(-1)


def is_valid_norm_box(b):
    """Finite, inside [0, 1], x2 > x1 and y2 > y1: `[..., 4] -> [...] bool`."""
    xp = _xp(b)
    b = xp.asarray(b)
    x1, y1, x2, y2 = _split(b)
    return xp.all(xp.isfinite(b), -1) & xp.all((b >= 0) & (b <= 1), -1) & (x2 > x1) & (y2 > y1)
