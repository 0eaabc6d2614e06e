"""Sequential counting samples (the VLM-regression counting recipe): objects counted one at a time, the image
showing the objects counted so far as numbered marks, the prompt ending in `<x> <y>`, the target the next object's
centre in [-1, 1] (or (-1, -1) when all are counted).

Pure numpy / PIL, no model inside. The model side turns a `CountingSample` into token ids and pixels with the
project's encoder (`data/prompts.py`): `sample.system` and `sample.prompt` are the chat's system and user text,
`sample.image` the marked uint8 image; the two regression heads read the final hidden states at the `<x>` and
`<y>` tokens (`X_TOKEN`, `Y_TOKEN`), which end the prompt.

Example (the API below is stable; the model side imports it)::

    from coordexp_jax.data import counting as C
    from coordexp_jax.data import records, image as image_lib

    recs, _ = records.read_jsonl("train.jsonl")
    cfg = C.SequentialCountingConfig(order="reading")            # include_done=False as in the seed recipe
    sampler = C.CountingSampler(recs, cfg, seed=0)              # bad records: RecordError or a counted skip
    s = sampler.sample(0, epoch=0)                              # k drawn uniformly in 0..n-1 (seeded)
    s.image      # uint8 [H, W, 3], the first k objects (in the chosen order) marked 1..k
    s.system     # "You are a vision assistant that locates circles in images systematically."
    s.prompt     # "Count the circles in this image. ... Next location: <x> <y>"
    s.target     # float32 [2], x_n = 2 x / W - 1, y_n = 2 y / H - 1 of the (k+1)-th centre; (-1, -1) when done
    s.done, s.k, s.n

    # or one sample by hand
    img = image_lib.load_image(recs[0].image)
    s = C.build_counting_sample(recs[0], img, k=2, cfg=cfg)

Pieces:

- `object_centres(record)`: `[N, 2]` pixel centres (points, or box centres), with the records policy
  (`COUNTING_POLICY`) for a record without points or boxes, several classes, or zero instances of the class.
- `order_objects(points, strategy)`: the counting order (`ORDERS`): `reading` (rows top to bottom, each left to
  right; a point joins a row when its y is within `row_tol` of the row's first point), `left_to_right` (by x, then
  y), `nearest_neighbour` (from the point nearest the image's top-left corner, then always the nearest
  unvisited one) and `random` (a permutation drawn per sample; only with the `set` target).
- Targets (`TARGETS`): `ordered` (the seed's: the (k+1)-th centre in the order) or `set` (every unmarked centre
  is a right answer: `CountingSample.candidates`, and the objective takes the loss against the nearest one,
  `train/counting_objective.py`).
- `draw_marks(image, points)`: numbered marks (a filled white disc with a black ring and the number in black,
  without anti-aliasing, so every mark pixel is one of `MARK_FILL`, `MARK_RING`); sizes scale with the image
  (`mark_style`); `MarkError` when the image is too small for readable marks.
- `counting_prompt` / `counting_system_prompt`: the seed's template with the class name filled in.
- `build_counting_sample`, `draw_k`, `CountingSampler`.

Coordinates: pixels are continuous (pixel i covers [i, i+1), the records' "continuous" mode); normalisation
`continuous`: x_n = 2 x / W - 1 (image edges at -1 and 1), `pixel_centres`: x_n = 2 (x - 0.5) / (W - 1) - 1
(the centres of the first and last pixels at -1 and 1).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from coordexp_jax.errors import CoordExpError
from coordexp_jax.data import image as image_lib
from coordexp_jax.data.records import DataConfigError, Record, RecordError, ValidationReport

log = logging.getLogger(__name__)

X_TOKEN = "<x>"
Y_TOKEN = "<y>"
ORDERS = ("reading", "left_to_right", "nearest_neighbour", "random")
TARGETS = ("ordered", "set")
NORMALISATIONS = ("continuous", "pixel_centres")
DONE_TARGET = (-1.0, -1.0)

# policy for counting records (reason -> action), like records.DEFAULT_POLICY; first option is the default
COUNTING_ACTIONS = {
    "missing_field": ("error", "skip"),  # an object with neither point nor box; no objects and no class name
    "bad_value": ("error", "skip"),  # several classes in one record (pass desc= to count one of them)
    "no_objects": ("skip", "error", "keep"),  # zero instances of the class (keep: n = 0, done samples only)
    "image_too_small": ("skip", "error"),  # the image cannot hold readable numbered marks (`mark_style`)
}
COUNTING_POLICY = {k: v[0] for k, v in COUNTING_ACTIONS.items()}

MARK_FILL = (255, 255, 255)
MARK_RING = (0, 0, 0)
MARK_TEXT = (0, 0, 0)
MIN_RADIUS = 7  # px: the smallest mark disc radius (ring included)
RADIUS_FRAC = 0.035  # mark radius as a fraction of the image's shorter side
MIN_FONT = 8  # px: numbers smaller than this are not readable
EDGE_EPS = 1e-6  # px: a point this close below a pixel edge is drawn on the next pixel
MAX_MARK_FRAC = 0.5  # a mark's diameter may be at most this fraction of the image's shorter side

ORDER_RULES = {
    "reading": "from top-to-bottom, left-to-right",
    "left_to_right": "from left to right",
    "nearest_neighbour": "starting at the top-left, always moving to the nearest unmarked one",
    "random": "in any order",
}
SEED_SYSTEM = "You are a vision assistant that locates {plural} in images systematically."
SEED_TEMPLATE = ("Count the {plural} in this image. {marked} already marked with numbered labels.\n\n"
                 "Task: Predict the (x, y) location of the next unmarked {singular}.\n\n"
                 "Rules:\n"
                 "1. Output x, y as normalized coordinates in [-1, 1]\n"
                 "2. If all {plural} are marked, output x=-1, y=-1\n"
                 "3. Count systematically {order_rule}\n\n"
                 "Next location: <x> <y>")


class MarkError(CoordExpError, ValueError):
    """An image is too small for readable numbered marks; the message names the image size and the minimum."""


class CountingConfigError(CoordExpError, ValueError):
    """A `SequentialCountingConfig` field is wrong; the message names it."""


# ----------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class SequentialCountingConfig:
    """How sequential counting samples are made (and read back at inference).

    - `order`: one of `ORDERS` (`random` needs `target` 'set'). `target`: one of `TARGETS` (module docstring).
      `set_band` (normalised units; `set` target with order `left_to_right` only): the candidates are the unmarked
      objects whose x_n is within `set_band` of the next object's (near-ties along the order's axis); 0 = every
      unmarked object.
      `row_tol`: the reading order's row tolerance in pixels (None: half the median
      box height when every object has a box, else half the median nearest-neighbour distance of the centres).
    - `include_done`: draw "all counted" samples (k = n, target (-1, -1)); off by default, as in the seed recipe.
      `done_prob`: with `include_done`, the probability that a draw is the done sample (records with n = 0
      kept by the policy always give it).
    - `template` / `system_template`: the seed's user and system prompts; fields `{plural}`, `{singular}`,
      `{marked}` ("1 object is" / "5 objects are"), `{k}`, `{order_rule}`. The template must end with `<x> <y>`.
      `system_template` None: no system prompt. `plurals`: (singular, plural) pairs overriding `plural()`.
    - `normalisation`: one of `NORMALISATIONS` (module docstring).
    - inference (`coordexp_jax.counting.count_sequentially`): `done_tol` (a prediction with |x+1| and |y+1| both
      <= done_tol is "all counted"), `stop_on_repeat` (stop when a prediction falls on an already marked object:
      within its mark radius), `mark_scale` (multiplies the mark radius; 1.0 = `mark_style`'s).
    - `mark_jitter` (training samples; 0 = off): each mark is drawn at a random point of the object instead of its
      centre, uniform in the box shrunk about the centre by this factor (1: anywhere in the box; point-only
      objects: within this fraction of the mark radius). At inference a mark goes where the model pointed, which
      is rarely the exact centre; jittered training marks show that an off-centre mark still counts the object.
    """

    order: str = "reading"
    target: str = "ordered"
    set_band: float = 0.0
    row_tol: float | None = None
    include_done: bool = False
    done_prob: float = 0.1
    template: str = SEED_TEMPLATE
    system_template: str | None = SEED_SYSTEM
    plurals: tuple = ()
    normalisation: str = "continuous"
    done_tol: float = 0.05
    stop_on_repeat: bool = True
    mark_scale: float = 1.0
    mark_jitter: float = 0.0

    def __post_init__(self):
        if self.order not in ORDERS:
            raise CountingConfigError(f"SequentialCountingConfig.order must be one of {ORDERS}, got {self.order!r}")
        if self.target not in TARGETS:
            raise CountingConfigError(f"SequentialCountingConfig.target must be one of {TARGETS}, "
                                      f"got {self.target!r}")
        if not self.set_band >= 0:
            raise CountingConfigError(f"SequentialCountingConfig.set_band must be >= 0, got {self.set_band}")
        if self.set_band > 0 and (self.target != "set" or self.order != "left_to_right"):
            raise CountingConfigError("SequentialCountingConfig.set_band needs target 'set' and order 'left_to_right'")
        if self.order == "random" and self.target != "set":
            raise CountingConfigError("SequentialCountingConfig.order 'random' needs target 'set' (a random next "
                                      "object cannot be predicted)")
        if self.normalisation not in NORMALISATIONS:
            raise CountingConfigError(f"SequentialCountingConfig.normalisation must be one of {NORMALISATIONS}, "
                                      f"got {self.normalisation!r}")
        if not 0.0 <= self.done_prob <= 1.0:
            raise CountingConfigError(f"SequentialCountingConfig.done_prob must be in [0, 1], got {self.done_prob}")
        if self.row_tol is not None and not self.row_tol >= 0:
            raise CountingConfigError(f"SequentialCountingConfig.row_tol must be >= 0 or None, got {self.row_tol}")
        if not self.template.rstrip().endswith(f"{X_TOKEN} {Y_TOKEN}"):
            raise CountingConfigError(f"SequentialCountingConfig.template must end with '{X_TOKEN} {Y_TOKEN}' "
                                      f"(the heads read those two tokens), got ...{self.template[-40:]!r}")
        if not 0.0 <= self.done_tol < 1.0:
            raise CountingConfigError(f"SequentialCountingConfig.done_tol must be in [0, 1), got {self.done_tol}")
        if not 0.0 <= self.mark_jitter <= 1.0:
            raise CountingConfigError(f"SequentialCountingConfig.mark_jitter must be in [0, 1], got {self.mark_jitter}")
        if not self.mark_scale > 0:
            raise CountingConfigError(f"SequentialCountingConfig.mark_scale must be > 0, got {self.mark_scale}")


def _check_policy(policy: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(COUNTING_POLICY)
    for k, v in (policy or {}).items():
        if k not in COUNTING_ACTIONS:
            raise DataConfigError(f"unknown counting policy key {k!r}; known: {sorted(COUNTING_ACTIONS)}")
        if v not in COUNTING_ACTIONS[k]:
            raise DataConfigError(f"counting policy[{k!r}] must be one of {COUNTING_ACTIONS[k]}, got {v!r}")
        out[k] = v
    return out


class _Skip(Exception):
    pass


def _fail(record: Record, reason: str, detail: str, policy: Mapping[str, str], report: ValidationReport | None):
    """Applies the policy: RecordError naming the record's file:line, or a counted skip (raises _Skip)."""
    if policy[reason] == "error":
        raise RecordError(record.source, reason, detail)
    if report is not None:
        report.add(reason, record.source, detail)
    log.debug("%s: %s: %s (skipped)", record.source, reason, detail)
    raise _Skip(reason)


# ----------------------------------------------------------------------------------------------- centres
def counting_class(record: Record, desc: str | None = None) -> str:
    """The class a counting record counts: `desc` when given, else its objects' one desc, else
    `metadata["class"]` (records with zero instances). RecordError (naming file:line) when it has several descs
    and no `desc` is given, or no object and no `metadata.class`."""
    if desc is not None:
        return desc
    descs = sorted({o.desc for o in record.objects})
    if len(descs) > 1:
        raise RecordError(record.source, "bad_value", f"a counting record holds one class; it has {descs[:6]} "
                                                      f"(pass desc= to count one of them)")
    if descs:
        return descs[0]
    cls = record.metadata.get("class") if isinstance(record.metadata, Mapping) else None
    if isinstance(cls, str) and cls.strip():
        return cls
    raise RecordError(record.source, "missing_field", "no objects and no metadata.class: the class to count is "
                                                      "unknown")


def _class_objects(record: Record, desc: str | None, policy, report):
    if not record.objects and policy["no_objects"] != "keep":  # nothing to count: the class does not matter
        _fail(record, "no_objects", "no objects", policy, report)
    try:
        cls = counting_class(record, desc)
    except RecordError as e:
        _fail(record, e.reason, e.detail, policy, report)
    objs = [(i, o) for i, o in enumerate(record.objects) if o.desc == cls]
    for i, o in objs:
        if o.point is None and o.box is None:
            _fail(record, "missing_field", f"objects[{i}] ({o.desc!r}) has neither point_2d nor bbox_2d", policy,
                  report)
    if not objs:
        detail = f"zero instances of {cls!r}"
        if policy["no_objects"] != "keep":
            _fail(record, "no_objects", detail, policy, report)
        if report is not None:
            report.add("no_objects", record.source, detail + " (kept: done samples only)")
    return cls, [o for _, o in objs]


def _centres_boxes(record: Record, objs) -> tuple[np.ndarray, np.ndarray]:
    w, h = record.width, record.height
    pts = np.zeros((len(objs), 2), np.float64)
    boxes = np.full((len(objs), 4), np.nan, np.float64)
    for j, o in enumerate(objs):
        if o.box is not None:
            b = np.asarray(o.box, np.float64) * [w, h, w, h]
            boxes[j] = b
            pts[j] = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
        if o.point is not None:  # a point wins over the box centre (records keep one of the two today)
            pts[j] = (o.point[0] * w, o.point[1] * h)
    return pts, boxes


def object_centres(record: Record, desc: str | None = None, *, policy: Mapping[str, str] | None = None,
                   report: ValidationReport | None = None) -> np.ndarray | None:
    """Pixel centres `[N, 2]` float64 (x, y; continuous pixels of the record's width x height) of the objects of
    the counted class (`counting_class`): the point when the object has one, else its box centre.

    Policy (`COUNTING_POLICY`, override any entry): an object with neither point nor box (`missing_field`),
    several classes without `desc` (`bad_value`), zero instances of the class (`no_objects`; default skip,
    `keep` returns an empty `[0, 2]` array). Under `error`: RecordError naming the record's file:line; under
    `skip`: None, counted in `report`.
    """
    got = object_geometry(record, desc, policy=policy, report=report)
    return None if got is None else got[0]


def object_geometry(record: Record, desc: str | None = None, *, policy: Mapping[str, str] | None = None,
                    report: ValidationReport | None = None):
    """`(centres [N, 2], boxes [N, 4], class name)` in pixels (boxes x1, y1, x2, y2; a NaN row for an object
    annotated with a point only), or None when the policy skips the record; see `object_centres`."""
    pol = _check_policy(policy)
    try:
        cls, objs = _class_objects(record, desc, pol, report)
    except _Skip:
        return None
    pts, boxes = _centres_boxes(record, objs)
    return pts, boxes, cls


# ----------------------------------------------------------------------------------------------- orderings
def default_row_tol(points: np.ndarray, boxes: np.ndarray | None = None) -> float:
    """The reading order's default row tolerance (pixels): half the median box height when every object has a
    box, else half the median nearest-neighbour distance of the points (0 for fewer than 2 points)."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    if boxes is not None and len(boxes) and not np.isnan(boxes).any():
        return 0.5 * float(np.median(np.asarray(boxes)[:, 3] - np.asarray(boxes)[:, 1]))
    if len(points) < 2:
        return 0.0
    d = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return 0.5 * float(np.median(d.min(1)))


def order_objects(points, strategy: str, row_tol: float | None = None,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """The counting order of `points` `[N, 2]` (pixels, x, y): a permutation `[N]` int64 (`points[perm]` is the
    order). Ties are broken by the index, so the order is deterministic.

    - `reading`: rows top to bottom, each row left to right. Rows are formed greedily over the points sorted by
      y: the topmost unassigned point opens a row, and every point whose y is within `row_tol` of that point's y
      joins it (anchored at the row's first point, so rows never chain). `row_tol` None: `default_row_tol`.
    - `left_to_right`: by x, then y.
    - `nearest_neighbour`: from the point nearest (Euclidean) to the top-left corner (0, 0), then always the
      nearest unvisited point (greedy; the travelling-salesman heuristic).
    - `random`: `rng.permutation(N)` (ValueError without `rng`).
    """
    p = np.asarray(points, np.float64).reshape(-1, 2)
    n = len(p)
    idx = np.arange(n)
    if strategy not in ORDERS:
        raise CountingConfigError(f"order must be one of {ORDERS}, got {strategy!r}")
    if strategy == "random":
        if rng is None:
            raise ValueError("order 'random' needs a random generator (rng=)")
        return rng.permutation(n).astype(np.int64)
    if n == 0:
        return idx.astype(np.int64)
    if strategy == "left_to_right":
        return np.lexsort((idx, p[:, 1], p[:, 0])).astype(np.int64)
    if strategy == "reading":
        tol = default_row_tol(p) if row_tol is None else float(row_tol)
        by_y = np.lexsort((idx, p[:, 0], p[:, 1]))
        row = np.empty(n, np.int64)
        r, anchor = -1, -math.inf
        for i in by_y:
            if p[i, 1] - anchor > tol:
                r, anchor = r + 1, p[i, 1]
            row[i] = r
        return np.lexsort((idx, p[:, 0], row)).astype(np.int64)
    # nearest_neighbour
    d0 = np.hypot(p[:, 0], p[:, 1])
    start = int(np.lexsort((idx, p[:, 0], p[:, 1], d0))[0])
    out, left = [start], np.ones(n, bool)
    left[start] = False
    for _ in range(n - 1):
        cur = p[out[-1]]
        d = np.hypot(p[:, 0] - cur[0], p[:, 1] - cur[1])
        d[~left] = np.inf
        nxt = int(np.argmin(d))  # first index among equal distances
        out.append(nxt)
        left[nxt] = False
    return np.asarray(out, np.int64)


# ----------------------------------------------------------------------------------------------- marks
@dataclasses.dataclass(frozen=True)
class MarkStyle:
    """Sizes of the numbered marks on an image: `radius` (px, the disc with its ring), `ring` (px, ring width),
    `font_size` (px)."""

    radius: int
    ring: int
    font_size: int


@functools.lru_cache(maxsize=64)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled FreeType font (Aileron), scalable
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font (about 11 px)
        return ImageFont.load_default()


def _text_size(text: str, size: int) -> tuple[int, int]:
    x0, y0, x1, y1 = _font(size).getbbox(text)
    return x1 - x0, y1 - y0


def _fit_label(label: str, radius: int, limit: int) -> MarkStyle:
    """The smallest mark of radius >= `radius` (up to `limit`) whose disc holds `label` in a font of at least
    MIN_FONT px (the largest font up to 1.2 x the inner radius that fits)."""
    while True:
        ring = max(1, round(radius / 6))
        inner = radius - ring
        size = max(MIN_FONT, round(1.2 * inner))
        while size > MIN_FONT:
            tw, th = _text_size(label, size)
            if tw <= 1.6 * inner and th <= 1.3 * inner:
                break
            size -= 1
        tw, th = _text_size(label, size)
        if (tw <= 1.6 * inner and th <= 1.3 * inner) or radius >= limit:
            return MarkStyle(radius=int(radius), ring=int(ring), font_size=int(size))
        radius += 1


def mark_style(height: int, width: int, max_number: int = 99, scale: float = 1.0) -> MarkStyle:
    """Mark sizes for an image of `height` x `width`: radius = max(MIN_RADIUS, RADIUS_FRAC x shorter side) x
    `scale` (rounded), grown until the widest label (at least two digits, or `max_number`'s) in a font of at least
    MIN_FONT px fits inside the disc. Samples and the inference loop use the default (two digits), so marks 1..99
    never depend on how many objects the image holds (`draw_marks` gives a longer number a disc of its own size).
    MarkError when the mark's diameter would exceed MAX_MARK_FRAC of the shorter side (the image is too small
    for readable marks)."""
    side = min(int(height), int(width))
    digits = max(2, len(str(max(int(max_number), 0))))
    radius0 = max(1, round(max(MIN_RADIUS, RADIUS_FRAC * side) * scale))
    st = _fit_label("8" * digits, radius0, max(side, radius0))
    if 2 * st.radius > MAX_MARK_FRAC * side:
        need = math.ceil(2 * st.radius / MAX_MARK_FRAC)
        raise MarkError(f"a {width}x{height} image is too small for readable numbered marks (marks of radius "
                        f"{st.radius} px with {digits}-digit numbers need a shorter side of at least {need} px)")
    return st


@functools.lru_cache(maxsize=4096)
def label_style(label: str, st: MarkStyle) -> MarkStyle:
    """The mark of one label: `st` when the label fits its disc at `st.font_size` or a smaller font of at least
    MIN_FONT px (that font), else a disc grown until it does (numbers with more digits than `st` was sized for)."""
    inner = st.radius - st.ring
    size = st.font_size
    while size >= MIN_FONT:
        tw, th = _text_size(label, size)
        if tw <= 1.6 * inner and th <= 1.3 * inner:
            return dataclasses.replace(st, font_size=size)
        size -= 1
    return _fit_label(label, st.radius + 1, 10 * st.radius)


def draw_marks(image: np.ndarray, points, numbers: Sequence[int] | None = None, *, style: MarkStyle | None = None,
               scale: float = 1.0, fill=MARK_FILL, ring_colour=MARK_RING, text_colour=MARK_TEXT) -> np.ndarray:
    """A copy of `image` (uint8 `[H, W, 3]`) with a numbered mark on each of `points` (`[k, 2]` continuous pixels
    x, y; pixel i covers [i, i + 1)): a disc of `fill` with a `ring_colour` ring, the number (`numbers`, default
    1..k) centred in `text_colour`. Each mark is centred on the pixel that contains its point (clamped to the
    image), so it lies within its radius (`style.radius` for numbers up to 99) + 0.5 px of that pixel's centre. Drawn without anti-aliasing: every
    changed pixel is one of the three colours. Later marks are drawn over earlier ones.

    Sizes: `style` or `mark_style(H, W, scale=scale)` (MarkError when the image is too small): sized for
    two-digit numbers, so marks 1..99 look the same whatever the count; a longer number gets a smaller font, or
    when that would go under MIN_FONT px a larger disc (`label_style`).
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"draw_marks expects a uint8 [H, W, 3] image, got {img.dtype} {img.shape}")
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    nums = list(range(1, len(pts) + 1)) if numbers is None else [int(v) for v in numbers]
    if len(nums) != len(pts):
        raise ValueError(f"{len(nums)} numbers for {len(pts)} points")
    h, w = img.shape[:2]
    st = style or mark_style(h, w, scale=scale)
    if len(pts) == 0:
        return img.copy()
    pil = Image.fromarray(img)
    d = ImageDraw.Draw(pil)
    for (x, y), num in zip(pts, nums):
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"draw_marks: point {num} is not finite: ({x}, {y})")
        ls = label_style(str(num), st)
        r, inner = ls.radius, ls.radius - ls.ring
        bold = ls.font_size // 16  # thicker strokes for large numbers (readable when the image is shown small)
        # centred on the pixel that contains the point (PIL rounds coordinates to pixel indices anyway); points
        # within EDGE_EPS of a pixel edge go right/down, so a point that went through normalisation and back (a
        # few ulps off) gets the same mark
        cx = min(max(math.floor(x + EDGE_EPS), 0), w - 1)
        cy = min(max(math.floor(y + EDGE_EPS), 0), h - 1)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(ring_colour))
        d.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=tuple(fill))
        # the number: rendered on a patch, thresholded (FreeType strokes are anti-aliased even in mode "1"),
        # pasted in one colour
        patch = Image.new("L", (2 * r + 1, 2 * r + 1), 0)
        pd = ImageDraw.Draw(patch)
        pd.fontmode = "1"
        pd.text((r + 0.5, r + 0.5), str(num), fill=255, font=_font(ls.font_size), anchor="mm", stroke_width=bold,
                stroke_fill=255)
        patch = patch.point(lambda v: 255 if v >= 128 else 0)
        pil.paste(tuple(text_colour), (cx - r, cy - r, cx + r + 1, cy + r + 1), patch)
    return np.asarray(pil)


