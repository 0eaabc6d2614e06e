"""Evaluation metrics with the field's own tools (coordexp_method.md §9).

Detection: COCO mAP / AP50 / AP75 with pycocotools under two score rules (VLM answers carry no scores):
`constant` (every box scores 1.0; AP then depends on emission order) and `logprob` (exp of the mean log-prob of
the box's four coordinate tokens, CoordExp's rule). Also F1 at IoU 0.5 with greedy 1:1 matching, and the answer
health rates: parse failures, invalid boxes, duplicates (IoU > 0.9 with an earlier box of the same desc).
Grounding: Acc@0.5 with IoU >= 0.5. Counting: MAE and RMSE.

All boxes here are in pixels of the original image, (x1, y1, x2, y2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
from collections.abc import Sequence

import numpy as np

from coordexp_jax.coord.boxes import pairwise_iou_exact
from coordexp_jax.coord.matching import greedy_iou_match

SCORE_RULES = ("constant", "logprob")


@dataclasses.dataclass
class PredObject:
    desc: str
    bbox: tuple[float, float, float, float]  # pixels, xyxy
    score: float = 1.0  # exp(mean log-prob of the 4 coordinate tokens)


@dataclasses.dataclass
class ImageResult:
    """Ground truth and prediction for one image."""

    image_id: int
    width: int
    height: int
    gt: list[PredObject]
    pred: list[PredObject]
    parsed: bool = True  # False when the answer could not be parsed at all


def is_valid_box(box: Sequence[float], width: int, height: int) -> bool:
    """A box is valid when finite, x2 > x1, y2 > y1, and inside the image (1 px slack for rounding)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return False
    return x2 > x1 and y2 > y1 and x1 >= -1 and y1 >= -1 and x2 <= width + 1 and y2 <= height + 1


def duplicate_count(objects: Sequence[PredObject], iou_threshold: float = 0.9) -> int:
    """Objects whose box has IoU > threshold with an EARLIER box of the same desc."""
    dup = 0
    for i, o in enumerate(objects):
        earlier = [p.bbox for p in objects[:i] if p.desc == o.desc]
        if earlier and pairwise_iou_exact(np.array([o.bbox]), np.array(earlier)).max() > iou_threshold:
            dup += 1
    return dup


@dataclasses.dataclass
class ImageMatch:
    """Greedy 1:1 matching of one image's predictions to its ground truth (see `match_image`).

    pred_to_gt [P] int: index of the matched gt box, -1 = false positive.
    gt_matched [G] bool: True when some prediction matched it, False = miss (false negative).
    ious [P] float: IoU of each prediction with its matched gt box, nan when unmatched.
    tp, fp, fn: counts (tp = matched pairs, fp = P - tp, fn = G - tp).
    mean_iou: mean IoU over the matched pairs, nan when there are none.
    """

    pred_to_gt: np.ndarray
    gt_matched: np.ndarray
    ious: np.ndarray
    tp: int
    fp: int
    fn: int
    mean_iou: float


def _desc_box(o) -> tuple[str, tuple[float, float, float, float]]:
    """(desc, bbox) of an object with `.desc`/`.bbox` attributes or a dict {"desc", "bbox"}."""
    if isinstance(o, dict):
        return o["desc"], tuple(float(v) for v in o["bbox"])
    return o.desc, tuple(float(v) for v in o.bbox)


