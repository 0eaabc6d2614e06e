"""Pictures read back pixel by pixel: hits, misses and false positives at known places in their colours, labels and
lines that grow with the picture, lines visible on any background, the legend."""
import numpy as np
import pytest
from PIL import Image

from coordexp_jax import metrics as M
from coordexp_jax import visualize as V
from coordexp_jax.data.synthetic import PALETTE

GREY = (128, 128, 128)
BOX_COLOURS = (V.GT_COLOUR, V.MISS_COLOUR, V.PRED_COLOUR, V.FP_COLOUR)


def _scene(bg=GREY, legend=False):
    """64x64 image upscaled 2x (min_side 128): one hit (pred on gt), one miss, one false positive."""
    img = Image.new("RGB", (64, 64), bg)
    gt = [{"desc": "cat", "bbox": [8, 8, 32, 24]}, {"desc": "dog", "bbox": [40, 30, 60, 44]}]
    pred = [{"desc": "cat", "bbox": [8, 8, 32, 24], "score": 0.5}, {"desc": "cat", "bbox": [40, 14, 60, 26],
                                                                     "score": 0.25}]
    return np.asarray(V.draw_prediction(img, pred, gt, min_side=128, legend=legend)), V.style_for(128, 128)


def test_hit_miss_and_false_positive_in_their_colours():
    a, st = _scene()
    assert a.shape == (128, 128, 3) and (st.line, st.halo) == (2, 1)
    w, h = st.line, st.halo
    # hit prediction (box x 16..64, y 16..48 after the 2x upscale): solid light blue just inside its left edge,
    # black halo on both sides of the band
    assert all(tuple(a[y, 16 + k]) == V.PRED_COLOUR for y in range(24, 44) for k in range(w))
    assert tuple(a[32, 16 - 1]) == V.HALO_COLOUR and tuple(a[32, 16 + w]) == V.HALO_COLOUR
    # its ground truth: dashed light green band just outside (columns 16-h-w .. 16-h-1): dashes and black gaps
    band = {tuple(a[y, 16 - h - w]) for y in range(20, 44)}
    assert band == {V.GT_COLOUR, V.HALO_COLOUR}
    # the miss (x 80..120, y 60..88): dashed light orange outside its left edge, nothing inside is coloured
    band = {tuple(a[y, 80 - h - w]) for y in range(62, 86)}
    assert band == {V.MISS_COLOUR, V.HALO_COLOUR}
    assert tuple(a[75, 100]) == GREY
    # the false positive (x 80..120, y 28..52): solid pink just inside its right edge
    assert all(tuple(a[y, 120 - k]) == V.FP_COLOUR for y in range(32, 50) for k in range(w))
    # labels: the hit's prediction label above its box, its ground-truth label under it, both visible
    above = {tuple(a[y, 20]) for y in range(0, 16 - h - 1)}
    below = {tuple(a[y, 16]) for y in range(48 + 2 * h + w + 1, 62)}
    assert V.PRED_COLOUR in above and V.GT_COLOUR in below


def test_without_ground_truth_nothing_is_a_false_positive():
    img = Image.new("RGB", (64, 48), GREY)
    a = np.asarray(V.draw_prediction(img, [{"desc": "cat", "bbox": [40, 2, 60, 14]}], min_side=128, legend=False))
    assert tuple(a[20, 120]) == V.PRED_COLOUR
    assert not any((a == c).all(-1).any() for c in (V.FP_COLOUR, V.MISS_COLOUR, V.GT_COLOUR))


def test_a_box_with_nan_is_left_out():
    img = Image.new("RGB", (64, 48), GREY)
    pred = [{"desc": "cat", "bbox": [float("nan"), 2, 60, 14]}, {"desc": "cat", "bbox": [40, 2, 60, 14]}]
    a = np.asarray(V.draw_prediction(img, pred, min_side=128, legend=False))
    assert tuple(a[20, 120]) == V.PRED_COLOUR


def test_a_given_match_is_used():
    img = Image.new("RGB", (64, 48), GREY)
    pred = [{"desc": "cat", "bbox": [8, 8, 32, 24]}]
    gt = [{"desc": "cat", "bbox": [8, 8, 32, 24]}]
    forced = M.ImageMatch(pred_to_gt=np.array([-1]), gt_matched=np.array([False]), ious=np.array([np.nan]),
                          tp=0, fp=1, fn=1, mean_iou=float("nan"))
    a = np.asarray(V.draw_prediction(img, pred, gt, forced, min_side=128, legend=False))
    assert tuple(a[32, 16]) == V.FP_COLOUR and V.MISS_COLOUR in {tuple(a[y, 13]) for y in range(20, 44)}