# ----------------------------------------------------------------------------------------------- prompts
def plural(name: str, plurals: Sequence = ()) -> str:
    """English plural of a class name (`plurals` (singular, plural) pairs win): words ending in s are kept
    ("sea shells"), -y after a consonant -> -ies, -s/-sh/-ch/-x/-z -> -es, else -s."""
    table = dict(plurals)
    if name in table:
        return table[name]
    if name.endswith("s"):
        return name
    if name.endswith("y") and len(name) > 1 and name[-2] not in "aeiou":
        return name[:-1] + "ies"
    if name.endswith(("sh", "ch", "x", "z")):
        return name + "es"
    return name + "s"


def counting_prompt(class_name: str, k: int, cfg: SequentialCountingConfig) -> str:
    """The user text for a step with `k` objects already marked (the seed's template; ends with `<x> <y>`)."""
    marked = f"{k} object is" if k == 1 else f"{k} objects are"
    return cfg.template.format(plural=plural(class_name, cfg.plurals), singular=class_name, k=k, marked=marked,
                               order_rule=ORDER_RULES[cfg.order])


def counting_system_prompt(class_name: str, cfg: SequentialCountingConfig) -> str | None:
    """The system text (None when `cfg.system_template` is None)."""
    if cfg.system_template is None:
        return None
    return cfg.system_template.format(plural=plural(class_name, cfg.plurals), singular=class_name)


