"""Sequential counting data: centres and the records policy, orderings on hand-made layouts, numbered marks read
back from the pixels, prompts, samples, the seeded sampler, and the coco_class / omnicount converters."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from coordexp_jax.data import converters
from coordexp_jax.data import counting as C
from coordexp_jax.data.records import Object, Record, RecordError, ValidationReport, parse_record


def _rec(objs, w=200, h=120, source="f.jsonl:7", **kw):
    return parse_record({"images": ["x.png"], "width": w, "height": h, "task": "counting", "objects": objs, **kw},
                        where=source, check_images="none")


# ------------------------------------------------------------------------------------------- centres + policy
def test_object_centres_points_and_box_centres():
    r = _rec([{"desc": "egg", "point_2d": [150, 30]}, {"desc": "egg", "bbox_2d": [40, 80, 60, 100]}])
    # float64 pixels -> normalised -> pixels: exact to a few ulps of 200 (1e-9 is 10^4 times wider)
    np.testing.assert_allclose(C.object_centres(r), [[150, 30], [50, 90]], atol=1e-9)
    pts, boxes, cls = C.object_geometry(r)
    assert cls == "egg" and np.isnan(boxes[0]).all()
    np.testing.assert_allclose(boxes[1], [40, 80, 60, 100], atol=1e-9)


def test_record_without_points_or_boxes_error_or_counted_skip():
    r = Record(image="x.png", width=10, height=10, objects=(Object(desc="egg"),), task="counting",
               source="data.jsonl:3")
    with pytest.raises(RecordError, match=r"data\.jsonl:3: missing_field: objects\[0\]"):
        C.object_centres(r)
    rep = ValidationReport()
    assert C.object_centres(r, policy={"missing_field": "skip"}, report=rep) is None
    assert rep.counts["missing_field"] == 1 and "data.jsonl:3" in rep.examples["missing_field"][0]


def test_zero_instances_skip_error_keep():
    r = _rec([{"desc": "egg", "point_2d": [1, 1]}], source="d.jsonl:9")
    rep = ValidationReport()
    assert C.object_centres(r, desc="cup", report=rep) is None  # default: counted skip
    assert rep.counts["no_objects"] == 1
    with pytest.raises(RecordError, match=r"d\.jsonl:9: no_objects: zero instances of 'cup'"):
        C.object_centres(r, desc="cup", policy={"no_objects": "error"})
    assert C.object_centres(r, desc="cup", policy={"no_objects": "keep"}).shape == (0, 2)


def test_several_classes_need_desc():
    r = _rec([{"desc": "egg", "point_2d": [1, 1]}, {"desc": "cup", "point_2d": [5, 5]}], source="m.jsonl:2")
    with pytest.raises(RecordError, match=r"m\.jsonl:2: bad_value: a counting record holds one class"):
        C.object_centres(r)
    np.testing.assert_allclose(C.object_centres(r, desc="cup"), [[5, 5]], atol=1e-9)


def test_unknown_policy_key_is_refused():
    r = _rec([{"desc": "egg", "point_2d": [1, 1]}])
    with pytest.raises(C.DataConfigError, match="unknown counting policy key"):
        C.object_centres(r, policy={"nope": "skip"})


# ------------------------------------------------------------------------------------------- orderings
GRID = np.array([[30, 12], [10, 10], [50, 9], [11, 31], [49, 29], [29, 30]], float)  # 2 rows x 3, jittered y


def test_reading_order_rows_then_left_to_right():
    perm = C.order_objects(GRID, "reading", row_tol=5)
    assert perm.tolist() == [1, 0, 2, 3, 5, 4]


def test_reading_order_row_tolerance_matters():
    # with no tolerance every point is its own row: plain top-to-bottom
    assert C.order_objects(GRID, "reading", row_tol=0).tolist() == list(np.argsort(GRID[:, 1], kind="stable"))
    # the default tolerance (half the nearest-neighbour spacing, 10 px) groups the two rows
    assert C.order_objects(GRID, "reading").tolist() == [1, 0, 2, 3, 5, 4]


def test_reading_rows_do_not_chain():
    # y = 0, 4, 8, 12 with tol 5: rows are anchored at their first point -> {0, 4}, {8, 12}
    p = np.array([[9, 0], [1, 4], [5, 8], [0, 12]], float)
    assert C.order_objects(p, "reading", row_tol=5).tolist() == [1, 0, 3, 2]


def test_left_to_right_order():
    assert C.order_objects(GRID, "left_to_right").tolist() == [1, 3, 5, 0, 4, 2]


def test_nearest_neighbour_order_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.uniform(0, 100, (int(rng.integers(1, 12)), 2))
        perm = C.order_objects(p, "nearest_neighbour")
        # brute force: start nearest to (0, 0), then the nearest unvisited, by explicit loops
        left = list(range(len(p)))
        cur = min(left, key=lambda i: (p[i, 0] ** 2 + p[i, 1] ** 2, i))
        want = [cur]
        left.remove(cur)
        while left:
            cur = min(left, key=lambda i: ((p[i, 0] - p[want[-1], 0]) ** 2 + (p[i, 1] - p[want[-1], 1]) ** 2, i))
            want.append(cur)
            left.remove(cur)
        assert perm.tolist() == want


def test_nearest_neighbour_hand_layout():
    # a zig-zag: from the top-left point the nearest chain is not the reading order
    p = np.array([[0, 0], [100, 0], [10, 5], [90, 10]], float)
    assert C.order_objects(p, "nearest_neighbour").tolist() == [0, 2, 3, 1]
    assert C.order_objects(p, "reading", row_tol=20).tolist() == [0, 2, 3, 1]
    assert C.order_objects(p, "left_to_right").tolist() == [0, 2, 3, 1]
    assert C.order_objects(p[[1, 3, 2, 0]], "nearest_neighbour").tolist() == [3, 2, 1, 0]


@pytest.mark.parametrize("order", C.ORDERS)
def test_orders_are_permutations(order):
    p = np.random.default_rng(1).uniform(0, 50, (9, 2))
    rng = np.random.default_rng(2)
    assert sorted(C.order_objects(p, order, rng=rng).tolist()) == list(range(9))
    assert C.order_objects(np.zeros((0, 2)), order, rng=rng).tolist() == []


def test_random_order_needs_rng_and_set_target():
    p = np.random.default_rng(1).uniform(0, 50, (9, 2))
    with pytest.raises(ValueError, match="random generator"):
        C.order_objects(p, "random")
    # the same generator state gives the same permutation; another seed another one
    a = C.order_objects(p, "random", rng=np.random.default_rng(5))
    assert a.tolist() == C.order_objects(p, "random", rng=np.random.default_rng(5)).tolist()
    assert a.tolist() != C.order_objects(p, "random", rng=np.random.default_rng(6)).tolist()
    with pytest.raises(C.CountingConfigError, match="needs target 'set'"):
        C.SequentialCountingConfig(order="random")
    with pytest.raises(C.CountingConfigError, match="target must be one of"):
        C.SequentialCountingConfig(target="nearest")


def test_unknown_order_refused():
    with pytest.raises(C.CountingConfigError, match="order must be one of"):
        C.order_objects(GRID, "spiral")
    with pytest.raises(C.CountingConfigError, match="order"):
        C.SequentialCountingConfig(order="spiral")


# ------------------------------------------------------------------------------------------- marks
def _components(mask):
    from scipy import ndimage

    lab, n = ndimage.label(mask)
    return lab, n


@pytest.mark.parametrize("hw", [(64, 96), (128, 128), (480, 640), (1000, 700)])
def test_marks_read_back(hw):
    h, w = hw
    grey = np.full((h, w, 3), 120, np.uint8)
    rng = np.random.default_rng(h)
    st = C.mark_style(h, w)
    pts = []
    while len(pts) < 5:  # marks apart and inside the image
        p = rng.uniform([st.radius + 2, st.radius + 2], [w - st.radius - 2, h - st.radius - 2])
        if all(np.hypot(*(p - q)) > 2 * st.radius + 4 for q in pts):
            pts.append(p)
    pts = np.array(pts)
    out = C.draw_marks(grey, pts, [1, 2, 3, 10, 12])
    assert out.dtype == np.uint8 and out.shape == grey.shape
    changed = (out != grey).any(-1)
    colours = {tuple(c) for c in out[changed].tolist()}
    assert colours <= {C.MARK_FILL, C.MARK_RING}  # no anti-aliasing: only the mark colours (text = ring = black)
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # continuous pixel centres
    centre = np.floor(pts + C.EDGE_EPS) + 0.5  # each mark is centred on the pixel holding its point
    dist = np.hypot(xx[..., None] - centre[:, 0], yy[..., None] - centre[:, 1])
    d = dist.min(-1)
    assert not changed[d > st.radius + 0.5].any()  # nothing drawn away from the marks (the rim pixel's half)
    assert changed[d <= st.radius - 1].all()  # every disc is complete
    lab, n = _components(changed)
    assert n == len(pts)
    for i, p in enumerate(pts):
        comp = lab == lab[int(p[1]), int(p[0])]
        cy, cx = np.argwhere(comp).mean(0) + 0.5
        # a rasterised disc is symmetric about its centre pixel up to PIL's rounding of large ellipses (< 0.01 px)
        assert abs(cx - centre[i, 0]) < 0.05 and abs(cy - centre[i, 1]) < 0.05
        assert abs(cx - p[0]) <= 0.55 and abs(cy - p[1]) <= 0.55  # so within half a pixel of the point
        d = dist[..., i]
        ring = comp & (d > st.radius - st.ring + 0.75)  # the outer rim: black ring
        assert ring.any() and (out[ring] == C.MARK_RING).all(-1).all()
        inner = comp & (d < st.radius - st.ring - 1)
        ink = (out[inner] == C.MARK_TEXT).all(-1)
        assert 0.03 < ink.mean() < 0.6  # the number is drawn, and it does not fill the disc
    # different numbers are different glyphs
    a = C.draw_marks(grey, pts[:1], [3])
    b = C.draw_marks(grey, pts[:1], [8])
    assert (a != b).any()


def test_marks_scale_with_the_image():
    small, big = C.mark_style(128, 128), C.mark_style(1024, 1024)
    assert big.radius >= 4 * small.radius // 2 and big.font_size > small.font_size
    assert small.font_size >= C.MIN_FONT


def test_image_too_small_for_marks():
    with pytest.raises(C.MarkError, match=r"a 20x16 image is too small for readable numbered marks"):
        C.draw_marks(np.zeros((16, 20, 3), np.uint8), [[5, 5]])


def test_no_points_leaves_the_image_unchanged():
    img = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(C.draw_marks(img, np.zeros((0, 2))), img)


# ------------------------------------------------------------------------------------------- prompts
def test_prompt_matches_the_seed_template():
    cfg = C.SequentialCountingConfig()
    p = C.counting_prompt("egg", 5, cfg)
    assert p == ("Count the eggs in this image. 5 objects are already marked with numbered labels.\n\n"
                 "Task: Predict the (x, y) location of the next unmarked egg.\n\n"
                 "Rules:\n1. Output x, y as normalized coordinates in [-1, 1]\n"
                 "2. If all eggs are marked, output x=-1, y=-1\n"
                 "3. Count systematically from top-to-bottom, left-to-right\n\nNext location: <x> <y>")
    assert C.counting_system_prompt("egg", cfg) == ("You are a vision assistant that locates eggs in images "
                                                    "systematically.")
    assert "1 object is already" in C.counting_prompt("egg", 1, cfg)
    assert C.counting_prompt("strawberry", 0, C.SequentialCountingConfig(order="nearest_neighbour")).endswith(
        "nearest unmarked one\n\nNext location: <x> <y>")
    assert C.plural("box") == "boxes" and C.plural("sea shells") == "sea shells" and C.plural("key") == "keys"
    assert C.plural("person", (("person", "people"),)) == "people"


def test_template_must_end_with_the_head_tokens():
    with pytest.raises(C.CountingConfigError, match="must end with '<x> <y>'"):
        C.SequentialCountingConfig(template="Count the {plural}.")


# ------------------------------------------------------------------------------------------- samples
def _layout():
    pts = [[150, 30], [20, 32], [50, 90], [110, 88]]
    return _rec([{"desc": "egg", "point_2d": p} for p in pts])


def test_build_sample_target_marks_and_prompt():
    r = _layout()
    img = np.full((120, 200, 3), 90, np.uint8)
    cfg = C.SequentialCountingConfig(row_tol=10)
    order = [[20, 32], [150, 30], [50, 90], [110, 88]]  # reading order
    for k in range(4):
        s = C.build_counting_sample(r, img, k, cfg)
        assert (s.k, s.n, s.done, s.class_name) == (k, 4, False, "egg")
        x, y = order[k]
        # float32 of 2x/W-1: one float32 ulp of 1 (1.2e-7) is the bound; 1e-6 holds
        np.testing.assert_allclose(s.target, [2 * x / 200 - 1, 2 * y / 120 - 1], atol=1e-6)
        np.testing.assert_allclose(s.marked_points, np.array(order[:k]).reshape(-1, 2), atol=1e-9)
        assert f"{k} object" in s.prompt and s.prompt.endswith("<x> <y>")
        np.testing.assert_array_equal(s.image, C.draw_marks(img, np.array(order[:k]).reshape(-1, 2),
                                                            style=C.mark_style(120, 200)))
    done = C.build_counting_sample(r, img, 4, cfg)
    assert done.done and done.target.tolist() == [-1.0, -1.0]
    with pytest.raises(ValueError, match="k must be in 0..4"):
        C.build_counting_sample(r, img, 5, cfg)


def test_set_target_candidates_are_the_unmarked_centres():
    r = _layout()
    img = np.full((120, 200, 3), 90, np.uint8)
    norm = lambda q: np.array([[2 * x / 200 - 1, 2 * y / 120 - 1] for x, y in q]).reshape(-1, 2)  # noqa: E731
    order = [[20, 32], [150, 30], [50, 90], [110, 88]]  # reading order
    s = C.build_counting_sample(r, img, 1, C.SequentialCountingConfig(row_tol=10, target="set"))
    # float32 of 2x/W-1: 1e-6 bounds the rounding (as above)
    np.testing.assert_allclose(s.candidates, norm(order[1:]), atol=1e-6)
    np.testing.assert_allclose(s.target, norm(order[1:2])[0], atol=1e-6)
    assert C.build_counting_sample(r, img, 1, C.SequentialCountingConfig(row_tol=10)).candidates.shape == (1, 2)
    done = C.build_counting_sample(r, img, 4, C.SequentialCountingConfig(target="set"))
    assert done.candidates.tolist() == [[-1.0, -1.0]]
    # random order: the marked objects are a random subset, the candidates exactly the rest
    cfg = C.SequentialCountingConfig(order="random", target="set")
    seen = set()
    for seed in range(12):
        s = C.build_counting_sample(r, img, 2, cfg, rng=np.random.default_rng(seed))
        marked = {tuple(p) for p in np.round(s.marked_points).astype(int).tolist()}
        rest = {tuple(p) for p in np.round((s.candidates + 1) / 2 * [200, 120]).astype(int).tolist()}
        assert len(marked) == 2 and marked | rest == {tuple(p) for p in order} and not marked & rest
        seen.add(frozenset(marked))
    assert len(seen) > 2  # not always the same pair


def test_set_band_keeps_the_next_object_and_its_near_ties_in_x():
    # left to right: x = 20, 22, 50, 110, 150 (normalised by W = 200: a band of 0.05 is 5 px)
    pts = [[150, 30], [20, 32], [50, 90], [110, 88], [22, 100]]
    r = _rec([{"desc": "egg", "point_2d": p} for p in pts])
    img = np.full((120, 200, 3), 90, np.uint8)
    xs = lambda s: sorted(np.round((s.candidates[:, 0] + 1) * 100).astype(int).tolist())  # noqa: E731
    band = C.SequentialCountingConfig(order="left_to_right", target="set", set_band=0.05)
    assert xs(C.build_counting_sample(r, img, 0, band)) == [20, 22]  # the next (20) and its near-tie (22)
    assert xs(C.build_counting_sample(r, img, 2, band)) == [50]  # 110 is 30 px right of 50: not a near-tie
    wide = C.SequentialCountingConfig(order="left_to_right", target="set", set_band=1.0)
    assert xs(C.build_counting_sample(r, img, 2, wide)) == [50, 110, 150]
    assert xs(C.build_counting_sample(r, img, 0, C.SequentialCountingConfig(order="left_to_right",
                                                                           target="set"))) == [20, 22, 50, 110, 150]
    for bad in (dict(target="ordered", order="left_to_right"), dict(target="set", order="reading")):
        with pytest.raises(C.CountingConfigError, match="set_band needs"):
            C.SequentialCountingConfig(set_band=0.1, **bad)


def test_mark_jitter_stays_inside_the_shrunk_box():
    rng = np.random.default_rng(3)
    pts = np.array([[20.0, 30.0], [50.0, 60.0], [80.0, 10.0]])
    boxes = np.array([[10, 20, 40, 36], [44, 50, 56, 70], [np.nan] * 4])
    for j in (0.0, 0.5, 1.0):
        at = np.stack([C.jitter_marks(pts, boxes, j, 7.0, rng) for _ in range(400)])  # [400, 3, 2]
        lo = pts + j * (np.where(np.isnan(boxes[:, :2]), pts - 7, boxes[:, :2]) - pts)
        hi = pts + j * (np.where(np.isnan(boxes[:, 2:]), pts + 7, boxes[:, 2:]) - pts)
        assert np.all(at >= lo - 1e-9) and np.all(at <= hi + 1e-9)
        if j:  # uniform: the draws spread over most of the shrunk box (400 draws: the extremes within 5%)
            span = at.max(0) - at.min(0)
            assert np.all(span >= 0.9 * (hi - lo))
    with pytest.raises(ValueError, match="random generator"):
        C.jitter_marks(pts, boxes, 0.5, 7.0, None)
    # a sample: the marks are drawn where marked_points says (off the centres), the target is unchanged
    r = _layout()
    img = np.full((120, 200, 3), 90, np.uint8)
    cfg = C.SequentialCountingConfig(row_tol=10, mark_jitter=1.0)
    s = C.build_counting_sample(r, img, 2, cfg, rng=np.random.default_rng(0))
    centres = np.array([[20, 32], [150, 30]], np.float64)
    rad = C.mark_style(120, 200).radius  # point-only objects: within the mark radius
    assert 0 < np.abs(s.marked_points - centres).max() <= rad
    np.testing.assert_array_equal(s.image, C.draw_marks(img, s.marked_points, style=C.mark_style(120, 200)))
    np.testing.assert_allclose(s.target, [2 * 50 / 200 - 1, 2 * 90 / 120 - 1], atol=1e-6)
    with pytest.raises(C.CountingConfigError, match="mark_jitter"):
        C.SequentialCountingConfig(mark_jitter=1.5)


def test_build_sample_checks_the_image_size():
    with pytest.raises(RecordError, match=r"f\.jsonl:7: size_mismatch"):
        C.build_counting_sample(_layout(), np.zeros((100, 200, 3), np.uint8), 0, C.SequentialCountingConfig())


def test_normalisations_round_trip():
    p = np.array([[0.0, 0.0], [200, 120], [37.25, 80.5]])
    for norm in C.NORMALISATIONS:
        q = C.denormalise_points(C.normalise_points(p, 200, 120, norm), 200, 120, norm)
        np.testing.assert_allclose(q, p, atol=1e-9)  # float64 round trip of values <= 200
    np.testing.assert_allclose(C.normalise_points([[0.5, 0.5], [199.5, 119.5]], 200, 120, "pixel_centres"),
                               [[-1, -1], [1, 1]], atol=1e-12)


def test_draw_k_uniform_and_done():
    rng = np.random.default_rng(0)
    cfg = C.SequentialCountingConfig()
    ks = [C.draw_k(5, cfg, rng) for _ in range(5000)]
    assert set(ks) == set(range(5))  # never the done sample by default
    # uniform: each value 1/5 of 5000 = 1000 draws; 4.5 binomial standard deviations (28) is 130
    assert all(abs(ks.count(v) - 1000) < 130 for v in range(5))
    assert C.draw_k(0, cfg, rng) is None
    dcfg = C.SequentialCountingConfig(include_done=True, done_prob=0.25)
    kd = [C.draw_k(5, dcfg, rng) for _ in range(4000)]
    assert abs(kd.count(5) - 1000) < 4.5 * np.sqrt(4000 * 0.25 * 0.75)  # binomial(4000, 0.25)
    assert C.draw_k(0, dcfg, rng) == 0


def test_sampler_is_seeded_and_applies_the_policy(tmp_path):
    Image.fromarray(np.full((120, 200, 3), 70, np.uint8)).save(tmp_path / "x.png")
    good = _layout()
    good = Record(**{**good.__dict__, "image": str(tmp_path / "x.png")})
    empty = _rec([], source="f.jsonl:8")
    tiny = parse_record({"images": ["t.png"], "width": 16, "height": 16, "task": "counting",
                         "objects": [{"desc": "egg", "point_2d": [3, 3]}]}, where="f.jsonl:9", check_images="none")
    rep = ValidationReport()
    s = C.CountingSampler([good, empty, tiny], C.SequentialCountingConfig(), seed=3, report=rep)
    assert len(s) == 1
    assert rep.counts["image_too_small"] == 1 and rep.counts["no_objects"] == 1
    a = [s.sample(0, e).k for e in range(12)]
    assert a == [s.sample(0, e).k for e in range(12)]  # deterministic
    assert len(set(a)) > 1  # and varies over epochs
    with pytest.raises(RecordError, match=r"f\.jsonl:9: image_too_small"):
        C.CountingSampler([tiny], C.SequentialCountingConfig(), policy={"image_too_small": "error"})


# ------------------------------------------------------------------------------------------- converters
def _coco(tmp_path, name="inst.json"):
    d = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                    {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80},
                    {"id": 3, "file_name": "c.jpg", "width": 100, "height": 80},
                    {"id": 4, "file_name": "d.jpg", "width": 100, "height": 80}],
         "categories": [{"id": 0, "name": "fruits"}, {"id": 1, "name": "cup"}, {"id": 2, "name": "bell_pepper"}],
         "annotations": [
             {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 10], "iscrowd": 0},
             {"id": 11, "image_id": 1, "category_id": 1, "bbox": [50, 40, 0, 0], "iscrowd": 0},
             {"id": 12, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 0},
             {"id": 13, "image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "iscrowd": 1},
             {"id": 14, "image_id": 3, "category_id": 2, "bbox": [1, 1, 4, 4]}]}
    p = tmp_path / name
    p.write_text(json.dumps(d))
    return str(p)


def test_coco_class_records(tmp_path):
    path = _coco(tmp_path)
    rep = ValidationReport()
    recs = list(converters.convert("coco_class", path, str(tmp_path), str(tmp_path), rep, category="cup"))
    assert [r["images"] for r in recs] == [["a.jpg"]]  # image 2: crowd, 3 and 4: no cup
    r = recs[0]
    assert r["task"] == "counting" and r["metadata"]["count"] == 2 and r["metadata"]["class"] == "cup"
    assert r["objects"] == [{"desc": "cup", "bbox_2d": [10.0, 10.0, 30.0, 20.0]},
                            {"desc": "cup", "point_2d": [50.0, 40.0]}]
    assert rep.counts["crowd"] == 1 and rep.counts["no_objects"] == 2 and rep.counts["point_from_degenerate_box"] == 1
    # the record reads back under the contract, and its centres are the box centre and the point
    rec = parse_record(r, where="out:1", check_images="none")
    np.testing.assert_allclose(C.object_centres(rec), [[20, 15], [50, 40]], atol=1e-9)
    by_id = list(converters.convert("coco_class", path, str(tmp_path), None, category=1, keep_empty=True))
    assert len(by_id) == 3 and by_id[1]["objects"] == [] and by_id[1]["metadata"]["class"] == "cup"


def test_coco_class_bad_inputs_name_the_file(tmp_path):
    path = _coco(tmp_path)
    with pytest.raises(converters.ConversionError, match=r"inst\.json: no category named 'mug' \(known:"):
        list(converters.convert("coco_class", path, str(tmp_path), category="mug"))
    bad = json.loads(open(path).read())
    bad["annotations"][0]["bbox"] = [1, 2, 3]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(converters.ConversionError, match=r"bad\.json: annotations\[0\] \(id 10\): bbox"):
        list(converters.convert("coco_class", str(tmp_path / "bad.json"), str(tmp_path), category="cup"))


def test_omnicount_root_layout(tmp_path):
    for scene in ("Fruits", "Urban"):
        d = tmp_path / "OmniCount-191" / scene / "train"
        d.mkdir(parents=True)
        _coco(d, "_annotations.coco.json")
    (tmp_path / "OmniCount-191" / "Urban" / "test").mkdir()
    root = str(tmp_path / "OmniCount-191")
    rep = ValidationReport()
    recs = list(converters.convert("omnicount", root, root, str(tmp_path), rep, split="train", scenes=["Fruits"]))
    # image 1: cup (2) and bell pepper (1); image 3: bell pepper; image 2: crowd cup left out
    assert [(r["images"][0], r["metadata"]["class"], len(r["objects"])) for r in recs] == [
        (os.path.join("OmniCount-191", "Fruits", "train", "a.jpg"), "bell pepper", 1),
        (os.path.join("OmniCount-191", "Fruits", "train", "a.jpg"), "cup", 2),
        (os.path.join("OmniCount-191", "Fruits", "train", "c.jpg"), "bell pepper", 1)]
    assert recs[0]["metadata"]["scene"] == "Fruits" and recs[0]["metadata"]["split"] == "train"
    assert len(list(converters.convert("omnicount", root, root, None, split="train"))) == 6
    only = list(converters.convert("omnicount", root, root, None, split="train", classes=["cup"]))
    assert {r["metadata"]["class"] for r in only} == {"cup"} and len(only) == 2
    with pytest.raises(converters.ConversionError, match=r"no <scene>/valid/_annotations.coco.json below it"):
        list(converters.convert("omnicount", root, root, None, split="valid"))
    f = os.path.join(root, "Urban", "train", "_annotations.coco.json")
    one = list(converters.convert("omnicount", f, None, None))
    assert len(one) == 3 and one[0]["images"][0] == os.path.join(root, "Urban", "train", "a.jpg")
    assert one[0]["metadata"]["scene"] == "Urban"


def test_convert_cli_registers_the_counting_formats(tmp_path):
    from tools import convert_dataset

    path = _coco(tmp_path)
    for n in "abcd":
        Image.new("RGB", (100, 80)).save(tmp_path / f"{n}.jpg")
    out = tmp_path / "cups.jsonl"
    assert convert_dataset.main(["--format", "coco_class", "--category", "cup", "--input", path, "--images",
                                 str(tmp_path), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["metadata"]["count"] == 2
    d = tmp_path / "OC" / "Pets" / "train"
    d.mkdir(parents=True)
    _coco(d, "_annotations.coco.json")
    for n in "abcd":
        Image.new("RGB", (100, 80)).save(d / f"{n}.jpg")
    out2 = tmp_path / "oc.jsonl"
    assert convert_dataset.main(["--format", "omnicount", "--input", str(tmp_path / "OC"), "--out", str(out2)]) == 0
    assert len(out2.read_text().splitlines()) == 3


def test_mark_size_does_not_depend_on_the_count():
    img = np.full((128, 128, 3), 100, np.uint8)
    st = C.mark_style(128, 128)
    disc = lambda o: (o != 100).any(-1)  # noqa: E731
    a = C.draw_marks(img, [[64, 64]], [7])
    b = C.draw_marks(img, [[64, 64]], [42])
    np.testing.assert_array_equal(disc(a), disc(b))  # marks 1..99: one disc whatever the number
    c = C.draw_marks(img, [[64, 64]], [123])  # three digits: a readable font in a larger disc of its own
    big = C.label_style("123", st)
    assert big.font_size >= C.MIN_FONT and big.radius > st.radius
    assert disc(c).sum() > disc(a).sum()
    yy, xx = np.mgrid[0:128, 0:128] + 0.5
    assert not disc(c)[np.hypot(xx - 64.5, yy - 64.5) > big.radius + 0.5].any()
    # on a large image three digits fit the usual disc with a smaller font
    assert C.label_style("123", C.mark_style(800, 800)).radius == C.mark_style(800, 800).radius


def test_mark_scale_multiplies_the_radius_at_the_minimum_too():
    # at 128 px the base radius is MIN_RADIUS (7 px > 0.035 x 128); the scale must still apply there
    base = C.mark_style(128, 128)
    for s in (1.4, 1.8):
        st = C.mark_style(128, 128, scale=s)
        assert st.radius >= round(C.MIN_RADIUS * s) > base.radius
    assert C.mark_style(1000, 1000, scale=0.5).radius == round(0.035 * 1000 * 0.5)
