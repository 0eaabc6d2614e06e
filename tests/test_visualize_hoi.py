"""Attention heatmaps read back: the mass of each visual token lands on the pixels of its 32x32 block (non-square
grids, so a transposed grid fails), the total is kept, a box's attention lies inside the box, and the drawn panels
show the heat where the weights are, the box in its kind's colour and the colour-bar legend."""
import numpy as np
import pytest
from PIL import Image

from coordexp_jax import visualize as V


@pytest.mark.parametrize("size", [(96, 160), (101, 163)])  # (height, width): exact 32 px cells, and uneven ones
def test_token_mass_lands_on_its_block(size):
    rows, cols = 3, 5
    H, W = size
    for r, c in [(0, 0), (1, 3), (2, 4), (2, 0)]:
        w = np.zeros(rows * cols)
        w[r * cols + c] = 1.0  # row-major token order
        heat = V.attention_heat(w, (rows, cols), H, W)
        assert heat.shape == (H, W)
        # the block in pixel centres: rows with floor((y + 0.5) * rows / H) == r (same for columns)
        ys = np.nonzero(((np.arange(H) + 0.5) * rows / H).astype(int) == r)[0]
        xs = np.nonzero(((np.arange(W) + 0.5) * cols / W).astype(int) == c)[0]
        box = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
        # the weight 1 split over <= 34x33 pixels and summed back: float64 rounding ~1e-16 per pixel
        assert V.box_mass(heat, box) == pytest.approx(1.0, abs=1e-12)
        assert heat.sum() == pytest.approx(1.0, abs=1e-12)
        if size == (96, 160):
            assert box == (32 * c, 32 * r, 32 * c + 32, 32 * r + 32)


def test_module_rule_mass_inside_box():
    """Weights spread over the tokens whose block centre lies inside a box (the module's mask): all the drawn mass
    lies inside the box when its edges fall on block edges, and inside the box grown by one block otherwise."""
    rows, cols, H, W = 4, 6, 128, 192
    rng = np.random.default_rng(0)
    for box in [(32, 0, 128, 64), (40, 20, 100, 90), (0, 70, 192, 128)]:
        cx = (np.arange(cols) + 0.5) * 32
        cy = (np.arange(rows) + 0.5) * 32
        inside = ((cy >= box[1]) & (cy <= box[3]))[:, None] & ((cx >= box[0]) & (cx <= box[2]))[None, :]
        w = np.where(inside.reshape(-1), rng.uniform(0.1, 1, rows * cols), 0.0)
        w /= w.sum()
        heat = V.attention_heat(w, (rows, cols), H, W)
        grown = (box[0] - 32, box[1] - 32, box[2] + 32, box[3] + 32)
        assert V.box_mass(heat, grown) == pytest.approx(1.0, abs=1e-12)
        if all(v % 32 == 0 for v in box):
            assert V.box_mass(heat, box) == pytest.approx(1.0, abs=1e-12)


def test_heat_errors():
    with pytest.raises(ValueError, match="6 attention weights for a 2x2"):
        V.attention_heat(np.ones(6), (2, 2), 64, 64)
    with pytest.raises(ValueError, match="smaller than"):
        V.attention_heat(np.ones(4), (2, 2), 1, 64)


def _scene():
    img = Image.new("RGB", (192, 128), (128, 128, 128))  # 4x6 blocks of 32 px; min_side 192 keeps scale 1
    w = np.zeros(24)
    w[1 * 6 + 4] = 1.0  # the block at rows 32..64, columns 128..160
    return img, w


def test_draw_attention_heat_and_box():
    img, w = _scene()
    box = (120, 24, 168, 72)
    a = np.asarray(V.draw_attention(img, w, (4, 6), box, kind=0, min_side=192)).astype(int)
    assert a.shape == (128, 192, 3)
    hot = a[40:56, 136:152]  # inside the weighted block, away from the outline
    cold = a[90:120, 10:60]
    assert np.all(cold == round(128 * 0.4))  # no attention: the image dimmed to 40 %
    assert hot.mean() > 150 and np.all(hot[..., 0] > hot[..., 2])  # inferno's top: light yellow
    # the person box (kind 0): the light green band just inside its left edge, halo black around it
    st = V.style_for(192, 128)
    assert tuple(a[60, box[0]]) == V.GT_COLOUR and tuple(a[60, box[0] - 1]) == V.HALO_COLOUR
    assert tuple(a[60, box[0] + st.line]) == V.HALO_COLOUR


def test_draw_attention_panels_side_by_side():
    img, w = _scene()
    panels = [{"weights": w, "box": (120, 24, 168, 72), "kind": 0},
              {"weights": w[::-1], "box": (0, 40, 60, 110), "kind": 1},
              {"weights": (w + w[::-1]) / 2, "box": (0, 24, 168, 110), "kind": 2}]
    out = V.draw_attention_panels(img, panels, (4, 6), min_side=192)
    st = V.style_for(192, 128)
    gap = max(4, 2 * st.line)
    assert out.width == 4 * 192 + 3 * gap and out.height > 128
    a = np.asarray(out).astype(int)
    # first tile: the undimmed image with all three boxes in their colours
    assert tuple(a[100, 30]) == (128, 128, 128)
    assert tuple(a[90, 0]) in (V.PRED_COLOUR, V.FP_COLOUR)  # object and interaction share the left edge
    assert tuple(a[60, 120]) == V.GT_COLOUR
    # the object panel (third tile) is hot where w[::-1] is: block (2, 1) -> rows 64..96, columns 32..64
    x0 = 2 * (192 + gap)
    assert a[72:88, x0 + 40:x0 + 56].mean() > 150
    # legend strip: white with the colour bar's dark start and light end
    legend = a[128:]
    assert (legend == 255).all(-1).mean() > 0.5