# ----------------------------------------------------------------------------------------------- normalisation
def normalise_points(points, width: int, height: int, normalisation: str = "continuous") -> np.ndarray:
    """Pixels `[..., 2]` -> normalised [-1, 1] (module docstring). Float64."""
    p = np.asarray(points, np.float64)
    if normalisation == "continuous":
        return np.stack([2 * p[..., 0] / width - 1, 2 * p[..., 1] / height - 1], -1)
    if normalisation == "pixel_centres":
        return np.stack([2 * (p[..., 0] - 0.5) / max(width - 1, 1) - 1,
                         2 * (p[..., 1] - 0.5) / max(height - 1, 1) - 1], -1)
    raise CountingConfigError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")


def denormalise_points(points, width: int, height: int, normalisation: str = "continuous") -> np.ndarray:
    """Normalised `[..., 2]` -> pixels; the inverse of `normalise_points`. Float64."""
    p = np.asarray(points, np.float64)
    if normalisation == "continuous":
        return np.stack([(p[..., 0] + 1) * width / 2, (p[..., 1] + 1) * height / 2], -1)
    if normalisation == "pixel_centres":
        return np.stack([(p[..., 0] + 1) * max(width - 1, 1) / 2 + 0.5,
                         (p[..., 1] + 1) * max(height - 1, 1) / 2 + 0.5], -1)
    raise CountingConfigError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")


