"""The sequential counting driver with stand-in models (an oracle, a repeater, a broken one) and the pictures."""

import numpy as np
import pytest

from coordexp_jax import counting
from coordexp_jax import metrics as M
from coordexp_jax.data import counting as C
from coordexp_jax.data import synthetic as S
from coordexp_jax.data.records import parse_record

CFG = S.SyntheticConfig(image_size=(128, 160), classes=("circle",), min_objects=1, max_objects=12,
                        min_size_frac=0.08, max_size_frac=0.16, max_overlap=0.0, clutter=3)


@pytest.fixture(scope="module")
def scenes():
    out = []
    for i in range(8):
        img, objs = S.make_image(np.random.default_rng([7, i]), CFG)
        boxes = np.array([o["box"] for o in objs], float).reshape(-1, 4)
        out.append((img, boxes))
    return out


def _oracle(seq, w, h, cfg, log=None):
    """A stand-in model: reads how many marks the prompt states and answers the next true centre, then done.
    It also checks that the image it is given carries exactly the marks of the points counted so far."""
    def predict_next(marked, prompt):
        k = int(prompt.split(". ")[1].split(" ")[0])
        if log is not None:
            log.append((marked.copy(), prompt))
        if k >= len(seq):
            return (-1.0, -1.0)
        return tuple(C.normalise_points(seq[k], w, h, cfg.normalisation))
    return predict_next


def test_oracle_counts_exactly(scenes):
    cfg = C.SequentialCountingConfig()
    for img, boxes in scenes:
        h, w = img.shape[:2]
        gt = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
        seq, _ = C.ordered_geometry(gt, boxes, cfg)
        log = []
        res = counting.count_sequentially(img, "circle", _oracle(seq, w, h, cfg, log), cfg, max_count=16)
        assert res.count == len(gt) and res.done_reason == "done" and res.steps == len(gt) + 1
        # the points come back through normalise -> denormalise (float64; 1e-9 px)
        np.testing.assert_allclose(res.points, seq, atol=1e-9)
        style = C.mark_style(h, w)
        for k, (marked, prompt) in enumerate(log):  # step k sees the first k points marked, and says so
            np.testing.assert_array_equal(marked, C.draw_marks(img, seq[:k], style=style))
            assert prompt == C.counting_prompt("circle", k, cfg)
        m = M.sequential_point_metrics(res.points, gt, boxes)
        assert m["hit_rate"] == 1.0 and m["mean_point_error_px"] < 1e-9


def test_max_count_stops_the_loop(scenes):
    img, boxes = scenes[0]
    h, w = img.shape[:2]
    cfg = C.SequentialCountingConfig(stop_on_repeat=False)
    pts = iter(np.random.default_rng(0).uniform(-0.9, 0.9, (50, 2)))
    res = counting.count_sequentially(img, "circle", lambda m, p: next(pts), cfg, max_count=5)
    assert (res.count, res.steps, res.done_reason) == (5, 5, "max_count")
    assert counting.count_sequentially(img, "circle", lambda m, p: (0, 0), cfg, max_count=0).steps == 0


def test_repeat_and_invalid_stops(scenes):
    img, _ = scenes[0]
    cfg = C.SequentialCountingConfig()
    res = counting.count_sequentially(img, "circle", lambda m, p: (0.1, 0.2), cfg, max_count=10)
    assert (res.count, res.steps, res.done_reason) == (1, 2, "repeat")
    off = C.SequentialCountingConfig(stop_on_repeat=False)
    assert counting.count_sequentially(img, "circle", lambda m, p: (0.1, 0.2), off, max_count=4).count == 4
    res = counting.count_sequentially(img, "circle", lambda m, p: (float("nan"), 0.0), cfg, max_count=4)
    assert (res.count, res.done_reason) == (0, "invalid")


def test_done_tolerance():
    assert counting.is_done((-0.96, -1.0), 0.05) and not counting.is_done((-0.94, -1.0), 0.05)
    assert not counting.is_done((-1.0, 0.5), 0.05)
    img = np.zeros((64, 64, 3), np.uint8)
    res = counting.count_sequentially(img, "dot", lambda m, p: (-0.97, -0.98), C.SequentialCountingConfig(), 5)
    assert (res.count, res.done_reason) == (0, "done")