def match_image(pred: Sequence, gt: Sequence, iou_threshold: float = 0.5, match_desc: bool = True) -> ImageMatch:
    """Match one image's predictions to its ground truth with `coord.matching.greedy_iou_match`: pairs in order
    of decreasing IoU (ties: lower pred index, then lower gt index), accepted when IoU >= `iou_threshold` and,
    with `match_desc`, the descs are equal. The same rule as `greedy_match_f1` (which pools these counts).

    pred [P], gt [G]: objects with `.desc` / `.bbox` (e.g. `PredObject`) or dicts {"desc", "bbox"}; boxes in
    pixels, (x1, y1, x2, y2). IoU is the exact float64 IoU of `coord.boxes.pairwise_iou_exact`.
    Returns an `ImageMatch`.
    """
    p_desc, p_box = zip(*(_desc_box(o) for o in pred)) if len(pred) else ((), ())
    g_desc, g_box = zip(*(_desc_box(o) for o in gt)) if len(gt) else ((), ())
    labels = (list(p_desc), list(g_desc)) if match_desc else (None, None)
    p2g = greedy_iou_match(list(p_box), list(g_box), iou_threshold, *labels)
    gt_matched = np.zeros(len(g_box), bool)
    gt_matched[p2g[p2g >= 0]] = True
    ious = np.full(len(p_box), np.nan)
    hit = np.nonzero(p2g >= 0)[0]
    if hit.size:
        iou = pairwise_iou_exact(np.asarray(p_box, np.float64), np.asarray(g_box, np.float64))
        ious[hit] = iou[hit, p2g[hit]]
    tp = int(hit.size)
    return ImageMatch(pred_to_gt=p2g, gt_matched=gt_matched, ious=ious, tp=tp, fp=len(p_box) - tp,
                      fn=len(g_box) - tp, mean_iou=float(ious[hit].mean()) if tp else float("nan"))


def greedy_match_f1(results: Sequence[ImageResult], iou_threshold: float = 0.5, match_desc: bool = True) -> dict:
    """Precision/recall/F1 pooled over images, with `match_image` per image (greedy 1:1 matching in order of
    decreasing IoU, accepted when IoU >= threshold and, with `match_desc`, descs are equal)."""
    tp = n_pred = n_gt = 0
    for r in results:
        n_pred += len(r.pred)
        n_gt += len(r.gt)
        tp += match_image(r.pred, r.gt, iou_threshold, match_desc).tp
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gt if n_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "n_pred": n_pred, "n_gt": n_gt}


