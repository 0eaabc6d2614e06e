"""The JSONL record contract (compatible with the public CoordExp contract) and its validation.

One JSON object per line::

    {"images": ["img/000001.png"], "width": 640, "height": 480,
     "objects": [{"desc": "red circle", "bbox_2d": [10, 20, 110, 140]}],
     "task": "detection", "prompt": null, "metadata": {...}}

- `images`: a list with exactly one path (relative paths are resolved against `image_root`, by default the
  directory of the JSONL file).
- `width`, `height`: the size of the image file in pixels (checked against the file header by default).
- `objects`: a list of `{desc, bbox_2d}` (counting records may use `point_2d: [x, y]` instead of a box).
  `bbox_2d` is one of: four pixel numbers (`box_format="pixel"`, default), four ints 0..999 (`"norm1000"`: bins),
  four ints 0..1000 (`"qwen1000"`: Qwen3-VL's own grounding grid, c = q/1000), or four coordinate-token strings
  `"<|coord_k|>"` (recognised in every format). Pixels are converted to normalised coordinates with the one
  codec (`coord/codec.py`, `pixel_mode` "continuous" = COCO or "coordexp").
- optional `task` ("detection" default, "grounding", "counting"), `prompt` (the full user instruction, used
  verbatim), `metadata` (free-form, carried along).

Validation policy (per reason; `DEFAULT_POLICY`, override any entry). Every message names `file:line`:

| reason | default | options | what |
|---|---|---|---|
| bad_json | error | skip | the line is not a JSON object |
| missing_field | error | skip | a required key is absent (`images`, `width`, `height`, `objects`, `desc`, `bbox_2d`) |
| bad_value | error | skip | wrong type or value (e.g. 3 numbers in a box, a bin 1000, width 0, unknown task) |
| unknown_field | keep | error | keys outside the contract: kept verbatim in `.extra` and counted |
| missing_image | skip | error | the image file does not exist |
| unreadable_image | skip | error | the file exists but cannot be read (header, or full decode with `check_images="decode"`) |
| size_mismatch | error | skip | the file's size differs from `width`/`height` (boxes would be wrong) |
| unprocessable_image | skip | error | the Qwen3-VL processor refuses the size (aspect ratio over 200; see below) |
| degenerate_box | skip | drop, error | x2 <= x1 or y2 <= y1 (includes inverted boxes): skip the record, or drop the object |
| box_outside | skip | clip, drop, error | a coordinate beyond the image by more than `tolerance_px` |
| no_objects | keep | skip, error | an empty `objects` list (a valid negative image; counted) |

Coordinates outside the image by at most `tolerance_px` (float rounding in converters) are clamped to the image
and counted as `box_clamped`. Nothing is changed silently: every change or skip is counted in the
`ValidationReport`, and the first few examples of each reason are kept with their `file:line`.

Image sizes are those of the image as a viewer shows it: the file's EXIF orientation applied (`image.load_image`).
`unprocessable_image` here checks what the size alone decides (`image.processing_problem`); the training pipeline
applies the same reason, with the source's policy, to what depends on its image config (a fixed patch slot,
forbidden resizing) before any worker decodes an image.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from coordexp_jax.errors import CoordExpError
from coordexp_jax.coord import codec
from coordexp_jax.data import image as image_lib

log = logging.getLogger(__name__)

TASKS = ("detection", "grounding", "counting")
BOX_FORMATS = ("pixel", "norm1000", "qwen1000")
CHECK_IMAGES = ("none", "exists", "header", "decode")
KNOWN_FIELDS = ("images", "width", "height", "objects", "task", "prompt", "metadata")
OBJECT_FIELDS = ("desc", "bbox_2d", "point_2d")

ACTIONS = {
    "bad_json": ("error", "skip"),
    "missing_field": ("error", "skip"),
    "bad_value": ("error", "skip"),
    "unknown_field": ("keep", "error"),
    "missing_image": ("skip", "error"),
    "unreadable_image": ("skip", "error"),
    "size_mismatch": ("error", "skip"),
    "unprocessable_image": ("skip", "error"),
    "degenerate_box": ("skip", "drop", "error"),
    "box_outside": ("skip", "clip", "drop", "error"),
    "no_objects": ("keep", "skip", "error"),
}
DEFAULT_POLICY = {k: v[0] for k, v in ACTIONS.items()}

_COORD_RE = re.compile(r"^<\|coord_(\d{1,3})\|>$")


class RecordError(CoordExpError, ValueError):
    """A record violates the contract and the policy for that reason is `error`, or a sample made from it failed
    in a data worker. The message names file:line."""

    def __init__(self, where: str, reason: str, detail: str):
        super().__init__(f"{where}: {reason}: {detail}")
        self.where, self.reason, self.detail = where, reason, detail

    def __reduce__(self):  # Grain re-raises a worker's exception in the main process: it must survive pickling
        return (type(self), (self.where, self.reason, self.detail))


class DataConfigError(CoordExpError, ValueError):
    """A data setting (a source, a fusion config key, a validation policy) is wrong; the message names it."""


class _Skip(Exception):
    def __init__(self, reason: str):
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Object:
    """One annotated object. `box` is normalised (x1, y1, x2, y2) in [0, 1]; counting records may carry a
    normalised `point` (x, y) instead. `extra` keeps unknown object keys verbatim."""

    desc: str
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Record:
    """A validated record. `image` is the resolved path; `source` is "file:line" for messages."""

    image: str
    width: int
    height: int
    objects: tuple[Object, ...]
    task: str = "detection"
    prompt: str | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = "<memory>"

    def boxes(self) -> np.ndarray:
        """Normalised boxes of the objects that have one, `[n, 4]` float64."""
        b = [o.box for o in self.objects if o.box is not None]
        return np.asarray(b, np.float64).reshape(-1, 4)

    def boxes_px(self, pixel_mode: str = "continuous") -> np.ndarray:
        """Boxes in pixels of the original image, `[n, 4]`."""
        return np.asarray(codec.norm_to_pixels(self.boxes(), self.width, self.height, pixel_mode))


class ValidationReport:
    """Per-reason counters and the first `max_examples` messages of each reason."""

    def __init__(self, max_examples: int = 5):
        self.counts: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.max_examples = max_examples
        self.records_read = 0
        self.records_kept = 0

    def add(self, reason: str, where: str, detail: str = "", n: int = 1):
        self.counts[reason] += n
        if len(self.examples[reason]) < self.max_examples:
            self.examples[reason].append(f"{where}: {detail}" if detail else where)

    def merge(self, other: "ValidationReport") -> "ValidationReport":
        self.counts.update(other.counts)
        for k, v in other.examples.items():
            self.examples[k].extend(v[: max(0, self.max_examples - len(self.examples[k]))])
        self.records_read += other.records_read
        self.records_kept += other.records_kept
        return self

    def as_dict(self) -> dict:
        return {"records_read": self.records_read, "records_kept": self.records_kept, "counts": dict(self.counts)}

    def one_line(self) -> str:
        """`N read, K kept; reason: n (e.g. file:line: detail), ...` on one line (for error messages)."""
        parts = [f"{n} {r} (e.g. {' '.join(self.examples[r][0].split())})" if self.examples[r] else f"{n} {r}"
                 for r, n in sorted(self.counts.items())]
        return f"{self.records_read} read, {self.records_kept} kept" + ("; " + ", ".join(parts) if parts else "")

    def summary(self) -> str:
        lines = [f"records: {self.records_read} read, {self.records_kept} kept"]
        for reason, n in sorted(self.counts.items()):
            lines.append(f"  {reason}: {n}" + (f"  (e.g. {self.examples[reason][0]})" if self.examples[reason] else ""))
        return "\n".join(lines)

    def __repr__(self):
        return f"ValidationReport({self.as_dict()})"


def _check_policy(policy: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(DEFAULT_POLICY)
    for k, v in (policy or {}).items():
        if k not in ACTIONS:
            raise DataConfigError(f"unknown validation policy key {k!r}; known: {sorted(ACTIONS)}")
        if v not in ACTIONS[k]:
            raise DataConfigError(f"policy[{k!r}] must be one of {ACTIONS[k]}, got {v!r}")
        out[k] = v
    return out


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (_is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(float(v))


class _Ctx:
    """What a record's checks need: where it came from, the policy and the report."""

    def __init__(self, where, policy, report):
        self.where, self.policy, self.report = where, policy, report

    def fail(self, reason: str, detail: str):
        """Applies the policy for a reason that rejects the whole record."""
        action = self.policy[reason]
        if action == "error":
            raise RecordError(self.where, reason, detail)
        self.report.add(reason, self.where, detail)
        log.debug("%s: %s: %s (skipped)", self.where, reason, detail)
        raise _Skip(reason)

    def unknown_fields(self, rec: Mapping, known) -> list[str]:
        """The sorted keys of `rec` not in `known`. Any: a RecordError ('unknown_field') under the 'error' policy,
        else counted in the report (the record keeps them in .extra)."""
        unknown = sorted(k for k in rec if k not in known)
        if unknown:
            if self.policy["unknown_field"] == "error":
                raise RecordError(self.where, "unknown_field", f"unknown keys {unknown}")
            self.report.add("unknown_field", self.where, f"{unknown} (kept in .extra)")
        return unknown


