"""Metrics against hand-made cases and an independent brute-force COCO AP."""
import numpy as np

from coordexp_jax.coord.boxes import pairwise_iou_exact
import pytest

from coordexp_jax import metrics as M


def _brute_ap(results, categories, score_rule, iou_thr):
    """Independent COCO-style AP: per category, greedy by score within each image (max 100), best unmatched gt
    with IoU >= thr, then 101-point interpolated precision over the pooled, stably score-sorted detections."""
    aps = []
    rec_thrs = np.linspace(0, 1, 101)
    for cat in categories:
        pooled, n_gt = [], 0
        for r in results:
            gts = [g.bbox for g in r.gt if g.desc == cat]
            n_gt += len(gts)
            dets = [p for p in r.pred if p.desc == cat]
            scores = [1.0 if score_rule == "constant" else p.score for p in dets]
            order = sorted(range(len(dets)), key=lambda i: -scores[i])[:100]  # sorted() is stable
            used = [False] * len(gts)
            for i in order:
                best, best_iou = -1, min(iou_thr, 1 - 1e-10)
                for j, g in enumerate(gts):
                    if used[j]:
                        continue
                    iou = pairwise_iou_exact(np.array([dets[i].bbox]), np.array([g]))[0, 0]
                    if iou >= best_iou:
                        best, best_iou = j, iou
                if best >= 0:
                    used[best] = True
                pooled.append((scores[i], best >= 0))
        if n_gt == 0:
            continue
        pooled_sorted = sorted(pooled, key=lambda t: -t[0])
        tp = np.cumsum([m for _, m in pooled_sorted])
        fp = np.cumsum([not m for _, m in pooled_sorted])
        rc = tp / n_gt
        pr = tp / np.maximum(tp + fp, np.spacing(1))
        pr = list(pr)
        for k in range(len(pr) - 1, 0, -1):
            pr[k - 1] = max(pr[k - 1], pr[k])
        q = np.zeros(101)
        idx = np.searchsorted(rc, rec_thrs, side="left")
        for ri, pi in enumerate(idx):
            if pi < len(pr):
                q[ri] = pr[pi]
        aps.append(q.mean())
    return float(np.mean(aps)) if aps else 0.0


def _random_case(rng, n_images=4, cats=("a", "b", "c")):
    results = []
    for i in range(n_images):
        w, h = 100, 80
        gts = []
        for _ in range(rng.integers(0, 5)):
            x1, y1 = rng.uniform(0, 60), rng.uniform(0, 50)
            gts.append(M.PredObject(str(rng.choice(cats)), (x1, y1, x1 + rng.uniform(5, 40), y1 + rng.uniform(5, 30))))
        preds = []
        for g in gts:
            if rng.random() < 0.7:
                jit = rng.normal(0, 4, 4)
                preds.append(M.PredObject(g.desc if rng.random() < 0.85 else str(rng.choice(cats)),
                                          tuple(np.array(g.bbox) + jit), float(rng.uniform(0.05, 1))))
        for _ in range(rng.integers(0, 3)):
            x1, y1 = rng.uniform(0, 60), rng.uniform(0, 50)
            preds.append(M.PredObject(str(rng.choice(cats)), (x1, y1, x1 + 20, y1 + 15), float(rng.uniform(0.05, 1))))
        rng.shuffle(preds)
        results.append(M.ImageResult(i + 1, w, h, gts, preds))
    return results


@pytest.mark.parametrize("seed", range(12))
def test_coco_map_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    cats = ("a", "b", "c")
    results = _random_case(rng, cats=cats)
    if not any(r.gt for r in results):
        results[0].gt.append(M.PredObject("a", (1, 1, 20, 20)))
    for rule in M.SCORE_RULES:
        got = M.coco_map(results, cats, rule)
        if got["num_dets"] == 0:
            continue
        want50 = _brute_ap(results, cats, rule, 0.5)
        want75 = _brute_ap(results, cats, rule, 0.75)
        want = np.mean([_brute_ap(results, cats, rule, t) for t in np.linspace(0.5, 0.95, 10)])
        # pycocotools averages per category over all thresholds; equal to the mean over thresholds of per-threshold
        # means only when the same categories count at every threshold (they do: counting depends on gt only).
        assert got["AP50"] == pytest.approx(want50, abs=1e-9)
        assert got["AP75"] == pytest.approx(want75, abs=1e-9)
        assert got["AP"] == pytest.approx(want, abs=1e-9)


