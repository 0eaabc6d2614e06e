"""Codec round trips and box ops against brute-force scalar / raster references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordexp_jax.coord import boxes, codec
from coordexp_jax.data.tokenizer import small_tokenizer, token_ids_from_tokenizer

SETTINGS = settings(max_examples=60, deadline=None)


@pytest.fixture(scope="module")
def tids():
    return token_ids_from_tokenizer(small_tokenizer())


# ----------------------------------------------------------------------------------------------------- codec
@SETTINGS
@given(w=st.integers(2, 5000), h=st.integers(2, 5000), seed=st.integers(0, 2**31 - 1))
def test_pixel_bin_pixel_within_half_bin(w, h, seed):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1, (50, 2)) * [w, h]
    back = codec.bins_to_point_px(codec.point_px_to_bins(pts, w, h), w, h)
    half_bin = 0.5 * np.array([w, h]) / 999
    assert np.all(np.abs(back - pts) <= half_bin + 1e-9)  # 1e-9 px: float64 rounding of pixels <= 5000 (~1e-12)
    # coordexp mode: pixels are x / (W - 1)
    pts_c = rng.uniform(0, 1, (50, 2)) * [w - 1, h - 1]
    back_c = codec.bins_to_point_px(codec.point_px_to_bins(pts_c, w, h, "coordexp"), w, h, "coordexp")
    assert np.all(np.abs(back_c - pts_c) <= 0.5 * np.array([w - 1, h - 1]) / 999 + 1e-9)


def test_edges_and_rounding():
    w, h = 640, 480
    assert np.allclose(codec.bins_to_box_px(np.array([0, 0, 999, 999]), w, h), [0, 0, w, h])
    assert np.allclose(codec.bins_to_box_px(np.array([0, 0, 999, 999]), w, h, "coordexp"), [0, 0, w - 1, h - 1])
    assert codec.box_px_to_bins(np.array([0, 0, w, h]), w, h).tolist() == [0, 0, 999, 999]
    # k = round(999 c), clamped
    c = np.array([-0.3, 0.0, 0.5 / 999, 0.49 / 999, 1.0, 1.7, 0.5])
    assert codec.norm_to_bins(c).tolist() == [0, 0, round(0.5), 0, 999, 999, round(499.5)]
    assert codec.bins_to_norm(np.arange(1000)).tolist() == [k / 999 for k in range(1000)]


def test_coordexp_floor_ceil():
    w, h = 101, 51  # (W-1) = 100, (H-1) = 50
    box = np.array([[10.05, 20.02, 30.05, 40.02], [0, 0, 100, 50], [10, 10, 20, 20]])
    bins = codec.box_px_to_bins(box, w, h, "coordexp")
    v = box / np.array([100, 50, 100, 50]) * 999
    exp = np.stack([np.floor(v[:, 0]), np.floor(v[:, 1]), np.ceil(v[:, 2]), np.ceil(v[:, 3])], 1)
    # exact decimals (10/100*999 = 99.9 exactly representable issues) must not jump a bin
    assert bins.tolist() == np.clip(exp, 0, 999).astype(int).tolist()
    assert bins[1].tolist() == [0, 0, 999, 999]
    # floor/ceil never shrinks the box (1e-9 px: float64 rounding of pixels ~100, ~1e-14)
    dec = codec.bins_to_box_px(bins, w, h, "coordexp")
    assert np.all(dec[:, :2] <= box[:, :2] + 1e-9) and np.all(dec[:, 2:] >= box[:, 2:] - 1e-9)


def test_qwen1000_grid():
    # Qwen3-VL's text grounding grid: q / 1000 with 1000 itself the far edge (fractions.Fraction as the exact
    # reference: q / 1000 is the float nearest the rational, and rounding 1000 c is checked on exact halves).
    from fractions import Fraction

    q = np.arange(1001)
    c = codec.qwen1000_to_norm(q)
    assert c.dtype == np.float64 and all(float(Fraction(int(k), 1000)) == v for k, v in zip(q, c))
    np.testing.assert_array_equal(codec.norm_to_qwen1000(c), q)  # exact round trip on the grid
    np.testing.assert_array_equal(codec.norm_to_qwen1000(np.array([-0.2, 1.3, 0.0005, 0.0015])), [0, 1000, 0, 2])
    w, h = 640, 480
    np.testing.assert_array_equal(codec.qwen1000_to_px(np.array([0, 0, 1000, 1000]), w, h), [0, 0, w, h])
    np.testing.assert_array_equal(codec.qwen1000_to_px(np.array([0, 0, 1000, 1000]), w, h, "coordexp"),
                                  [0, 0, w - 1, h - 1])
    # pixels -> q -> pixels within half a grid step (q = round(1000 x / W)); 1e-9 px: float64 rounding of x/W*1000
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1, (200, 4)) * [w, h, w, h]
    back = codec.qwen1000_to_px(codec.px_to_qwen1000(pts, w, h), w, h)
    assert np.all(np.abs(back - pts) <= 0.5 * np.array([w, h, w, h]) / 1000 + 1e-9)
    # the grid is not the bins': q / 1000 != q / 999 except at 0
    assert np.all(codec.qwen1000_to_norm(q[1:1000]) != codec.bins_to_norm(q[1:1000]))
    # jax in, jax out, same values: XLA may divide by multiplying with the reciprocal, so within one float32 ulp
    # at 1 (2^-23) of the correctly rounded q / 1000, on any CPU
    cj = codec.qwen1000_to_norm(jnp.arange(1001))
    assert isinstance(cj, jax.Array) and cj.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(cj), (np.arange(1001) / 1000).astype(np.float32), rtol=0, atol=2**-23)
    np.testing.assert_array_equal(np.asarray(codec.norm_to_qwen1000(cj)), q)


def test_ids_and_jax(tids):
    k = np.array([0, 5, 999])
    ids = codec.bins_to_ids(k, tids)
    assert ids.tolist() == [tids.coord_id(0), tids.coord_id(5), tids.coord_id(999)]
    assert codec.ids_to_bins(np.array([ids[1], tids.coord_wildcard, tids.im_end]), tids).tolist() == [5, -1, -1]
    with pytest.raises(ValueError, match="out of range"):
        codec.bins_to_ids(np.array([1000]), tids)
    # jnp path, jittable, same values as numpy
    f = jax.jit(lambda b: codec.box_to_bins(codec.pixels_to_norm(b, 640, 480)))
    b = np.array([[12.3, 44.4, 600.1, 470.9]], np.float32)
    assert isinstance(f(jnp.asarray(b)), jax.Array)
    assert f(jnp.asarray(b)).tolist() == codec.box_px_to_bins(b.astype(np.float64), 640, 480).tolist()
    with pytest.raises(ValueError, match="mode"):
        codec.pixels_to_norm(b, 10, 10, mode="pixel")


# ------------------------------------------------------------------------------------------------------ boxes
def ref_iou_giou_ciou(a, b, eps=1e-7):
    """Scalar brute-force reference (plain Python floats)."""
    ax1, ay1, ax2, ay2 = map(float, a)
    bx1, by1, bx2, by2 = map(float, b)
    area_a = max(ax2 - ax1, 0) * max(ay2 - ay1, 0)
    area_b = max(bx2 - bx1, 0) * max(by2 - by1, 0)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = area_a + area_b - inter
    iou = inter / (union + eps)
    cw = max(ax2, bx2) - min(ax1, bx1)
    ch = max(ay2, by2) - min(ay1, by1)
    carea = max(cw, 0) * max(ch, 0)
    giou = iou - (carea - union) / (carea + eps)
    rho2 = ((ax1 + ax2) / 2 - (bx1 + bx2) / 2) ** 2 + ((ay1 + ay2) / 2 - (by1 + by2) / 2) ** 2
    c2 = cw**2 + ch**2 + eps
    v = 4 / math.pi**2 * (math.atan(max(bx2 - bx1, 0) / max(by2 - by1, eps))
                          - math.atan(max(ax2 - ax1, 0) / max(ay2 - ay1, eps))) ** 2
    alpha = v / (1 - iou + v + eps)
    return iou, giou, iou - rho2 / c2 - alpha * v


def raster_iou(a, b, n=40):
    """IoU of integer boxes on an n x n pixel grid."""
    ga = np.zeros((n, n), bool)
    gb = np.zeros((n, n), bool)
    ga[a[1]:a[3], a[0]:a[2]] = True
    gb[b[1]:b[3], b[0]:b[2]] = True
    u = (ga | gb).sum()
    return (ga & gb).sum() / u if u else 0.0


# coordinates on a 1/64 grid: exact in float32, so the float32 jax path can be held to a tight tolerance
_jax_pairwise = jax.jit(lambda a, b: (boxes.pairwise_iou(a, b), boxes.pairwise_giou(a, b), boxes.pairwise_ciou(a, b)))
box_st = st.lists(st.integers(-13, 77).map(lambda i: i / 64), min_size=4, max_size=4)


@settings(max_examples=40, deadline=None)
@given(a=st.lists(box_st, min_size=1, max_size=6), b=st.lists(box_st, min_size=1, max_size=5))
def test_box_ops_vs_scalar_reference(a, b):
    a = np.array(a, np.float64)
    b = np.array(b, np.float64)
    n, m = len(a), len(b)
    ref = np.array([[ref_iou_giou_ciou(x, y) for y in b] for x in a])  # [N, M, 3]
    # numpy float64 vs scalar float64, same formula: ~1e-16 relative. atol 1e-9 for values of order 1 (IoU, GIoU,
    # CIoU of canonical boxes); the default rtol 1e-7 for CIoU's eps-sized denominators of non-canonical boxes
    np.testing.assert_allclose(boxes.pairwise_iou(a, b), ref[..., 0], atol=1e-9)
    np.testing.assert_allclose(boxes.pairwise_giou(a, b), ref[..., 1], atol=1e-9)
    np.testing.assert_allclose(boxes.pairwise_ciou(a, b), ref[..., 2], atol=1e-9)
    # jax float32 path (padded to a fixed shape: one compilation)
    pa = np.zeros((6, 4), np.float32)
    pb = np.zeros((5, 4), np.float32)
    pa[:n], pb[:m] = a, b
    got = _jax_pairwise(pa, pb)
    for k in range(3):
        # float32: grid coordinates, widths and areas are exact, only divisions/arctan round: seen <= 2e-7 on
        # values of order 1 and 1.1e-7 relative on the large CIoU values of non-canonical boxes (AVX2, AVX-512)
        np.testing.assert_allclose(np.asarray(got[k])[:n, :m], ref[..., k], rtol=1e-5, atol=1e-5)
    # elementwise = diagonal of pairwise
    m = min(len(a), len(b))
    np.testing.assert_allclose(boxes.iou(a[:m], b[:m]), ref[np.arange(m), np.arange(m), 0], atol=1e-9)  # as above
    l1 = np.array([[np.abs(x - y).sum() for y in b] for x in a])
    np.testing.assert_allclose(boxes.pairwise_l1(a, b), l1, atol=1e-12)  # float64 sums of 4 grid values: exact
    # canonicalisation: min/max then clamp, per coordinate
    can = boxes.canonicalize(a)
    for x, c in zip(a, can):
        exp = [min(x[0], x[2]), min(x[1], x[3]), max(x[0], x[2]), max(x[1], x[3])]
        assert np.allclose(c, np.clip(exp, 0, 1))


@SETTINGS
@given(st.lists(st.integers(0, 39), min_size=8, max_size=8))
def test_iou_vs_raster(v):
    a = [min(v[0], v[2]), min(v[1], v[3]), max(v[0], v[2]), max(v[1], v[3])]
    b = [min(v[4], v[6]), min(v[5], v[7]), max(v[4], v[6]), max(v[5], v[7])]
    # float64; the 1e-7 eps in the denominator moves IoU by <= 1e-7 for unions >= 1 px
    assert abs(float(boxes.iou(np.array(a, float), np.array(b, float))) - raster_iou(a, b)) < 1e-6


@SETTINGS
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=4, max_size=4))
def test_conversions_round_trip(v):
    b = np.array(v)
    cx = boxes.xyxy_to_cxcywh(b)
    assert np.allclose(cx, [(v[0] + v[2]) / 2, (v[1] + v[3]) / 2, v[2] - v[0], v[3] - v[1]])
    assert np.allclose(boxes.cxcywh_to_xyxy(cx), b)
    wh = boxes.xyxy_to_xywh(b)
    assert np.allclose(wh, [v[0], v[1], v[2] - v[0], v[3] - v[1]])
    assert np.allclose(boxes.xywh_to_xyxy(wh), b)


def test_degenerate_boxes_finite_grads():
    deg = jnp.array([[0.3, 0.3, 0.3, 0.3], [0.5, 0.2, 0.1, 0.9], [0.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.6, 0.6]])
    tgt = jnp.array([[0.3, 0.3, 0.3, 0.3], [0.1, 0.1, 0.4, 0.4], [0.0, 0.0, 0.0, 0.0], [0.2, 0.2, 0.6, 0.6]])
    fns = (boxes.iou, boxes.giou, boxes.ciou)
    grads = jax.jit(lambda d: [jax.grad(lambda p: f(boxes.canonicalize(p), boxes.canonicalize(tgt)).sum())(d)
                               for f in fns])(deg)
    for fn, g in zip(fns, grads):
        assert bool(jnp.all(jnp.isfinite(g))), fn.__name__
    assert float(boxes.iou(deg[0], tgt[0])) == 0.0
    assert bool(boxes.is_valid_norm_box(deg[3])) and not bool(boxes.is_valid_norm_box(deg[1]))
