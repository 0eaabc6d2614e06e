"""Sequential counting at inference: predict the next object's centre, mark it, repeat (model-agnostic), and the
side-by-side pictures of a result.

`count_sequentially` drives any `predict_next(marked_image, prompt) -> (x_n, y_n)` (the model side supplies a
jitted one that re-encodes the marked image each step); `draw_counting_result` draws input | output with the
predicted numbered marks and the ground truth. Samples, marks, prompts and the normalisation are those of
`coordexp_jax.data.counting`, so a model sees at inference exactly what it saw in training.

Example::

    from coordexp_jax import counting
    from coordexp_jax.data import counting as C

    cfg = C.SequentialCountingConfig()
    res = counting.count_sequentially(image, "circle", predict_next, cfg, max_count=16)
    res.count, res.points, res.done_reason     # e.g. 5, [5, 2] pixels, "done"
    pic = counting.draw_counting_result(image, res.points, gt_points, caption=res.last_prompt)
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from coordexp_jax.data import counting as C
from coordexp_jax.data.records import Record

DONE_REASONS = ("done", "repeat", "max_count", "invalid")
GT_COLOUR = (30, 200, 60)


@dataclasses.dataclass(frozen=True)
class CountingResult:
    """The outcome of `count_sequentially`.

    points: `[count, 2]` float64 pixels (continuous) of the counted objects, in counting order.
    count: number of points. steps: calls of `predict_next`. done_reason: one of `DONE_REASONS`:
    "done" (the model answered (-1, -1) within `cfg.done_tol`), "repeat" (with `cfg.stop_on_repeat`: the point
    fell inside an earlier mark, i.e. on an object already counted), "max_count", "invalid" (a non-finite answer).
    predictions: `[steps, 2]` float64, every raw normalised answer. last_prompt: the prompt of the last step.
    """

    points: np.ndarray
    count: int
    steps: int
    done_reason: str
    predictions: np.ndarray
    last_prompt: str


def is_done(xy, tol: float) -> bool:
    """True when the normalised answer is the "all counted" signal: |x + 1| <= tol and |y + 1| <= tol."""
    x, y = (float(v) for v in xy)
    return abs(x + 1.0) <= tol and abs(y + 1.0) <= tol


def _class_name(record_meta) -> str:
    if isinstance(record_meta, str):
        return record_meta
    if isinstance(record_meta, Record):
        return C.counting_class(record_meta)
    if isinstance(record_meta, Mapping):
        for key in ("class_name", "class", "desc"):
            if isinstance(record_meta.get(key), str) and record_meta[key].strip():
                return record_meta[key]
    raise ValueError(f"record_meta must be a class name, a Record or a mapping with 'class_name', got "
                     f"{record_meta!r}"[:200])


def count_sequentially(image: np.ndarray, record_meta, predict_next: Callable[[np.ndarray, str], Sequence[float]],
                       cfg: C.SequentialCountingConfig, max_count: int) -> CountingResult:
    """Counts the objects of a class in `image` (uint8 `[H, W, 3]`) one at a time.

    `record_meta`: the class name, a `Record` (its counted class) or a mapping with `class_name`.
    `predict_next(marked_image uint8 [H, W, 3], prompt str) -> (x_n, y_n)` in [-1, 1] (`cfg.normalisation`); a
    model that needs the system text closes over `data.counting.counting_system_prompt(class_name, cfg)`.

    Loop: mark the points counted so far (`draw_marks`, numbered 1..k, the training marks), build the prompt for
    k, ask `predict_next`; stop on the done signal (`is_done`, `cfg.done_tol`), on a non-finite answer, with
    `cfg.stop_on_repeat` on a point within an earlier mark's radius, or after `max_count` points. Answers are
    clipped to [-1, 1] before conversion to pixels. MarkError when the image is too small for the marks.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"count_sequentially expects an [H, W, 3] image, got {img.shape}")
    img = img.astype(np.uint8, copy=False)
    if max_count < 0:
        raise ValueError(f"max_count must be >= 0, got {max_count}")
    h, w = img.shape[:2]
    cls = _class_name(record_meta)
    style = C.mark_style(h, w, scale=cfg.mark_scale)
    points: list[tuple[float, float]] = []
    preds: list[tuple[float, float]] = []
    prompt = C.counting_prompt(cls, 0, cfg)
    reason = "max_count"
    while len(points) < max_count:
        prompt = C.counting_prompt(cls, len(points), cfg)
        marked = C.draw_marks(img, np.asarray(points, np.float64).reshape(-1, 2), style=style)
        out = np.asarray(predict_next(marked, prompt), np.float64).reshape(-1)
        if out.shape != (2,):
            raise ValueError(f"predict_next must return (x_n, y_n), got shape {out.shape}")
        preds.append((float(out[0]), float(out[1])))
        if not np.all(np.isfinite(out)):
            reason = "invalid"
            break
        if is_done(out, cfg.done_tol):
            reason = "done"
            break
        px = C.denormalise_points(np.clip(out, -1.0, 1.0), w, h, cfg.normalisation)
        if cfg.stop_on_repeat and points:
            d = np.hypot(*(np.asarray(points) - px).T)
            if d.min() <= style.radius:
                reason = "repeat"
                break
        points.append((float(px[0]), float(px[1])))
    return CountingResult(points=np.asarray(points, np.float64).reshape(-1, 2), count=len(points),
                          steps=len(preds), done_reason=reason,
                          predictions=np.asarray(preds, np.float64).reshape(-1, 2), last_prompt=prompt)