def _parse_coords(raw, n: int, box_format: str, ctx: _Ctx, key: str):
    """-> (values float64 [n], kind) with kind 'bins' (coord tokens / norm1000), 'qwen1000' or 'pixel'."""
    if not isinstance(raw, (list, tuple)) or len(raw) != n:
        ctx.fail("bad_value", f"{key} must be a list of {n} values, got {raw!r}"[:300])
    if all(isinstance(v, str) for v in raw):
        ks = []
        for v in raw:
            m = _COORD_RE.match(v)
            if not m or int(m.group(1)) > codec.MAX_BIN:
                ctx.fail("bad_value", f"{key} has {v!r}, not a coordinate token <|coord_0|>..<|coord_999|>")
            ks.append(int(m.group(1)))
        return np.asarray(ks, np.float64), "bins"
    if not all(_is_num(v) for v in raw):
        ctx.fail("bad_value", f"{key} must hold 4 finite numbers or 4 coordinate tokens, got {raw!r}"[:300])
    if box_format == "norm1000":
        if not all(_is_int(v) or float(v).is_integer() for v in raw) or not all(0 <= v <= codec.MAX_BIN for v in raw):
            ctx.fail("bad_value", f"{key} in norm1000 must be integers 0..999, got {raw!r}")
        return np.asarray(raw, np.float64), "bins"
    if box_format == "qwen1000":
        top = codec.QWEN_SCALE
        if not all(_is_int(v) or float(v).is_integer() for v in raw) or not all(0 <= v <= top for v in raw):
            ctx.fail("bad_value", f"{key} in qwen1000 must be integers 0..1000, got {raw!r}")
        return np.asarray(raw, np.float64), "qwen1000"
    return np.asarray(raw, np.float64), "pixel"