# ----------------------------------------------------------------------------------------------- samples
@dataclasses.dataclass(frozen=True)
class CountingSample:
    """One sequential counting sample.

    image: uint8 `[H, W, 3]`, the record's image with the first k objects (in the order) marked 1..k.
    prompt: the user text, ending with `<x> <y>`; system: the system text (or None).
    target: float32 `[2]` (x_n, y_n) in [-1, 1], the (k+1)-th centre; (-1, -1) when done.
    candidates: float32 `[m, 2]`, the right answers in the same units: with target 'set' the n - k unmarked
    centres (in the order), else `target` alone; `[[-1, -1]]` when done.
    done: k == n. k: objects marked; n: objects of the class. class_name: the counted class.
    marked_points: `[k, 2]` pixels where the marks are drawn (the centres unless `mark_jitter`); ordered_points
    `[n, 2]` all centres in the order;
    ordered_boxes `[n, 4]` their boxes in pixels (NaN rows for point-only objects). source: the record's file:line.
    """

    image: np.ndarray
    prompt: str
    system: str | None
    target: np.ndarray
    done: bool
    k: int
    n: int
    class_name: str
    marked_points: np.ndarray
    ordered_points: np.ndarray
    ordered_boxes: np.ndarray
    source: str = "<memory>"
    candidates: np.ndarray | None = None