def to_coco(results: Sequence[ImageResult], categories: Sequence[str], score_rule: str = "logprob"):
    """COCO ground-truth dict and detection list. Predictions whose desc is not a category are left out
    (counted in the returned `unknown_desc`)."""
    if score_rule not in SCORE_RULES:
        raise ValueError(f"score_rule must be one of {SCORE_RULES}, got {score_rule!r}")
    cat_id = {name: i + 1 for i, name in enumerate(categories)}
    images, anns, dets = [], [], []
    unknown = 0
    for r in results:
        images.append({"id": int(r.image_id), "width": int(r.width), "height": int(r.height)})
        for g in r.gt:
            if g.desc not in cat_id:
                raise ValueError(f"ground-truth desc {g.desc!r} of image {r.image_id} is not in the categories")
            x1, y1, x2, y2 = (float(v) for v in g.bbox)
            anns.append({"id": len(anns) + 1, "image_id": int(r.image_id), "category_id": cat_id[g.desc],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for p in r.pred:
            if p.desc not in cat_id:
                unknown += 1
                continue
            x1, y1, x2, y2 = (float(v) for v in p.bbox)
            score = 1.0 if score_rule == "constant" else float(p.score)
            # An inverted box would get a negative area, which pycocotools treats as outside every area range and
            # so IGNORES instead of counting a false positive: give it zero size (IoU 0, a false positive).
            dets.append({"image_id": int(r.image_id), "category_id": cat_id[p.desc],
                         "bbox": [x1, y1, max(x2 - x1, 0.0), max(y2 - y1, 0.0)], "score": score})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": i, "name": n} for n, i in cat_id.items()]}
    return gt, dets, unknown


def coco_map(results: Sequence[ImageResult], categories: Sequence[str], score_rule: str = "logprob") -> dict:
    """COCO bbox mAP, AP50, AP75 (pycocotools, maxDets 100, area 'all') under one score rule."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_dict, dets, unknown = to_coco(results, categories, score_rule)
    out = {"unknown_desc": unknown, "num_dets": len(dets)}
    if not gt_dict["annotations"] or not dets:
        return {**out, "AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dict
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # pycocotools reports -1 where a category has no ground truth at all; stats[0..2] = AP, AP50, AP75.
    ap, ap50, ap75 = (max(float(s), 0.0) for s in ev.stats[:3])
    return {**out, "AP": ap, "AP50": ap50, "AP75": ap75}


def detection_metrics(results: Sequence[ImageResult], categories: Sequence[str]) -> dict:
    """Everything the detection evaluation reports: mAP under both score rules, F1@0.5 and the health rates."""
    n_pred = sum(len(r.pred) for r in results)
    out = {}
    for rule in SCORE_RULES:
        m = coco_map(results, categories, rule)
        out.update({f"{k}_{rule}": v for k, v in m.items() if k in ("AP", "AP50", "AP75")})
        out["unknown_desc_rate"] = m["unknown_desc"] / n_pred if n_pred else 0.0
    f1 = greedy_match_f1(results)
    out.update({"f1@0.5": f1["f1"], "precision@0.5": f1["precision"], "recall@0.5": f1["recall"]})
    out["parse_failure_rate"] = sum(not r.parsed for r in results) / len(results) if results else 0.0
    invalid = sum(not is_valid_box(p.bbox, r.width, r.height) for r in results for p in r.pred)
    out["invalid_box_rate"] = invalid / n_pred if n_pred else 0.0
    out["duplicate_rate"] = sum(duplicate_count(r.pred) for r in results) / n_pred if n_pred else 0.0
    out["num_images"] = len(results)
    out["num_pred"] = n_pred
    out["num_gt"] = sum(len(r.gt) for r in results)
    return out


def grounding_accuracy(pred_boxes: Sequence[Sequence[float] | None], gt_boxes: Sequence[Sequence[float]],
                       iou_threshold: float = 0.5) -> float:
    """Acc@0.5: fraction of referring expressions whose (first) predicted box has IoU >= threshold with the
    ground truth. A missing prediction (None) counts as wrong."""
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"{len(pred_boxes)} predictions for {len(gt_boxes)} ground-truth boxes")
    if not gt_boxes:
        return 0.0
    hits = 0
    for p, g in zip(pred_boxes, gt_boxes):
        if p is not None and pairwise_iou_exact(np.array([p]), np.array([g]))[0, 0] >= iou_threshold:
            hits += 1
    return hits / len(gt_boxes)


def counting_errors(pred_counts: Sequence[float], gt_counts: Sequence[float]) -> dict:
    """MAE and RMSE of predicted counts."""
    p = np.asarray(pred_counts, np.float64)
    g = np.asarray(gt_counts, np.float64)
    if p.shape != g.shape:
        raise ValueError(f"{p.shape[0]} predicted counts for {g.shape[0]} ground-truth counts")
    if p.size == 0:
        return {"mae": 0.0, "rmse": 0.0}
    return {"mae": float(np.abs(p - g).mean()), "rmse": float(np.sqrt(((p - g) ** 2).mean()))}


# ----------------------------------------------------------------------------------------------- sequential counting
# Sequential counting (coordexp_jax/counting.py): the model names one object per step. A step's point "hits" an
# uncounted object when it lies inside that object's box, or, for objects annotated with a point only, within
# `radius` pixels of the point. Pixels throughout (continuous, of the original image).


def _uncounted_hit(point: np.ndarray, centres: np.ndarray, boxes: np.ndarray | None, radius: float | None,
                   open_: np.ndarray) -> int:
    """Index of the uncounted (`open_`) object the point hits (the one with the nearest centre when several do), or
    -1. Objects with a box (a non-NaN row of `boxes` [N, 4]) are hit inside it (edges included); the others within
    `radius` of their centre."""
    d = np.hypot(centres[:, 0] - point[0], centres[:, 1] - point[1])
    has_box = np.zeros(len(centres), bool) if boxes is None else ~np.isnan(boxes).any(1)
    hit = np.zeros(len(centres), bool)
    if has_box.any():
        b = boxes[has_box]
        hit[has_box] = (b[:, 0] <= point[0]) & (point[0] <= b[:, 2]) & (b[:, 1] <= point[1]) & (point[1] <= b[:, 3])
    if (~has_box).any():
        if radius is None:
            raise ValueError("objects without a box need a hit radius (pixels)")
        hit[~has_box] = d[~has_box] <= radius
    hit &= open_
    if not hit.any():
        return -1
    return int(np.flatnonzero(hit)[np.argmin(d[hit])])


def sequential_point_metrics(pred_points, gt_points, gt_boxes=None, radius: float | None = None) -> dict:
    """Per-step scores of one image's counting sequence.

    `pred_points` `[S, 2]`: the points in the order the model named them; `gt_points` `[N, 2]` true centres;
    `gt_boxes` `[N, 4]` (x1, y1, x2, y2; NaN rows for point-only objects) or None; `radius` (pixels) the hit radius
    for point-only objects. Step s hits when its point hits an object not yet counted (`_uncounted_hit`); the hit
    object is then counted (claimed), so naming an object twice hits once. The point error of a step is the
    distance to the nearest uncounted centre (steps after every object is counted have none).

    Returns {"steps": S, "hits": int, "hit_rate": hits / S (0 when S = 0), "point_errors": [float] px,
    "mean_point_error_px": mean of point_errors (NaN when empty)}.
    """
    pred = np.asarray(pred_points, np.float64).reshape(-1, 2)
    gt = np.asarray(gt_points, np.float64).reshape(-1, 2)
    boxes = None if gt_boxes is None else np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    if boxes is not None and len(boxes) != len(gt):
        raise ValueError(f"{len(boxes)} ground-truth boxes for {len(gt)} ground-truth points")
    open_ = np.ones(len(gt), bool)
    hits, errs = 0, []
    for p in pred:
        if open_.any():
            errs.append(float(np.hypot(*(gt[open_] - p).T).min()))
        j = _uncounted_hit(p, gt, boxes, radius, open_) if len(gt) else -1
        if j >= 0:
            hits += 1
            open_[j] = False
    return {"steps": len(pred), "hits": hits, "hit_rate": hits / len(pred) if len(pred) else 0.0,
            "point_errors": errs, "mean_point_error_px": float(np.mean(errs)) if errs else float("nan")}


def sequential_counting_metrics(pred_points: Sequence, gt_points: Sequence, gt_boxes: Sequence | None = None,
                                radius: float | Sequence[float] | None = None) -> dict:
    """Counting MAE / RMSE (`counting_errors` of the number of predicted points), next-point hit rate and mean
    point error (pixels), pooled over images.

    Lists per image: `pred_points[i]` `[S_i, 2]`, `gt_points[i]` `[N_i, 2]`, `gt_boxes[i]` `[N_i, 4]` or None;
    `radius` one float or one per image. hit_rate = all hits / all predicted points; mean_point_error_px = the mean
    over every step that had an uncounted object (`sequential_point_metrics`; NaN when none).
    """
    if len(pred_points) != len(gt_points):
        raise ValueError(f"{len(pred_points)} predictions for {len(gt_points)} ground-truth images")
    n = len(gt_points)
    boxes = list(gt_boxes) if gt_boxes is not None else [None] * n
    radii = list(radius) if isinstance(radius, (list, tuple, np.ndarray)) else [radius] * n
    hits = steps = 0
    errs: list[float] = []
    for p, g, b, r in zip(pred_points, gt_points, boxes, radii):
        m = sequential_point_metrics(p, g, b, r)
        hits += m["hits"]
        steps += m["steps"]
        errs += m["point_errors"]
    out = counting_errors([len(np.asarray(p).reshape(-1, 2)) for p in pred_points],
                          [len(np.asarray(g).reshape(-1, 2)) for g in gt_points])
    out.update({"hit_rate": hits / steps if steps else 0.0,
                "mean_point_error_px": float(np.mean(errs)) if errs else float("nan"),
                "num_images": n, "num_steps": steps})
    return out