def _normalise(vals, kind, width, height, pixel_mode):
    if kind == "bins":
        return np.asarray(codec.bins_to_norm(vals.astype(np.int64)), np.float64)
    if kind == "qwen1000":
        return np.asarray(codec.qwen1000_to_norm(vals.astype(np.int64)), np.float64)
    return np.asarray(codec.pixels_to_norm(vals, width, height, pixel_mode), np.float64)


def _parse_object(i: int, o, rec: Mapping, ctx: _Ctx, *, box_format, pixel_mode, tolerance_px, task):
    key = f"objects[{i}]"
    if not isinstance(o, Mapping):
        ctx.fail("bad_value", f"{key} must be an object, got {type(o).__name__}")
    if "desc" not in o:
        ctx.fail("missing_field", f"{key} has no 'desc'")
    desc = o["desc"]
    if not isinstance(desc, str) or not desc.strip():
        ctx.fail("bad_value", f"{key}.desc must be a non-empty string, got {desc!r}")
    width, height = rec["width"], rec["height"]
    extra = {k: v for k, v in o.items() if k not in OBJECT_FIELDS}
    if extra:
        if ctx.policy["unknown_field"] == "error":
            raise RecordError(ctx.where, "unknown_field", f"{key} has unknown keys {sorted(extra)}")
        ctx.report.add("unknown_field", ctx.where, f"{key}: {sorted(extra)}")
    if "bbox_2d" not in o:
        if task == "counting" and "point_2d" in o:
            vals, kind = _parse_coords(o["point_2d"], 2, box_format, ctx, f"{key}.point_2d")
            c = _normalise(vals, kind, width, height, pixel_mode)
            tol = np.asarray([tolerance_px / width, tolerance_px / height])
            if np.any(c < -tol) or np.any(c > 1 + tol):
                if _outside(ctx, key, o["point_2d"]) is None:
                    return None
            elif np.any(c < 0) or np.any(c > 1):
                ctx.report.add("box_clamped", ctx.where, f"{key}.point_2d {o['point_2d']}")
            c = np.clip(c, 0.0, 1.0)
            return Object(desc=desc, point=(float(c[0]), float(c[1])), extra=extra)
        ctx.fail("missing_field", f"{key} has no 'bbox_2d'" + (" (or 'point_2d')" if task == "counting" else ""))
    vals, kind = _parse_coords(o["bbox_2d"], 4, box_format, ctx, f"{key}.bbox_2d")
    if vals[2] <= vals[0] or vals[3] <= vals[1]:
        action = ctx.policy["degenerate_box"]
        detail = f"{key}.bbox_2d {o['bbox_2d']} has x2 <= x1 or y2 <= y1"
        if action == "drop":
            ctx.report.add("degenerate_box", ctx.where, detail + " (object dropped)")
            return None
        ctx.fail("degenerate_box", detail)
    c = _normalise(vals, kind, width, height, pixel_mode)
    tx, ty = (tolerance_px / width, tolerance_px / height) if kind == "pixel" else (0.0, 0.0)
    tol = np.asarray([tx, ty, tx, ty])
    if np.any(c < -tol) or np.any(c > 1 + tol):
        r = _outside(ctx, key, o["bbox_2d"])
        if r is None:
            return None
        c = np.clip(c, 0.0, 1.0)
    elif np.any(c < 0) or np.any(c > 1):
        ctx.report.add("box_clamped", ctx.where, f"{key}.bbox_2d {o['bbox_2d']} (within {tolerance_px} px)")
        c = np.clip(c, 0.0, 1.0)
    if c[2] <= c[0] or c[3] <= c[1]:  # clipping to the image left an empty box
        detail = f"{key}.bbox_2d {o['bbox_2d']} is empty once clipped to the image"
        if ctx.policy["degenerate_box"] == "drop":
            ctx.report.add("degenerate_box", ctx.where, detail + " (object dropped)")
            return None
        ctx.fail("degenerate_box", detail)
    return Object(desc=desc, box=tuple(float(v) for v in c), extra=extra)