def ordered_geometry(points: np.ndarray, boxes: np.ndarray, cfg: SequentialCountingConfig,
                     rng: np.random.Generator | None = None):
    """`(points [n, 2], boxes [n, 4])` in the counting order of `cfg` (row tolerance per `default_row_tol`;
    `rng` draws the `random` order; without it that order is the record's, as for the ground truth of an evaluation,
    whose metrics do not depend on the order)."""
    if cfg.order == "random" and rng is None:
        return points, boxes
    tol = cfg.row_tol if cfg.row_tol is not None else default_row_tol(points, boxes)
    perm = order_objects(points, cfg.order, tol, rng)
    return points[perm], boxes[perm]


def build_counting_sample(record: Record, image: np.ndarray, k: int, cfg: SequentialCountingConfig,
                          *, desc: str | None = None, style: MarkStyle | None = None,
                          rng: np.random.Generator | None = None) -> CountingSample:
    """The sample with the first `k` objects (in `cfg.order`; `rng` draws the `random` order) marked and the
    (k+1)-th centre as target (k == n: the done sample, target (-1, -1)); `candidates` per `cfg.target`.
    `image`: the record's image, uint8 `[H, W, 3]` of the record's size (else RecordError `size_mismatch`). `k` must
    be in 0..n (ValueError).

    Raises RecordError (naming file:line) for a record without points or boxes or with several classes; zero
    instances give n = 0 (only k = 0, the done sample); MarkError when the image is too small for the marks.
    """
    geo = object_geometry(record, desc, policy={"no_objects": "keep", "missing_field": "error",
                                                 "bad_value": "error"})
    pts, boxes, cls = geo
    img = np.asarray(image)
    if img.shape != (record.height, record.width, 3):
        raise RecordError(record.source, "size_mismatch", f"the image is {tuple(img.shape)} but the record says "
                                                          f"{record.width}x{record.height} (RGB expected)")
    n = len(pts)
    if not 0 <= int(k) <= n:
        raise ValueError(f"{record.source}: k must be in 0..{n}, got {k}")
    k = int(k)
    op, ob = ordered_geometry(pts, boxes, cfg, rng)
    st = style or mark_style(record.height, record.width, scale=cfg.mark_scale)
    at = op[:k]
    if cfg.mark_jitter > 0 and k:
        at = jitter_marks(at, ob[:k], cfg.mark_jitter, st.radius, rng)
    marked = draw_marks(img.astype(np.uint8, copy=False), at, style=st)
    if k < n:
        target = normalise_points(op[k], record.width, record.height, cfg.normalisation)
    else:
        target = np.asarray(DONE_TARGET)
    target = np.clip(target, -1.0, 1.0).astype(np.float32)
    if cfg.target == "set" and k < n:
        cands = np.clip(normalise_points(op[k:], record.width, record.height, cfg.normalisation), -1.0, 1.0)
        if cfg.set_band > 0:  # left to right: the next object and its near-ties in x (the next one is first)
            cands = cands[cands[:, 0] <= cands[0, 0] + cfg.set_band]
    else:
        cands = target[None]
    return CountingSample(image=marked, prompt=counting_prompt(cls, k, cfg), system=counting_system_prompt(cls, cfg),
                          target=target, done=k == n, k=k, n=n,
                          class_name=cls, marked_points=np.array(at, np.float64).reshape(-1, 2),
                          ordered_points=op, ordered_boxes=ob,
                          source=record.source, candidates=np.asarray(cands, np.float32).reshape(-1, 2))