def test_hand_made_cases():
    g = [M.PredObject("cat", (10, 10, 50, 50)), M.PredObject("dog", (60, 10, 90, 40))]
    perfect = [M.ImageResult(1, 100, 100, g, [M.PredObject(o.desc, o.bbox, 0.9) for o in g])]
    m = M.coco_map(perfect, ["cat", "dog"])
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    # Half the objects found exactly: precision 1 up to recall 0.5 in each... only "cat" found: cat AP 1, dog AP 0.
    half = [M.ImageResult(1, 100, 100, g, [M.PredObject("cat", (10, 10, 50, 50), 0.9)])]
    assert M.coco_map(half, ["cat", "dog"])["AP50"] == pytest.approx(0.5)
    # Two cats, one found: 51 of 101 recall points at precision 1.
    two = [M.ImageResult(1, 100, 100, [g[0], M.PredObject("cat", (60, 60, 90, 90))],
                         [M.PredObject("cat", (10, 10, 50, 50), 0.9)])]
    assert M.coco_map(two, ["cat"])["AP50"] == pytest.approx(51 / 101)
    # A wrong desc is not a hit; no predictions at all gives 0.
    wrong = [M.ImageResult(1, 100, 100, g[:1], [M.PredObject("dog", (10, 10, 50, 50))])]
    assert M.coco_map(wrong, ["cat", "dog"])["AP50"] == 0.0
    assert M.coco_map([M.ImageResult(1, 100, 100, g, [])], ["cat", "dog"])["AP"] == 0.0


def test_score_rules_differ_when_order_matters():
    g = [M.PredObject("cat", (10, 10, 50, 50))]
    # A false positive emitted first with a low logprob score: the logprob rule ranks the hit first.
    preds = [M.PredObject("cat", (60, 60, 90, 90), 0.1), M.PredObject("cat", (10, 10, 50, 50), 0.9)]
    r = [M.ImageResult(1, 100, 100, g, preds)]
    assert M.coco_map(r, ["cat"], "logprob")["AP50"] == pytest.approx(1.0)
    assert M.coco_map(r, ["cat"], "constant")["AP50"] == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="score_rule"):
        M.coco_map(r, ["cat"], "max")


def test_f1_duplicates_validity():
    g = [M.PredObject("cat", (10, 10, 50, 50)), M.PredObject("cat", (60, 10, 90, 40))]
    preds = [M.PredObject("cat", (10, 10, 50, 50)), M.PredObject("cat", (11, 10, 50, 50)),
             M.PredObject("dog", (60, 10, 90, 40)), M.PredObject("cat", (50, 50, 40, 60))]
    r = [M.ImageResult(1, 100, 100, g, preds)]
    f = M.greedy_match_f1(r)
    assert (f["tp"], f["n_pred"], f["n_gt"]) == (1, 4, 2)
    assert f["f1"] == pytest.approx(2 * 0.25 * 0.5 / 0.75)
    assert M.greedy_match_f1(r, match_desc=False)["tp"] == 2
    assert M.duplicate_count(preds) == 1
    assert not M.is_valid_box((50, 50, 40, 60), 100, 100)
    assert not M.is_valid_box((0, 0, 150, 10), 100, 100)
    assert not M.is_valid_box((0, 0, float("nan"), 10), 100, 100)
    d = M.detection_metrics(r + [M.ImageResult(2, 100, 100, g, [], parsed=False)], ["cat", "dog"])
    assert d["parse_failure_rate"] == 0.5 and d["invalid_box_rate"] == 0.25 and d["duplicate_rate"] == 0.25


def test_grounding_and_counting():
    gt = [(0, 0, 10, 10), (0, 0, 10, 10), (0, 0, 10, 10)]
    # IoU exactly 0.5 counts (>=): (0,0,10,5) covers half.
    assert M.grounding_accuracy([(0, 0, 10, 5), (0, 0, 10, 4.9), None], gt) == pytest.approx(1 / 3)
    c = M.counting_errors([3, 5, 0], [4, 5, 2])
    assert c["mae"] == pytest.approx(1.0) and c["rmse"] == pytest.approx(np.sqrt(5 / 3))
    with pytest.raises(ValueError):
        M.counting_errors([1], [1, 2])