def _outside(ctx: _Ctx, key, raw):
    action = ctx.policy["box_outside"]
    detail = f"{key} {raw} extends beyond the {ctx.size} image"
    if action == "clip":
        ctx.report.add("box_outside", ctx.where, detail + " (clipped)")
        return "clip"
    if action == "drop":
        ctx.report.add("box_outside", ctx.where, detail + " (object dropped)")
        return None
    ctx.fail("box_outside", detail)


def _resolve_image(path: str, image_root: str | None) -> str:
    if os.path.isabs(path) or image_root is None:
        return path
    return os.path.join(image_root, path)


def parse_record(rec, *, where: str = "<memory>", image_root: str | None = None, box_format: str = "pixel",
                 pixel_mode: str = "continuous", policy: Mapping[str, str] | None = None,
                 report: ValidationReport | None = None, check_images: str = "header",
                 tolerance_px: float = 1.0) -> Record | None:
    """Validates one decoded record (a dict). Returns a `Record`, or None when the policy skips it (counted).

    Raises `RecordError` naming `where` for reasons whose policy is `error`.
    """
    if box_format not in BOX_FORMATS:
        raise DataConfigError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    if check_images not in CHECK_IMAGES:
        raise DataConfigError(f"check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
    pol = _check_policy(policy)
    report = report if report is not None else ValidationReport()
    ctx = _Ctx(where, pol, report)
    report.records_read += 1
    try:
        r = _parse(rec, ctx, image_root=image_root, box_format=box_format, pixel_mode=pixel_mode,
                   check_images=check_images, tolerance_px=tolerance_px)
    except _Skip:
        return None
    report.records_kept += 1
    return r


def _parse(rec, ctx: _Ctx, *, image_root, box_format, pixel_mode, check_images, tolerance_px) -> Record:
    if not isinstance(rec, Mapping):
        ctx.fail("bad_json", f"a record must be a JSON object, got {type(rec).__name__}")
    for k in ("images", "width", "height", "objects"):
        if k not in rec:
            ctx.fail("missing_field", f"missing required key {k!r}")
    unknown = ctx.unknown_fields(rec, KNOWN_FIELDS)
    images = rec["images"]
    if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str) or not images[0]:
        ctx.fail("bad_value", f"'images' must be a list of exactly one non-empty path, got {images!r}"[:300])
    w, h = rec["width"], rec["height"]
    if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
        ctx.fail("bad_value", f"width/height must be positive integers, got {w!r}x{h!r}")
    ctx.size = f"{w}x{h}"
    task = rec.get("task") or "detection"
    if task not in TASKS:
        ctx.fail("bad_value", f"task must be one of {TASKS}, got {task!r}")
    prompt = rec.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        ctx.fail("bad_value", f"prompt must be a non-empty string or null, got {prompt!r}"[:300])
    metadata = rec.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        ctx.fail("bad_value", f"metadata must be an object, got {type(metadata).__name__}")
    objs_raw = rec["objects"]
    if not isinstance(objs_raw, list):
        ctx.fail("bad_value", f"'objects' must be a list, got {type(objs_raw).__name__}")
    objects = []
    for i, o in enumerate(objs_raw):
        ob = _parse_object(i, o, rec, ctx, box_format=box_format, pixel_mode=pixel_mode,
                           tolerance_px=tolerance_px, task=task)
        if ob is not None:
            objects.append(ob)
    if not objects:
        action = ctx.policy["no_objects"]
        detail = "no objects" + (f" left of {len(objs_raw)}" if objs_raw else "")
        if action == "keep":
            ctx.report.add("no_objects", ctx.where, detail + " (kept as a negative image)")
        else:
            ctx.fail("no_objects", detail)
    path = _resolve_image(images[0], image_root)
    size = _image_file_size(path, ctx, check_images)
    if size is not None and size != (w, h):
        turned = " (sizes are of the image turned by its EXIF orientation)" if size == (h, w) else ""
        ctx.fail("size_mismatch", f"{path} is {size[0]}x{size[1]} but the record says {w}x{h}{turned}")
    problem = image_lib.processing_problem(h, w)
    if problem is not None:
        ctx.fail("unprocessable_image", f"{path}: {problem}")
    extra = {k: rec[k] for k in unknown}
    return Record(image=path, width=int(w), height=int(h), objects=tuple(objects), task=task, prompt=prompt,
                  metadata=dict(metadata), extra=extra, source=ctx.where)