def test_record_meta_forms(scenes):
    img, _ = scenes[0]
    h, w = img.shape[:2]
    rec = parse_record({"images": ["x.png"], "width": w, "height": h, "task": "counting",
                        "objects": [{"desc": "coin", "point_2d": [3, 3]}]}, check_images="none")
    seen = []
    cfg = C.SequentialCountingConfig()
    for meta in (rec, {"class_name": "coin"}, "coin"):
        counting.count_sequentially(img, meta, lambda m, p: seen.append(p) or (-1, -1), cfg, 3)
    assert len(set(seen)) == 1 and "coins" in seen[0]
    with pytest.raises(ValueError, match="record_meta"):
        counting.count_sequentially(img, 3, lambda m, p: (-1, -1), cfg, 3)


def test_too_small_image_is_a_clear_error():
    with pytest.raises(C.MarkError, match="too small"):
        counting.count_sequentially(np.zeros((12, 12, 3), np.uint8), "dot", lambda m, p: (-1, -1),
                                    C.SequentialCountingConfig(), 3)


@pytest.mark.parametrize("hw", [(40, 60), (128, 160), (600, 900)])
def test_picture_side_by_side(hw):
    h, w = hw
    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, (h, w, 3), dtype=np.uint8)
    gt = rng.uniform([5, 5], [w - 5, h - 5], (4, 2))
    pred = gt[:3] + 0.5
    pic = counting.draw_counting_result(img, pred, gt, caption="Count the dots.\nNext location: <x> <y>")
    assert pic.dtype == np.uint8 and pic.ndim == 3
    scale = max(1.0, 384 / max(h, w))
    sw, sh = round(w * scale), round(h * scale)
    assert pic.shape[1] > 2 * sw and pic.shape[0] > sh  # two panels side by side, a header and a caption
    # find the left panel: it is the input (nearest upscaled), unchanged
    from PIL import Image

    up = np.asarray(Image.fromarray(img).resize((sw, sh), Image.NEAREST)) if scale != 1 else img
    found = [(y, x) for y in range(0, pic.shape[0] - sh + 1) for x in range(0, 12)
             if np.array_equal(pic[y:y + 8, x:x + 8], up[:8, :8]) and np.array_equal(pic[y:y + sh, x:x + sw], up)]
    assert len(found) == 1
    y0, x0 = found[0]
    right = pic[y0:y0 + sh, x0 + sw:]
    # the output panel holds the predicted marks (white discs) and the ground truth (green)
    x1 = int(np.argmax((right[:, :, :] != 255).any(-1).any(0)))  # first non-white column after the gap
    panel = right[:, x1:x1 + sw]
    st = C.mark_style(sh, sw)
    for p in pred * scale:
        assert tuple(panel[int(p[1]), int(p[0])]) in (C.MARK_FILL, C.MARK_TEXT)
    green = (panel == counting.GT_COLOUR).all(-1)
    q = gt[3] * scale  # the unmatched true object: its cross is visible
    ys, xs = np.nonzero(green)
    assert np.hypot(xs + 0.5 - q[0], ys + 0.5 - q[1]).min() < st.radius


def test_picture_with_boxes_and_no_truth():
    img = np.full((100, 100, 3), 128, np.uint8)
    boxes = np.array([[10, 10, 30, 40], [np.nan] * 4])
    gt = np.array([[20, 25], [70, 70]])
    pic = counting.draw_counting_result(img, np.zeros((0, 2)), gt, gt_boxes=boxes, min_side=100)
    assert (pic == counting.GT_COLOUR).all(-1).sum() > 0
    counting.draw_counting_result(img, [[50, 50]], None)
    with pytest.raises(ValueError, match="2 ground-truth boxes for 1"):
        counting.draw_counting_result(img, [[50, 50]], gt[:1], gt_boxes=boxes)