# ----------------------------------------------------------------------------------------------- pictures
def _draw_gt(d: ImageDraw.ImageDraw, pts: np.ndarray, boxes: np.ndarray | None, scale: float, r: float, lw: int):
    for j, (x, y) in enumerate(pts):
        b = None if boxes is None or j >= len(boxes) or np.isnan(boxes[j]).any() else boxes[j]
        if b is not None:
            d.rectangle([b[0] * scale, b[1] * scale, b[2] * scale - 1, b[3] * scale - 1], outline=GT_COLOUR,
                        width=lw)
        cx, cy = x * scale - 0.5, y * scale - 0.5  # a cross at the true centre
        d.line([cx - r, cy - r, cx + r, cy + r], fill=GT_COLOUR, width=lw)
        d.line([cx - r, cy + r, cx + r, cy - r], fill=GT_COLOUR, width=lw)


def draw_counting_result(image: np.ndarray, pred_points, gt_points=None, caption: str | None = None, *,
                         gt_boxes=None, min_side: int = 384, title: str | None = None) -> np.ndarray:
    """Side-by-side picture, uint8 `[H', W', 3]`: left the input image, right the output: the ground truth in
    green (boxes when given (`[N, 4]` pixels; NaN rows skipped), and an x at every true centre) under the
    predicted points as numbered marks (1..n in counting order, the training marks). A header names the panels
    with the predicted and true counts; `caption` (e.g. the prompt) is written below, wrapped.

    Points are pixels of `image` (`[n, 2]`, continuous). Images whose longer side is under `min_side` are
    upscaled (nearest) first, so marks and text stay readable at any size; the text scales with the panel.
    """
    img = np.asarray(image).astype(np.uint8, copy=False)
    h, w = img.shape[:2]
    scale = max(1.0, min_side / max(h, w))
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    base = Image.fromarray(img).resize((sw, sh), Image.NEAREST) if scale != 1.0 else Image.fromarray(img)
    pred = np.asarray(pred_points, np.float64).reshape(-1, 2) * scale
    gt = None if gt_points is None else np.asarray(gt_points, np.float64).reshape(-1, 2)
    boxes = None if gt_boxes is None else np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    out = base.copy()
    style = C.mark_style(sh, sw)
    if gt is not None:
        lw = max(1, style.ring)
        if boxes is not None and len(boxes) != len(gt):
            raise ValueError(f"{len(boxes)} ground-truth boxes for {len(gt)} ground-truth points")
        _draw_gt(ImageDraw.Draw(out), gt, boxes, scale, max(3.0, style.radius * 0.6), lw)
    out = Image.fromarray(C.draw_marks(np.asarray(out), pred, style=style))

    font_px = max(C.MIN_FONT + 4, round(0.035 * min(sw, sh) + 6))
    font = C._font(font_px)
    gap = max(4, font_px // 3)
    n_true = "?" if gt is None else str(len(gt))
    heads = [title or "input", f"output: {len(pred)} counted (true {n_true})"]
    cap_lines: list[str] = []
    if caption:
        chars = max(20, int(2 * sw / (0.55 * font_px)))
        for para in str(caption).splitlines() or [""]:
            cap_lines += textwrap.wrap(para, chars) or [""]
    line_h = font_px + gap // 2
    head_h = line_h + gap
    cap_h = (len(cap_lines) * line_h + gap) if cap_lines else 0
    W, H = 2 * sw + 3 * gap, head_h + sh + gap + cap_h
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    canvas.paste(base, (gap, head_h))
    canvas.paste(out, (2 * gap + sw, head_h))
    d = ImageDraw.Draw(canvas)
    for i, t in enumerate(heads):
        d.text((gap + i * (sw + gap), gap // 2), t, fill=(0, 0, 0), font=font)
    y = head_h + sh + gap
    for line in cap_lines:
        d.text((gap, y), line, fill=(40, 40, 40), font=font)
        y += line_h
    return np.asarray(canvas)


def result_caption(result: CountingResult, gt_count: int | None = None, prompt: str | None = None) -> str:
    """A one-line summary of a result (count, truth, steps, stop reason) followed by the prompt, for captions."""
    head = f"count {result.count}" + (f" (true {gt_count})" if gt_count is not None else "")
    head += f", {result.steps} steps, stopped: {result.done_reason}"
    p = prompt if prompt is not None else result.last_prompt
    return head + ("\n" + p if p else "")


def mark_radius(height: int, width: int, max_count: int, cfg: C.SequentialCountingConfig) -> float:
    """The mark radius (pixels) `count_sequentially` uses on a `height` x `width` image: the natural hit radius
    for point-only ground truth in `metrics.sequential_counting_metrics`. The radius does not depend on
    `max_count` (marks are sized for two-digit numbers whatever the count; longer numbers get a smaller font)."""
    return float(C.mark_style(height, width, scale=cfg.mark_scale).radius)


__all__ = ["CountingResult", "DONE_REASONS", "count_sequentially", "draw_counting_result", "is_done",
           "mark_radius", "result_caption"]