def _image_file_size(path: str, ctx: _Ctx, check_images: str) -> tuple[int, int] | None:
    """The upright (w, h) of an image file as `check_images` checks it ("header": read from the header, "decode": a
    full decode), or None ("none", "exists"); `missing_image` / `unreadable_image` go through the policy."""
    if check_images == "none":
        return None
    if not os.path.exists(path):
        ctx.fail("missing_image", f"image file not found: {path}")
    if check_images not in ("header", "decode"):
        return None
    try:
        if check_images == "decode":
            arr = image_lib.load_image(path)
            return (arr.shape[1], arr.shape[0])
        return tuple(image_lib.read_image_size(path))
    except image_lib.ImageLoadError as e:
        ctx.fail("unreadable_image", str(e))


def json_lines(path: str) -> Iterator[tuple[int, str, Any]]:
    """(line number, `file:line`, parsed value or the `json.JSONDecodeError`) for every non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, f"{path}:{lineno}", e


def iter_jsonl(path: str, *, image_root: str | None = None, policy: Mapping[str, str] | None = None,
               report: ValidationReport | None = None, **kw) -> Iterable[Record]:
    """Yields the valid records of a JSONL file (blank lines ignored); see `parse_record` for keywords."""
    pol = _check_policy(policy)
    report = report if report is not None else ValidationReport()
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    for where, rec in checked_json(((w, r) for _, w, r in json_lines(path)), pol, report):
        r = parse_record(rec, where=where, image_root=root, policy=pol, report=report, **kw)
        if r is not None:
            yield r


def checked_json(items: Iterable[tuple[str, Any]], policy: dict, report: ValidationReport) -> Iterator[tuple[str, Any]]:
    """(where, parsed value or json.JSONDecodeError) pairs, as `json_lines` gives them -> the parsed ones. A line
    that is not valid JSON raises RecordError(where, 'bad_json') when `policy['bad_json']` is 'error', else it is
    counted in `report` as a skip."""
    for where, d in items:
        if isinstance(d, json.JSONDecodeError):
            report.records_read += 1
            if policy["bad_json"] == "error":
                raise RecordError(where, "bad_json", f"not valid JSON ({d.msg} at column {d.colno})") from None
            report.add("bad_json", where, d.msg)
            continue
        yield where, d


def read_jsonl(path: str, **kw) -> tuple[list[Record], ValidationReport]:
    """All valid records of a JSONL file and the report of what was skipped or changed (logged at INFO)."""
    report = kw.pop("report", None) or ValidationReport()
    records = list(iter_jsonl(path, report=report, **kw))
    log.info("read %s\n%s", path, report.summary())
    return records, report


def record_to_json(r: Record, *, box_format: str = "pixel", pixel_mode: str = "continuous",
                   image_root: str | None = None, ndigits: int | None = None) -> dict:
    """A record as a contract dict. `box_format`: "pixel" (floats, rounded to `ndigits` if given), "norm1000"
    (bins via the codec), "qwen1000" (ints 0..1000, rounded) or "tokens" (coord-token strings). Image paths are
    made relative to `image_root`."""
    def enc(v, n):
        v = np.asarray(v, np.float64)
        if box_format == "pixel":
            px = np.asarray(codec.norm_to_pixels(v, r.width, r.height, pixel_mode))
            return [round(float(x), ndigits) if ndigits is not None else float(x) for x in px]
        if box_format == "qwen1000":
            return [int(x) for x in np.asarray(codec.norm_to_qwen1000(v))]
        k = codec.box_to_bins(v, pixel_mode) if n == 4 else codec.norm_to_bins(v)
        k = [int(x) for x in np.asarray(k)]
        return k if box_format == "norm1000" else [f"<|coord_{x}|>" for x in k]

    if box_format not in ("pixel", "norm1000", "qwen1000", "tokens"):
        raise ValueError(f"box_format must be pixel, norm1000, qwen1000 or tokens, got {box_format!r}")
    objs = []
    for o in r.objects:
        d = {"desc": o.desc}
        if o.box is not None:
            d["bbox_2d"] = enc(o.box, 4)
        if o.point is not None:
            d["point_2d"] = enc(o.point, 2)
        d.update(o.extra)
        objs.append(d)
    img = os.path.relpath(r.image, image_root) if image_root else r.image
    out = {"images": [img], "width": r.width, "height": r.height, "objects": objs}
    if r.task != "detection":
        out["task"] = r.task
    if r.prompt is not None:
        out["prompt"] = r.prompt
    if r.metadata:
        out["metadata"] = dict(r.metadata)
    out.update(r.extra)
    return out


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """Yields a file open on a temp path next to `path`, renamed onto `path` when the block ends without an error;
    on any error the temp file is removed, so `path` is either complete or untouched (never empty or partial)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # open(..., "x") (not mkstemp) so the file gets the usual permissions (umask), not 0600
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, mode.replace("w", "x"), **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_jsonl(records: Iterable[Record | Mapping], path: str, **kw) -> int:
    """Writes records (Record objects via `record_to_json(**kw)`, or contract dicts as they are); returns count.

    Atomic (`atomic_write`): when the iterable raises (e.g. a converter meets a truncated input), `path` keeps its
    previous content, or does not exist."""
    n = 0
    with atomic_write(path) as f:
        for r in records:
            d = record_to_json(r, **kw) if isinstance(r, Record) else r
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
            n += 1
    return n