def jitter_marks(points, boxes, jitter: float, radius: float, rng: np.random.Generator | None) -> np.ndarray:
    """Mark positions `[k, 2]` (pixels): each of `points [k, 2]` moved to a uniform random point of its box
    `boxes [k, 4]` (x1, y1, x2, y2 pixels) shrunk about the point by `jitter` (0..1), or, for a NaN box (a
    point-only object), within `jitter * radius` pixels on each axis. ValueError without `rng`."""
    if rng is None:
        raise ValueError("mark_jitter needs a random generator (rng=)")
    p = np.asarray(points, np.float64).reshape(-1, 2)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    lo = np.where(np.isnan(b[:, :2]), p - radius, b[:, :2])
    hi = np.where(np.isnan(b[:, 2:]), p + radius, b[:, 2:])
    u = rng.uniform(0.0, 1.0, p.shape)
    return p + jitter * (lo + u * (hi - lo) - p)


def draw_k(n: int, cfg: SequentialCountingConfig, rng: np.random.Generator) -> int | None:
    """How many objects to mark: with `cfg.include_done`, n (the done sample) with probability `done_prob` (always
    when n = 0); otherwise uniform in 0..n-1. None when n = 0 and done samples are off (no sample)."""
    if cfg.include_done and (n == 0 or rng.random() < cfg.done_prob):
        return int(n)
    if n == 0:
        return None
    return int(rng.integers(0, n))