def test_inverted_prediction_is_a_false_positive_not_ignored():
    g = [M.PredObject("cat", (10, 10, 50, 50))]
    # The inverted box comes first with the higher score: if pycocotools ignored it, AP50 would be 1.
    preds = [M.PredObject("cat", (50, 50, 10, 10), 0.9), M.PredObject("cat", (10, 10, 50, 50), 0.5)]
    assert M.coco_map([M.ImageResult(1, 100, 100, g, preds)], ["cat"])["AP50"] == pytest.approx(0.5, abs=0.01)


def test_iou_exactly_at_threshold_counts_for_f1():
    g = [M.PredObject("cat", (0, 0, 10, 10))]
    r = [M.ImageResult(1, 20, 20, g, [M.PredObject("cat", (0, 0, 10, 5))])]  # IoU exactly 0.5
    assert M.greedy_match_f1(r)["tp"] == 1


def _py_iou(a, b):
    """Plain-Python IoU of two xyxy boxes (independent of coord.boxes)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = max(a[2] - a[0], 0) * max(a[3] - a[1], 0) + max(b[2] - b[0], 0) * max(b[3] - b[1], 0) - inter
    return inter / union if union > 0 else 0.0


def _brute_match(pred, gt, thr, match_desc):
    """Greedy matching by repeated search: take the best-IoU eligible pair among the unmatched ones (ties: lower
    pred index, then lower gt index) until none is left."""
    p2g = [-1] * len(pred)
    used = [False] * len(gt)
    while True:
        best = None
        for i, p in enumerate(pred):
            if p2g[i] >= 0:
                continue
            for j, g in enumerate(gt):
                if used[j] or (match_desc and p.desc != g.desc):
                    continue
                v = _py_iou(p.bbox, g.bbox)
                if v >= thr and (best is None or v > best[0]):
                    best = (v, i, j)
        if best is None:
            return p2g, used
        p2g[best[1]] = best[2]
        used[best[2]] = True


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("match_desc", [True, False])
def test_match_image_matches_brute_force(seed, match_desc):
    for r in _random_case(np.random.default_rng(seed), n_images=3):
        m = M.match_image(r.pred, r.gt, 0.5, match_desc)
        p2g, used = _brute_match(r.pred, r.gt, 0.5, match_desc)
        assert m.pred_to_gt.tolist() == p2g and m.gt_matched.tolist() == used
        assert (m.tp, m.fp, m.fn) == (sum(j >= 0 for j in p2g), p2g.count(-1), used.count(False))
        want = [_py_iou(p.bbox, r.gt[j].bbox) if j >= 0 else np.nan for p, j in zip(r.pred, p2g)]
        # IoU <= 1 computed from pixel boxes < 200 px in float64 two ways: they agree to ~1e-15, 1e-12 is ample.
        np.testing.assert_allclose(m.ious, want, rtol=0, atol=1e-12)
        if m.tp:
            assert m.mean_iou == pytest.approx(np.nanmean(want), abs=1e-12)  # mean of values in [0, 1]
        else:
            assert np.isnan(m.mean_iou)


def test_match_image_dicts_and_empty():
    gt = [{"desc": "cat", "bbox": [0, 0, 10, 10]}, {"desc": "dog", "bbox": [20, 20, 30, 30]}]
    pred = [{"desc": "cat", "bbox": [0, 0, 10, 5]}, {"desc": "cat", "bbox": [20, 20, 30, 30]}]
    m = M.match_image(pred, gt)
    assert m.pred_to_gt.tolist() == [0, -1] and m.gt_matched.tolist() == [True, False]
    assert (m.tp, m.fp, m.fn) == (1, 1, 1) and m.mean_iou == 0.5  # IoU exactly 0.5 is accepted
    assert M.match_image(pred, gt, match_desc=False).tp == 2
    e = M.match_image([], gt)
    assert (e.tp, e.fp, e.fn, e.pred_to_gt.shape, e.ious.shape) == (0, 0, 2, (0,), (0,)) and np.isnan(e.mean_iou)
    e = M.match_image(pred, [])
    assert (e.tp, e.fp, e.fn) == (0, 2, 0) and e.gt_matched.shape == (0,) and np.isnan(e.ious).all()


# ----------------------------------------------------------------------------------------------- sequential counting
def _brute_sequential(pred, gt, boxes, radius):
    """Loops over steps and objects: a step hits the nearest uncounted object whose box holds the point (or, with
    no box, whose centre is within radius), which is then counted; the error is the distance to the nearest
    uncounted centre."""
    counted = [False] * len(gt)
    hits, errs = 0, []
    for px, py in pred:
        best, best_d, nearest = None, None, None
        for j, (gx, gy) in enumerate(gt):
            if counted[j]:
                continue
            dist = ((px - gx) ** 2 + (py - gy) ** 2) ** 0.5
            nearest = dist if nearest is None else min(nearest, dist)
            b = None if boxes is None or any(v != v for v in boxes[j]) else boxes[j]
            inside = (b[0] <= px <= b[2] and b[1] <= py <= b[3]) if b is not None else dist <= radius
            if inside and (best_d is None or dist < best_d):
                best, best_d = j, dist
        if nearest is not None:
            errs.append(nearest)
        if best is not None:
            counted[best] = True
            hits += 1
    return hits, errs


def test_sequential_point_metrics_hand_case():
    gt = np.array([[10.0, 10.0], [50.0, 50.0], [90.0, 10.0]])
    boxes = np.array([[0, 0, 20, 20], [40, 40, 60, 60], [np.nan] * 4])  # the third: a point only
    pred = np.array([[12.0, 11.0], [11.0, 10.0], [93.0, 14.0], [200.0, 200.0]])
    m = M.sequential_point_metrics(pred, gt, boxes, radius=5.0)
    # step 1 hits object 0 (inside its box); step 2 is on object 0 again (already counted): miss; step 3 is 5 px
    # from the point-only object 2: hit (radius 5, edge included); step 4: nothing left but object 1
    assert (m["steps"], m["hits"]) == (4, 2) and m["hit_rate"] == 0.5
    want = [np.hypot(2, 1), np.hypot(39, 40), 5.0, np.hypot(150, 150)]
    np.testing.assert_allclose(m["point_errors"], want, rtol=1e-12)  # float64 sqrt of small integers
    assert M.sequential_point_metrics(np.zeros((0, 2)), gt, boxes, 5.0)["hit_rate"] == 0.0
    with pytest.raises(ValueError, match="need a hit radius"):
        M.sequential_point_metrics(pred, gt, boxes, radius=None)


def test_sequential_counting_metrics_against_brute_force():
    rng = np.random.default_rng(0)
    preds, gts, bxs, hits, steps, errs = [], [], [], 0, 0, []
    for i in range(30):
        n, s = int(rng.integers(0, 8)), int(rng.integers(0, 10))
        gt = rng.uniform(0, 100, (n, 2))
        half = rng.uniform(2, 12, (n, 2))
        b = np.concatenate([gt - half, gt + half], 1)
        b[rng.random(n) < 0.3] = np.nan  # some point-only objects
        # predictions near true objects (some twice) and some anywhere
        pick = rng.integers(0, max(n, 1), s)
        pred = np.where(rng.random((s, 1)) < 0.7, gt[pick % max(n, 1)] + rng.normal(0, 4, (s, 2)) if n else 0,
                        rng.uniform(0, 100, (s, 2)))
        preds.append(pred)
        gts.append(gt)
        bxs.append(b)
        h, e = _brute_sequential(pred.tolist(), gt.tolist(), b.tolist(), 6.0)
        hits += h
        steps += s
        errs += e
    m = M.sequential_counting_metrics(preds, gts, bxs, radius=6.0)
    assert m["num_steps"] == steps and 0 < hits < steps
    assert m["hit_rate"] == pytest.approx(hits / steps, abs=0)  # integer counts: exact
    # means of the same float64 distances summed in another order: 1e-12 relative
    assert m["mean_point_error_px"] == pytest.approx(np.mean(errs), rel=1e-12)
    counts = np.array([len(p) for p in preds]), np.array([len(g) for g in gts])
    assert m["mae"] == pytest.approx(np.abs(counts[0] - counts[1]).mean(), rel=1e-12)
    assert m["rmse"] == pytest.approx(np.sqrt(((counts[0] - counts[1]) ** 2).mean()), rel=1e-12)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        M.sequential_counting_metrics([preds[0], preds[1]], [gts[0]])