def _label_height(side: int) -> int:
    """Height in pixels of the label of one prediction on a white side x side picture: the non-white rows above the
    box in a column through the label."""
    img = Image.new("RGB", (side, side), (255, 255, 255))
    box = [side * 0.3, side * 0.5, side * 0.7, side * 0.8]
    a = np.asarray(V.draw_prediction(img, [{"desc": "cat", "bbox": box, "score": 0.5}], min_side=0, legend=False))
    st = V.style_for(side, side)
    col = a[: round(box[1]) - st.halo, round(box[0]) + 1]
    return int((col != 255).any(-1).sum())


def test_labels_and_lines_grow_with_the_picture():
    small, large = _label_height(512), _label_height(2048)
    # font 16 px at 512, 64 px at 2048 (style_for): the label's coloured height grows ~4x (padding and the
    # font's ascent/descent round to whole pixels, hence the margin)
    assert 3.0 * small < large < 5.0 * small, (small, large)
    s1, s2 = V.style_for(512, 512), V.style_for(2048, 2048)
    assert s2.line >= 3 * s1.line and s2.font_size == 4 * s1.font_size
    # a small image is upscaled so its longer side is min_side: labels keep a legible size
    out = V.draw_prediction(Image.new("RGB", (32, 24)), [{"desc": "x", "bbox": [1, 1, 9, 9]}], legend=False)
    assert out.size == (512, 384)


@pytest.mark.parametrize("bg", list(PALETTE.values()) + list(BOX_COLOURS) + [(0, 0, 0), (255, 255, 255)])
def test_outlines_stand_out_on_any_background(bg):
    """On a plain background of any synthetic-shape colour, of our own colours, black or white, each outline holds
    a pixel far from the background (the light colour on dark ones, the black halo on light ones)."""
    a, st = _scene(bg)
    dist = lambda px: float(np.linalg.norm(np.asarray(px, float) - bg))
    for y, xs in ((32, range(16 - 2 * st.halo - st.line, 16 + st.line + st.halo)),  # gt + pred of the hit
                  (70, range(80 - 2 * st.halo - st.line, 80)),  # miss
                  (40, range(120 - st.line - st.halo + 1, 120 + st.halo + 1))):  # false positive
        # RGB distance (white-black is 441; the darkest shape colour, green, is 183 from black): rows y..y+11
        # span a dash and a gap of the dashed outlines
        assert max(dist(a[yy, x]) for x in xs for yy in range(y, y + 12)) > 150, (bg, y)


def test_box_colours_differ_from_the_shapes_and_each_other():
    pal = np.array(list(PALETTE.values()), float)
    ours = np.array(BOX_COLOURS, float)
    # Euclidean RGB distance: > 100 (of 441) keeps a light tint apart from the saturated shape colours
    assert np.linalg.norm(ours[:, None] - pal[None], axis=-1).min() > 100
    d = np.linalg.norm(ours[:, None] - ours[None], axis=-1)
    assert d[~np.eye(len(ours), dtype=bool)].min() > 100


def test_legend_strip_and_html():
    a, _ = _scene(legend=True)
    assert a.shape[0] > 128  # the strip sits under the picture
    strip = a[128:]
    assert all((strip == c).all(-1).any() for c in BOX_COLOURS)
    img = Image.new("RGB", (64, 48), GREY)
    b = np.asarray(V.draw_prediction(img, [{"desc": "x", "bbox": [1, 1, 9, 9], "score": 0.3}], min_side=128))
    assert (b[96:] == V.PRED_COLOUR).all(-1).any()
    assert not any((b[96:] == c).all(-1).any() for c in (V.FP_COLOUR, V.MISS_COLOUR, V.GT_COLOUR))
    page = V.legend_html()
    assert all(V._hex(c) in page for c in BOX_COLOURS) and "coordinate tokens" in page


def test_html_page(tmp_path):
    a, _ = _scene(legend=True)
    Image.fromarray(a).save(tmp_path / "x.png")
    page = V.write_html(str(tmp_path), [{"image": "x.png", "caption": "<b>1</b>"}], summary={"AP50": 0.5})
    text = open(page).read()
    assert "x.png" in text and "&lt;b&gt;1&lt;/b&gt;" in text and "0.5000" in text and V._hex(V.FP_COLOUR) in text