def counting_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample `index` in `epoch` (the same draw on every run and machine)."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


class CountingSampler:
    """Sequential counting samples over validated records: sample `i` of `epoch` draws k with
    `counting_rng(seed, epoch, i)` (`draw_k`), loads the image and builds the sample.

    Records are checked once here with the policy (`COUNTING_POLICY`, override any entry; counted in `report`):
    no points or boxes / several classes (error by default), zero instances (skip by default; `keep` + done
    samples gives k = 0 done samples; kept without done samples they are skipped as `no_objects`), an image too
    small for the marks (`image_too_small`, skip by default). `len(sampler)` is the number of usable records.
    """

    def __init__(self, records: Sequence[Record], cfg: SequentialCountingConfig, *, seed: int = 0,
                 policy: Mapping[str, str] | None = None, report: ValidationReport | None = None,
                 desc: str | None = None,
                 load_image: Callable[[str], np.ndarray] = image_lib.load_image):
        self.cfg, self.seed, self.load_image, self.desc = cfg, int(seed), load_image, desc
        self.report = report if report is not None else ValidationReport()
        pol = _check_policy(policy)
        self.items: list[tuple[Record, MarkStyle]] = []
        self.counts: list[int] = []  # n (objects of the class) of each kept record
        for r in records:
            self.report.records_read += 1
            geo = object_geometry(r, desc, policy=pol, report=self.report)
            if geo is None:
                continue
            n = len(geo[0])
            if n == 0 and not cfg.include_done:
                self.report.add("no_objects", r.source, "zero instances and no done samples (skipped)")
                continue
            try:
                st = mark_style(r.height, r.width, scale=cfg.mark_scale)
            except MarkError as e:
                try:
                    _fail(r, "image_too_small", str(e), pol, self.report)
                except _Skip:
                    continue
            self.items.append((r, st))
            self.counts.append(n)
            self.report.records_kept += 1

    def __len__(self) -> int:
        return len(self.items)

    @property
    def max_objects(self) -> int:
        """The largest n of the kept records (0 when none): the padded width of the `set` target's candidates."""
        return max(self.counts, default=0)

    def sample(self, index: int, epoch: int = 0) -> CountingSample:
        """Sample `index` (0..len-1) of `epoch`; deterministic in (seed, epoch, index)."""
        r, st = self.items[index]
        rng = counting_rng(self.seed, epoch, index)
        n = sum(1 for o in r.objects if o.desc == counting_class(r, self.desc))
        k = draw_k(n, self.cfg, rng)
        return build_counting_sample(r, self.load_image(r.image), k, self.cfg, desc=self.desc, style=st, rng=rng)

    def __iter__(self):
        for i in range(len(self)):
            yield self.sample(i)
