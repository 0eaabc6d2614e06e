"""Human-object interaction (HOI) records: the chat form with boxes in the prompt, its validation, and the training
rows and batches with the spatial-linking `links` key (the contract of the spatial-linking module).

Record shape (one JSON object per JSONL line, or a JSON list of them; the shapes of the HOI seed)::

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "<image>What is the person <|box_start|>(120,80),(410,950)<|box_end|>
                                               doing with the object <|box_start|>(380,600),(520,760)<|box_end|>?"},
                  {"role": "assistant", "content": "kicking ball"}],
     "images": ["images/000001.png"],
     "refer_boxes": [[120, 80, 410, 950], [380, 600, 520, 760]],      # optional
     "task_type": "referring",                                           # or "grounding" (optional)
     "image_sizes": [[640, 480]], "interaction_box": true, "metadata": {...}}   # optional

- `messages`: roles `system`, `user`, `assistant`, `tool` (a tool turn is written as Qwen3's template does: a
  user turn holding `<tool_response>...</tool_response>`). The last message is the assistant's. Several
  user/assistant rounds are allowed (the tool-calling form: the assistant asks for a zoomed crop, a later turn
  shows it as another `<image>`).
- `images`: one path per `<image>` placeholder, in order of appearance (relative paths resolve against the
  file's directory). `image_sizes` `[[w, h], ...]` is optional (read from the file header when absent).
- Boxes in the text: `<|box_start|>(x1,y1),(x2,y2)<|box_end|>` with integers 0..1000 (Qwen's grid: c = q / 1000,
  `codec.qwen1000_to_norm`), or `<|box_start|><|coord_a|><|coord_b|><|coord_c|><|coord_d|><|box_end|>` (bins,
  c = k / 999). An optional `<|object_ref_start|>label<|object_ref_end|>` right before a box labels it.
- `refer_boxes`: the boxes of the prompt (non-assistant turns) in order of appearance, in `refer_format` units
  (`qwen1000` as the seed, or `pixel`); each `[x1, y1, x2, y2]` or `[[x1, y1, x2, y2]]`. When present they
  must agree with the boxes written in the prompt (to 1 unit of the grid); when absent they are extracted from
  the prompt's box text (`extract_refer_boxes`). One extra last box equal to the union of the two before it (the
  seed's `[[person], [object], [interaction]]` with only two boxes written) asks for the interaction box.

Validation reuses `records.py`'s policy and report (`bad_json`, `missing_field`, `bad_value`, `unknown_field`,
`missing_image`, `unreadable_image`, `size_mismatch`, `unprocessable_image`, `degenerate_box`, `box_outside`), and
its messages name `file:line` (`file:[i]` for a JSON list).

Box kinds (`links["kind"]`): 0 person, 1 object, 2 interaction, 3 other. A labelled box is a person when its label is
a person word (`PERSON_WORDS`), the interaction when its label is "interaction", else an object. Unlabelled boxes of
a turn are read in pairs (person, object); a box equal (to 1 unit) to the union of the pair before it is that pair's
interaction box; a box left alone at the end of a turn is "other". With interaction boxes on (the config's
`interaction_box`, or the record's own `interaction_box` key, which wins), every (person, object) pair of a prompt
turn that has no interaction box gets one, the union of the two (seed: "compute_interaction_box"), written right
after the object's box.

A training row (`HOIEncoder`): every turn tokenised in the Qwen chat format (`prompts.py`), each `<image>` replaced by
`<|vision_start|><|image_pad|> x n<|vision_end|>`, boxes written in the configured form (`box_text`: "text" for
the seed's `(x1,y1),(x2,y2)` or "tokens" for coordinate tokens), `loss_mask` 1 exactly on the positions whose
target is an assistant token (content and its `<|im_end|>`, every assistant turn), and the prompt boxes' links:
`pos` (the position of each box's `<|box_end|>`), `boxes` (pixels of the resized image the model sees, continuous
convention: x_px = c * W_resized), `image` (index of the image in the row, 0-based; the box refers to the last
image shown before it) and `kind`. Boxes in assistant turns are targets, not links; in the "tokens" form they get
box slots (`box_pos`, `box_target`) so that the coordinate losses apply.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from coordexp_jax.coord import codec
from coordexp_jax.data import image as image_lib
from coordexp_jax.data import records as records_lib
from coordexp_jax.data.records import RecordError, ValidationReport, _Ctx, _Skip
from coordexp_jax.data.tokenizer import TokenIds, coord_token

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
TASK_TYPES = ("referring", "grounding")
BOX_TEXT_FORMS = ("text", "tokens")
REFER_FORMATS = ("qwen1000", "pixel")
KNOWN_FIELDS = ("messages", "images", "refer_boxes", "task_type", "image_sizes", "interaction_box", "metadata")
PERSON, OBJECT, INTERACTION, OTHER = 0, 1, 2, 3
KIND_NAMES = ("person", "object", "interaction", "other")
PERSON_WORDS = ("person", "human", "man", "woman", "boy", "girl", "people", "child", "player", "rider")
IMAGE_PLACEHOLDER = "<image>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_TEXT_BOX = re.compile(r"\(" + _NUM + "," + _NUM + r"\)\s*,\s*\(" + _NUM + "," + _NUM + r"\)")
_TOKEN_BOX = re.compile(r"\s*" + r"\s*".join([r"<\|coord_(\d{1,3})\|>"] * 4) + r"\s*")
_LABEL_BEFORE = re.compile(re.escape(REF_START) + r"(.*?)" + re.escape(REF_END) + r"\s*", re.S)


# ----------------------------------------------------------------------------------------------- box text
def format_box(box, form: str = "text") -> str:
    """The text of one normalised box `(x1, y1, x2, y2)` in [0, 1]: "text" -> `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`
    with integers q = round(1000 c) (Qwen's 0..1000 grid, `codec.norm_to_qwen1000`); "tokens" ->
    `<|box_start|><|coord_a|>..<|coord_d|><|box_end|>` with bins k = round(999 c) (`codec.box_to_bins`)."""
    b = np.asarray(box, np.float64).reshape(4)
    if form == "text":
        q = [int(v) for v in codec.norm_to_qwen1000(b)]
        return f"{BOX_START}({q[0]},{q[1]}),({q[2]},{q[3]}){BOX_END}"
    if form == "tokens":
        return BOX_START + "".join(coord_token(int(k)) for k in codec.box_to_bins(b)) + BOX_END
    raise ValueError(f"box form must be one of {BOX_TEXT_FORMS}, got {form!r}")


@dataclasses.dataclass(frozen=True)
class BoxMention:
    """One box written in a message: character span `[start, end)` of `<|box_start|>...<|box_end|>` (the label's
    `<|object_ref_start|>label<|object_ref_end|>` before it not included), `values` as written (4 numbers), `form`
    ("text": 0..1000 grid, "tokens": bins), `label` (or None) and `label_start` (where the label begins, else start)."""

    start: int
    end: int
    values: tuple
    form: str
    label: str | None = None
    label_start: int = -1

    def norm(self) -> np.ndarray:
        """The box normalised to [0, 1], float64 [4] (text: q / 1000; tokens: k / 999)."""
        v = np.asarray(self.values, np.float64)
        return np.asarray(codec.qwen1000_to_norm(v) if self.form == "text" else codec.bins_to_norm(v.astype(np.int64)),
                          np.float64)


class BoxTextError(ValueError):
    """A `<|box_start|>` without a well-formed box after it (the message says where)."""


def parse_box_mentions(text: str) -> list[BoxMention]:
    """Every `<|box_start|>...<|box_end|>` of `text`, in order. Raises BoxTextError on a box start without a
    well-formed box and its end, a stray `<|box_end|>`, or values out of their range (0..1000 text, 0..999 bins)."""
    out = []
    i = 0
    while True:
        s = text.find(BOX_START, i)
        stray = text.find(BOX_END, i)
        if stray != -1 and (s == -1 or stray < s):
            raise BoxTextError(f"a {BOX_END} without {BOX_START} at character {stray}")
        if s == -1:
            return out
        e = text.find(BOX_END, s + len(BOX_START))
        if e == -1:
            raise BoxTextError(f"{BOX_START} at character {s} has no {BOX_END}")
        inner = text[s + len(BOX_START):e]
        m = _TEXT_BOX.fullmatch(inner.strip())
        if m is not None:
            vals = tuple(float(v) for v in m.groups())
            if not all(v.is_integer() and 0 <= v <= codec.QWEN_SCALE for v in vals):
                raise BoxTextError(f"box at character {s} has values {inner.strip()!r}: must be integers 0..1000")
            vals, form = tuple(int(v) for v in vals), "text"
        else:
            m = _TOKEN_BOX.fullmatch(inner)
            if m is None:
                raise BoxTextError(f"box at character {s} is {inner.strip()[:60]!r}: expected (x1,y1),(x2,y2) or "
                                   "four coordinate tokens")
            vals = tuple(int(v) for v in m.groups())
            if max(vals) > codec.MAX_BIN:
                raise BoxTextError(f"box at character {s} has a coordinate token over <|coord_999|>")
            form = "tokens"
        label, lstart = None, s
        r0 = text.rfind(REF_START, i, s)
        lm = _LABEL_BEFORE.fullmatch(text, r0, s) if r0 != -1 else None
        if lm is not None and REF_END not in lm.group(1):
            label, lstart = lm.group(1).strip(), r0
        out.append(BoxMention(s, e + len(BOX_END), vals, form, label, lstart))
        i = e + len(BOX_END)


def extract_refer_boxes(messages: Sequence[Mapping], *, form: str = "qwen1000") -> list[list[int]]:
    """The boxes written in the prompt (every non-assistant message, in order) as `refer_boxes`: "qwen1000"
    integers as written in the text form (coordinate-token boxes converted, q = round(1000 k / 999)). What the
    seed's `add_refer_boxes.py` adds to a record. Raises BoxTextError (see `parse_box_mentions`)."""
    if form != "qwen1000":
        raise ValueError("extract_refer_boxes writes qwen1000 boxes")
    out = []
    for m in messages:
        if m.get("role") == "assistant":
            continue
        for b in parse_box_mentions(str(m.get("content", ""))):
            out.append(list(b.values) if b.form == "text" else [int(v) for v in codec.norm_to_qwen1000(b.norm())])
    return out


def union_box(a, b) -> np.ndarray:
    """The interaction box of a pair: the smallest box holding both (seed: `compute_interaction_box`); [4]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.concatenate([np.minimum(a[:2], b[:2]), np.maximum(a[2:], b[2:])])


def kind_of_label(label: str | None) -> int | None:
    """The kind a label names: PERSON for person words, INTERACTION for "interaction", else OBJECT; None: no label."""
    if label is None:
        return None
    w = label.strip().lower()
    if w in PERSON_WORDS or w.rstrip("s") in PERSON_WORDS:
        return PERSON
    if w == "interaction":
        return INTERACTION
    return OBJECT


def _close(a, b, tol: float) -> bool:
    return bool(np.all(np.abs(np.asarray(a) - np.asarray(b)) <= tol))


def assign_kinds(boxes: Sequence, labels: Sequence[str | None],
                 tol: float = 1.0 / codec.QWEN_SCALE + 1e-9) -> list[int]:
    """Kinds of the boxes of one turn (normalised `[4]` each, in order) by the rules of the module docstring."""
    kinds: list[int | None] = [kind_of_label(lb) for lb in labels]
    i, out = 0, [0] * len(boxes)
    pair: list[int] = []  # indices of the current (person, object) pair
    for i, b in enumerate(boxes):
        k = kinds[i]
        if k is None:
            if len(pair) == 2 and _close(b, union_box(boxes[pair[0]], boxes[pair[1]]), tol):
                k = INTERACTION
            elif len(pair) == 1 and out[pair[0]] == PERSON:
                k = OBJECT
            else:
                k = PERSON
        out[i] = k
        if k == PERSON:
            pair = [i]
        elif k == OBJECT and len(pair) == 1:
            pair = pair + [i]
        else:
            pair = []
    # an unlabelled person with no object after it is "other"
    for i, k in enumerate(out):
        if k == PERSON and kinds[i] is None and not (i + 1 < len(out) and out[i + 1] == OBJECT):
            out[i] = OTHER
    return out


# ----------------------------------------------------------------------------------------------- records
@dataclasses.dataclass(frozen=True)
class Part:
    """One piece of a message: `text`, an image (`image` = its index), or a box (`box` normalised [0, 1],
    `label`, `kind`, `image` = the image it refers to, `form` as written)."""

    text: str = ""
    image: int = -1
    box: tuple | None = None
    label: str | None = None
    kind: int = OTHER
    form: str = "text"

    @property
    def is_box(self) -> bool:
        return self.box is not None

    @property
    def is_image(self) -> bool:
        return self.box is None and self.image >= 0


@dataclasses.dataclass(frozen=True)
class Turn:
    role: str
    parts: tuple[Part, ...]


@dataclasses.dataclass(frozen=True)
class HOIRecord:
    """A validated HOI record: resolved image paths and their sizes (w, h), the turns split into parts, the task,
    whether to add interaction boxes (None: the config decides), metadata, unknown keys, and `source` (file:line)."""

    images: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]
    turns: tuple[Turn, ...]
    task_type: str | None = None
    interaction_box: bool | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    source: str = "<memory>"

    def prompt_boxes(self) -> list[Part]:
        """The box parts of the non-assistant turns, in order (what `refer_boxes` lists)."""
        return [p for t in self.turns if t.role != "assistant" for p in t.parts if p.is_box]

    def answer_text(self) -> str:
        """The last assistant message as written (box parts in the text form)."""
        return render_parts(self.turns[-1].parts, "text")

    def answer_boxes(self) -> list[tuple[str | None, np.ndarray]]:
        """(label, normalised box [4]) of every box in the last assistant message (the grounding target)."""
        return [(p.label, np.asarray(p.box)) for p in self.turns[-1].parts if p.is_box]


def render_parts(parts: Sequence[Part], form: str = "text") -> str:
    """Text of message parts; boxes in `form` (labels written back as `<|object_ref_start|>label<|object_ref_end|>`)."""
    out = []
    for p in parts:
        if p.is_box:
            out.append((f"{REF_START}{p.label}{REF_END}" if p.label is not None else "") + format_box(p.box, form))
        elif p.is_image:
            out.append(IMAGE_PLACEHOLDER)
        else:
            out.append(p.text)
    return "".join(out)


def _split_message(content: str, first_image: int) -> list[tuple]:
    """content -> [("text", s) | ("image", i) | ("box", BoxMention)]; images numbered from `first_image`."""
    mentions = parse_box_mentions(content)
    pieces, pos, img = [], 0, first_image
    for m in mentions + [None]:
        seg_end = m.label_start if m is not None else len(content)
        seg = content[pos:seg_end]
        chunks = seg.split(IMAGE_PLACEHOLDER)
        for j, c in enumerate(chunks):
            if j:
                pieces.append(("image", img))
                img += 1
            if c:
                pieces.append(("text", c))
        if m is not None:
            pieces.append(("box", m))
            pos = m.end
    return pieces


def _refer_boxes(raw, ctx: _Ctx, refer_format: str, sizes, where="refer_boxes") -> list[np.ndarray]:
    if not isinstance(raw, list):
        ctx.fail("bad_value", f"{where} must be a list of boxes, got {type(raw).__name__}")
    out = []
    for i, b in enumerate(raw):
        if isinstance(b, list) and len(b) == 1 and isinstance(b[0], list):
            b = b[0]
        if not (isinstance(b, list) and len(b) == 4 and all(records_lib._is_num(v) for v in b)):
            ctx.fail("bad_value", f"{where}[{i}] must be [x1, y1, x2, y2] (or [[x1, y1, x2, y2]]), got {b!r}"[:300])
        out.append(np.asarray(b, np.float64))
    return out


def _image_size(path: str, ctx: _Ctx, check_images: str, given):
    size = records_lib._image_file_size(path, ctx, check_images)
    if size is not None:
        if given is not None and tuple(given) != size:
            ctx.fail("size_mismatch", f"{path} is {size[0]}x{size[1]} but image_sizes says {given[0]}x{given[1]}")
        return size
    if given is None:
        ctx.fail("missing_field", f"{path}: no image_sizes entry and check_images={check_images!r} (the size is "
                                  "needed)")
    return tuple(int(v) for v in given)


def parse_hoi_record(rec, *, where: str = "<memory>", image_root: str | None = None, policy=None,
                     report: ValidationReport | None = None, check_images: str = "header",
                     refer_format: str = "qwen1000", tolerance_px: float = 1.0) -> HOIRecord | None:
    """Validates one decoded HOI record (module docstring). Returns an `HOIRecord`, or None when the policy skips
    it (counted in `report`). Raises `records.RecordError` naming `where` for reasons whose policy is `error`,
    `records.DataConfigError` for a bad `check_images` / `refer_format` / policy."""
    if check_images not in records_lib.CHECK_IMAGES:
        raise records_lib.DataConfigError(f"check_images must be one of {records_lib.CHECK_IMAGES}, got "
                                          f"{check_images!r}")
    if refer_format not in REFER_FORMATS:
        raise records_lib.DataConfigError(f"refer_format must be one of {REFER_FORMATS}, got {refer_format!r}")
    pol = records_lib._check_policy(policy)
    report = report if report is not None else ValidationReport()
    ctx = _Ctx(where, pol, report)
    report.records_read += 1
    try:
        r = _parse(rec, ctx, image_root, check_images, refer_format, tolerance_px)
    except _Skip:
        return None
    report.records_kept += 1
    return r


def _parse(rec, ctx: _Ctx, image_root, check_images, refer_format, tolerance_px) -> HOIRecord:
    if not isinstance(rec, Mapping):
        ctx.fail("bad_json", f"an HOI record must be a JSON object, got {type(rec).__name__}")
    for k in ("messages", "images"):
        if k not in rec:
            ctx.fail("missing_field", f"missing required key {k!r}")
    unknown = ctx.unknown_fields(rec, KNOWN_FIELDS)
    images = rec["images"]
    if isinstance(images, list):  # the seed's parquet form: [{"image": path}]
        images = [im.get("image") if isinstance(im, Mapping) else im for im in images]
    if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
        ctx.fail("bad_value", f"'images' must be a non-empty list of paths, got {rec['images']!r}"[:300])
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
        ctx.fail("bad_value", "'messages' must be a non-empty list of {role, content}")
    task = rec.get("task_type")
    if task is not None and task not in TASK_TYPES:
        ctx.fail("bad_value", f"task_type must be one of {TASK_TYPES} or absent, got {task!r}")
    inter = rec.get("interaction_box")
    if inter is not None and not isinstance(inter, bool):
        ctx.fail("bad_value", f"interaction_box must be true, false or absent, got {inter!r}")
    meta = rec.get("metadata") or {}
    if not isinstance(meta, Mapping):
        ctx.fail("bad_value", f"metadata must be an object, got {type(meta).__name__}")
    given_sizes = rec.get("image_sizes")
    if given_sizes is not None and not (isinstance(given_sizes, list) and len(given_sizes) == len(images) and all(
            isinstance(s, list) and len(s) == 2 and all(records_lib._is_int(v) and v > 0 for v in s)
            for s in given_sizes)):
        ctx.fail("bad_value", f"image_sizes must hold one [w, h] of positive integers per image, got "
                              f"{given_sizes!r}"[:300])
    # messages -> raw pieces
    raw_turns, n_img = [], 0
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            ctx.fail("missing_field" if isinstance(m, Mapping) else "bad_value",
                     f"messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            ctx.fail("bad_value", f"messages[{i}].role must be one of {ROLES}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            ctx.fail("bad_value", f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
        try:
            pieces = _split_message(m["content"], n_img)
        except BoxTextError as e:
            ctx.fail("bad_value", f"messages[{i}]: {e}")
        n_img += sum(1 for p in pieces if p[0] == "image")
        if m["role"] == "assistant" and any(p[0] == "image" for p in pieces):
            ctx.fail("bad_value", f"messages[{i}]: an assistant message cannot show an {IMAGE_PLACEHOLDER}")
        raw_turns.append((m["role"], pieces))
    if n_img != len(images):
        ctx.fail("bad_value", f"the messages hold {n_img} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
    if raw_turns[-1][0] != "assistant":
        ctx.fail("bad_value", f"the last message must be the assistant's (the answer), got {raw_turns[-1][0]!r}")
    if any(r == "system" for r, _ in raw_turns[1:]):
        ctx.fail("bad_value", "a system message may only come first")
    # images and sizes
    paths = [records_lib._resolve_image(p, image_root) for p in images]
    sizes = []
    for j, p in enumerate(paths):
        w_h = _image_size(p, ctx, check_images, given_sizes[j] if given_sizes is not None else None)
        problem = image_lib.processing_problem(w_h[1], w_h[0])
        if problem is not None:
            ctx.fail("unprocessable_image", f"{p}: {problem}")
        sizes.append((int(w_h[0]), int(w_h[1])))
    # boxes
    prompt_mentions = [(ti, pi, p[1]) for ti, (role, pieces) in enumerate(raw_turns) if role != "assistant"
                       for pi, p in enumerate(pieces) if p[0] == "box"]
    if "refer_boxes" in rec and rec["refer_boxes"] is not None:
        rb = _refer_boxes(rec["refer_boxes"], ctx, refer_format, sizes)
        if (len(rb) == len(prompt_mentions) + 1 and len(rb) >= 3 and inter is not False
                and _close(rb[-1], union_box(rb[-3], rb[-2]), 1.0 + 1e-6 if refer_format == "qwen1000" else
                           max(max(s) for s in sizes) / codec.QWEN_SCALE + tolerance_px)):
            # the seed's [[person], [object], [interaction]] with the union not written in the prompt: the record
            # asks for the interaction box (added where the rows are written)
            rb, inter = rb[:-1], True
        if len(rb) != len(prompt_mentions):
            ctx.fail("bad_value", f"refer_boxes has {len(rb)} boxes but the prompt writes {len(prompt_mentions)} "
                                  f"{BOX_START}...{BOX_END} boxes (each refer box needs its box text)")
    else:
        rb = None
    turns, img = [], 0
    k_mention = 0
    for ti, (role, pieces) in enumerate(raw_turns):
        parts: list[Part] = []
        for kind_, v in pieces:
            if kind_ == "text":
                parts.append(Part(text=v))
            elif kind_ == "image":
                parts.append(Part(image=v))
                img = v
            else:
                box = v.norm()
                w, h = sizes[img]
                if box[2] <= box[0] or box[3] <= box[1]:
                    ctx.fail("degenerate_box", f"messages[{ti}]: box {v.values} has x2 <= x1 or y2 <= y1")
                if role != "assistant" and rb is not None:
                    ref = rb[k_mention]
                    if refer_format == "qwen1000":
                        ok = _close(ref, v.norm() * codec.QWEN_SCALE, 1.0 + 1e-6)
                        unit = "unit of the 0..1000 grid"
                    else:
                        px = np.asarray(codec.norm_to_pixels(box, w, h))
                        ok = _close(ref, px, max(w, h) / codec.QWEN_SCALE + tolerance_px)
                        unit = "grid unit (pixels)"
                    if not ok:
                        ctx.fail("bad_value", f"refer_boxes[{k_mention}] {ref.tolist()} differs from the prompt's box "
                                              f"{list(v.values)} by more than 1 {unit}")
                    k_mention += 1
                parts.append(Part(box=tuple(float(x) for x in box), label=v.label, image=img, form=v.form))
        turns.append(Turn(role, tuple(parts)))
    turns = [Turn(t.role, _with_kinds(t.parts)) for t in turns]
    extra = {k: rec[k] for k in unknown}
    return HOIRecord(images=tuple(paths), sizes=tuple(sizes), turns=tuple(turns), task_type=task,
                     interaction_box=inter, metadata=dict(meta), extra=extra, source=ctx.where)


def _with_kinds(parts: tuple[Part, ...]) -> tuple[Part, ...]:
    idx = [i for i, p in enumerate(parts) if p.is_box]
    kinds = assign_kinds([parts[i].box for i in idx], [parts[i].label for i in idx])
    out = list(parts)
    for i, k in zip(idx, kinds):
        out[i] = dataclasses.replace(parts[i], kind=k)
    return tuple(out)


def add_interaction_boxes(turns: Sequence[Turn]) -> tuple[Turn, ...]:
    """Every (person, object) pair of a non-assistant turn without an interaction box gets one (their union) right
    after the object's box."""
    out = []
    for t in turns:
        if t.role == "assistant":
            out.append(t)
            continue
        parts = list(t.parts)
        boxes = [i for i, p in enumerate(parts) if p.is_box]
        new: list[Part] = []
        last_person = None
        for i, p in enumerate(parts):
            new.append(p)
            if not p.is_box:
                continue
            if p.kind == PERSON:
                last_person = p
            elif p.kind == OBJECT and last_person is not None:
                nxt = [j for j in boxes if j > i]
                has = nxt and parts[nxt[0]].kind == INTERACTION
                if not has:
                    new.append(Part(text=" "))
                    new.append(Part(box=tuple(float(v) for v in union_box(last_person.box, p.box)), kind=INTERACTION,
                                    image=p.image, form=p.form))
                last_person = None
            else:
                last_person = None
        out.append(Turn(t.role, tuple(new)))
    return tuple(out)


def iter_hoi_file(path: str, *, image_root: str | None = None, policy=None, report: ValidationReport | None = None,
                  **kw) -> Iterator[HOIRecord]:
    """The valid records of a JSONL file (one record a line) or a JSON file holding a list of records (the seed's
    datasets); messages name `file:line` or `file:[i]`. Keywords: see `parse_hoi_record`."""
    pol = records_lib._check_policy(policy)
    report = report if report is not None else ValidationReport()
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise RecordError(path, "bad_json",
                              f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(data, list):
            raise RecordError(path, "bad_value", "a .json HOI file must hold a list of records")
        items = ((f"{path}:[{i}]", d) for i, d in enumerate(data))
    else:
        items = ((where, d) for _, where, d in records_lib.json_lines(path))
    for where, d in records_lib.checked_json(items, pol, report):
        r = parse_hoi_record(d, where=where, image_root=root, policy=pol, report=report, **kw)
        if r is not None:
            yield r


def read_hoi_file(path: str, **kw) -> tuple[list[HOIRecord], ValidationReport]:
    """All valid records of an HOI file and the report of what was skipped (logged)."""
    if not os.path.isfile(path):
        raise records_lib.DataConfigError(f"HOI records file not found: {path}")
    report = kw.pop("report", None) or ValidationReport()
    recs = list(iter_hoi_file(path, report=report, **kw))
    (log.warning if report.records_kept < report.records_read else log.info)("read %s\n%s", path, report.summary())
    return recs, report


# ----------------------------------------------------------------------------------------------- rows
@dataclasses.dataclass(frozen=True)
class HOIConfig:
    """How HOI records become rows. `box_text`: "text" (the seed's `(x1,y1),(x2,y2)`, 0..1000) or "tokens"
    (coordinate tokens); `interaction_box`: add the union box of each prompt pair (a record's own
    `interaction_box` key wins); `max_boxes` (N): link slots per row (rows with more prompt boxes are dropped,
    counted `too_many_boxes`); `max_images`: image slots per row (rows with more images are dropped, counted
    `too_many_images`); `system_prompt`: a system turn for records without one (None: none)."""

    box_text: str = "text"
    interaction_box: bool = True
    max_boxes: int = 8
    max_images: int = 1
    system_prompt: str | None = None

    def __post_init__(self):
        if self.box_text not in BOX_TEXT_FORMS:
            raise ValueError(f"HOIConfig.box_text must be one of {BOX_TEXT_FORMS}, got {self.box_text!r}")
        if self.max_boxes < 1 or self.max_images < 1:
            raise ValueError(f"HOIConfig.max_boxes and max_images must be >= 1, got {self.max_boxes}, "
                             f"{self.max_images}")


def resized_size(width: int, height: int, image_cfg: image_lib.ImageConfig) -> tuple[int, int]:
    """(W, H) in pixels of the image as the model sees it (`image.smart_resize` of the image config)."""
    h, w = image_lib.target_size(height, width, image_cfg)
    return int(w), int(h)


def box_to_resized_pixels(box_norm, width_resized: int, height_resized: int) -> np.ndarray:
    """Normalised box [..., 4] -> pixels of the resized image (continuous convention: x = c * W), float32."""
    b = np.asarray(box_norm, np.float64)
    return (b * np.asarray([width_resized, height_resized] * 2, np.float64)).astype(np.float32)


def row_turns(r: HOIRecord, hcfg: HOIConfig) -> tuple[Turn, ...]:
    """The turns a row is written from: the record's, with interaction boxes added when asked and the configured
    system turn first when the record has none."""
    turns = tuple(r.turns)
    inter = r.interaction_box if r.interaction_box is not None else hcfg.interaction_box
    if inter:
        turns = add_interaction_boxes(turns)
    if hcfg.system_prompt is not None and turns[0].role != "system":
        turns = (Turn("system", (Part(text=hcfg.system_prompt),)),) + turns
    return turns


class HOIEncoder:
    """HOI record -> one unpadded row (dict), or None when dropped (image unreadable, too long, too many boxes or
    images; counted in `counts` and logged with the record's file:line).

    Row keys: `input_ids`, `targets`, `loss_mask` [S] (1 on assistant tokens), `box_pos [m, 4]`, `box_target [m, 4]`
    (coordinate-token boxes of assistant turns), `pixel_values` (list, one per image), `grid_thw` (list),
    `link_pos [n]`, `link_boxes [n, 4]` (pixels of the resized image), `link_image [n]`, `link_kind [n]`,
    `num_objects`, `prompt_len` (tokens through the last `<|im_start|>assistant\\n`). Picklable (Grain workers):
    wraps a `prompts.SampleEncoder` for the tokenizer and images.
    """

    def __init__(self, prompt_cfg, hcfg: HOIConfig = HOIConfig(), tokenizer=None, tokenizer_dir: str | None = None):
        from coordexp_jax.data.prompts import SampleEncoder

        self.base = SampleEncoder(prompt_cfg, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)
        self.cfg, self.hcfg = prompt_cfg, hcfg
        self.counts = self.base.counts
        self._special: dict | None = None

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @property
    def token_ids(self) -> TokenIds:
        return self.base.token_ids

    def _sid(self, tok: str) -> int:
        if self._special is None:
            from coordexp_jax.data.tokenizer import _vocab_id

            self._special = {t: _vocab_id(self.tokenizer, t) for t in (BOX_START, BOX_END, REF_START, REF_END)}
        return self._special[tok]

    def _drop(self, reason: str, r: HOIRecord, detail: str):
        self.counts[reason] = self.counts.get(reason, 0) + 1
        log.warning("%s: %s: %s (sample dropped)", r.source, reason, detail)
        return None

    def load_images(self, r: HOIRecord):
        """[(pixel_values, grid_thw, (W_resized, H_resized))] of the record's images (ImageLoadError on a bad file)."""
        out = []
        for path, (w, h) in zip(r.images, r.sizes):
            img = image_lib.load_image(path)
            if img.shape[:2] != (h, w):
                raise image_lib.ImageSizeMismatchError(f"{path}: decoded {img.shape[1]}x{img.shape[0]} but the "
                                                       f"record ({r.source}) says {w}x{h}")
            pv, grid, _ = image_lib.process_image(img, self.cfg.image, name=f"{r.source} ({path})")
            ps = self.cfg.image.patch_size
            out.append((pv, grid, (int(grid[2]) * ps, int(grid[1]) * ps)))
        return out

    def written_box(self, box) -> np.ndarray:
        """A normalised box as the row writes it (the link box): on the 0..1000 grid (q / 1000) in the text form,
        on the bins (k / 999) in the tokens form."""
        b = np.asarray(box, np.float64)
        if self.hcfg.box_text == "tokens":
            return np.asarray(codec.bins_to_norm(codec.box_to_bins(b)), np.float64)
        return np.asarray(codec.qwen1000_to_norm(codec.norm_to_qwen1000(b)), np.float64)

    def _box_ids(self, p: Part, t: TokenIds) -> tuple[list[int], list[int]]:
        """ids of one box (its label first), and the offsets of its 4 coordinate tokens (tokens form) in them."""
        ids: list[int] = []
        if p.label is not None:
            ids += [self._sid(REF_START)] + self.base._enc(p.label) + [self._sid(REF_END)]
        ids.append(self._sid(BOX_START))
        coords = []
        if self.hcfg.box_text == "tokens":
            bins = codec.box_to_bins(np.asarray(p.box, np.float64))
            coords = [len(ids) + j for j in range(4)]
            ids += [int(t.coord_id(int(k))) for k in bins]
        else:
            q = [int(v) for v in codec.norm_to_qwen1000(np.asarray(p.box, np.float64))]
            ids += self.base._enc(f"({q[0]},{q[1]}),({q[2]},{q[3]})")
        ids.append(self._sid(BOX_END))
        return ids, coords

    def tokenize(self, turns: Sequence[Turn], image_tokens: Sequence[int], *, generation_prompt: bool = False):
        """-> dict(ids, assistant spans [(start, end)] (content through its <|im_end|>), links [(pos, part)],
        coords [(positions [4], box)] of assistant coordinate-token boxes). `generation_prompt`: drop the last turn
        (the answer) and end with `<|im_start|>assistant\\n`."""
        t = self.token_ids
        enc = self.base._enc
        ids: list[int] = []
        spans, links, coords = [], [], []
        use = list(turns[:-1]) if generation_prompt else list(turns)
        for n, turn in enumerate(use):
            role = "user" if turn.role == "tool" else turn.role
            ids += [t.im_start] + enc(role + "\n")
            if turn.role == "tool":
                ids += enc("<tool_response>\n")
            start = len(ids)
            for p in turn.parts:
                if p.is_image:
                    ids += [t.vision_start] + [t.image_pad] * int(image_tokens[p.image]) + [t.vision_end]
                elif p.is_box:
                    b, cpos = self._box_ids(p, t)
                    if turn.role == "assistant":
                        if cpos:
                            coords.append(([len(ids) + c for c in cpos], p.box))
                    else:
                        links.append((len(ids) + len(b) - 1, p))
                    ids += b
                elif p.text:
                    ids += enc(p.text)
            if turn.role == "tool":
                ids += enc("\n</tool_response>")
            ids.append(t.im_end)
            if turn.role == "assistant":
                spans.append((start, len(ids)))
            if n < len(use) - 1 or generation_prompt:
                ids += enc("\n")
        if generation_prompt:
            ids += [t.im_start] + enc("assistant\n")
        return {"ids": ids, "spans": spans, "links": links, "coords": coords}

    def __call__(self, r: HOIRecord):
        hcfg = self.hcfg
        if len(r.images) > hcfg.max_images:
            return self._drop("too_many_images", r, f"{len(r.images)} images > max_images {hcfg.max_images}")
        try:
            imgs = self.load_images(r)
        except image_lib.ImageLoadError as e:
            reason = "size_mismatch" if isinstance(e, image_lib.ImageSizeMismatchError) else "unreadable_image"
            return self._drop(reason, r, str(e))
        m2 = self.cfg.image.merge_size ** 2
        ntok = [int(np.prod(g)) // m2 for _, g, _ in imgs]
        turns = row_turns(r, hcfg)
        tk = self.tokenize(turns, ntok)
        ids = tk["ids"]
        n = len(ids)
        if n > self.cfg.max_text_len:
            return self._drop("too_long", r, f"{n} tokens > max_text_len {self.cfg.max_text_len}")
        if len(tk["links"]) > hcfg.max_boxes:
            return self._drop("too_many_boxes", r, f"{len(tk['links'])} prompt boxes > max_boxes {hcfg.max_boxes}")
        ids = np.asarray(ids, np.int32)
        targets = np.empty_like(ids)
        targets[:-1] = ids[1:]
        targets[-1] = self.token_ids.pad
        loss_mask = np.zeros(n, np.float32)
        for s, e in tk["spans"]:
            loss_mask[s - 1:e - 1] = 1.0  # positions whose target is an assistant token (content .. <|im_end|>)
        m = min(len(tk["coords"]), self.cfg.max_objects)
        box_pos = np.asarray([[c - 1 for c in cp] for cp, _ in tk["coords"][:m]], np.int32).reshape(m, 4)
        box_target = np.asarray([b for _, b in tk["coords"][:m]], np.float32).reshape(m, 4)
        lk = tk["links"]
        link_boxes = np.asarray([box_to_resized_pixels(self.written_box(p.box), *imgs[p.image][2]) for _, p in lk],
                                np.float32).reshape(-1, 4)
        return {"input_ids": ids, "targets": targets, "loss_mask": loss_mask, "box_pos": box_pos,
                "box_target": box_target, "pixel_values": [x[0] for x in imgs],
                "grid_thw": [np.asarray(x[1], np.int32) for x in imgs],
                "link_pos": np.asarray([pos for pos, _ in lk], np.int32),
                "link_boxes": link_boxes,
                "link_image": np.asarray([p.image for _, p in lk], np.int32),
                "link_kind": np.asarray([p.kind for _, p in lk], np.int32),
                "num_objects": np.int32(len(tk["coords"])),
                "prompt_len": np.int32(tk["spans"][-1][0])}


def empty_links(batch: int, max_boxes: int) -> dict:
    """`links` with no box: pos -1, boxes 0, image 0, kind OTHER (the padding of unused slots)."""
    return {"pos": np.full((batch, max_boxes), -1, np.int32), "boxes": np.zeros((batch, max_boxes, 4), np.float32),
            "image": np.zeros((batch, max_boxes), np.int32), "kind": np.full((batch, max_boxes), OTHER, np.int32)}


class HOICollator:
    """Rows -> one training batch: the keys of `prompts.Collator` (right-padded text, vision slots) with
    `max_images` image slots per row (I = B * max_images, each image its own slot, rows in order), plus `links`
    (`/work/notes` contract; docs/data.md "Human-object interaction"): `pos [B, N]` int32 (-1 = empty slot),
    `boxes [B, N, 4]` float32 pixels of the resized image, `image [B, N]` int32, `kind [B, N]` int32."""

    def __init__(self, prompt_cfg, token_ids: TokenIds, model_config, hcfg: HOIConfig = HOIConfig()):
        from coordexp_jax.data.prompts import Collator

        self.base = Collator(prompt_cfg, token_ids, model_config)
        self.cfg, self.ids, self.hcfg = prompt_cfg, token_ids, hcfg
        self.model_config = self.base.model_config
        self._shared_memory = False

    def enable_shared_memory_output(self) -> None:
        self._shared_memory = True

    def __call__(self, samples: Sequence[dict]) -> dict:
        from coordexp_jax.model.inputs import build_model_inputs

        B, N = len(samples), self.hcfg.max_boxes
        t = self.base.text_arrays(samples)
        links = empty_links(B, N)
        pvs, grids = [], []
        for b, s in enumerate(samples):
            k = len(s["link_pos"])
            links["pos"][b, :k], links["boxes"][b, :k] = s["link_pos"], s["link_boxes"]
            links["image"][b, :k], links["kind"][b, :k] = s["link_image"], s["link_kind"]
            pvs += list(s["pixel_values"])
            grids += [tuple(int(x) for x in g) for g in s["grid_thw"]]
        P = self.base.patches_per_slot([int(np.prod(g)) for g in grids])
        out = build_model_inputs(t["input_ids"], t["attention_mask"], grids, pvs, config=self.model_config,
                                 num_slots=B * self.hcfg.max_images, patches_per_slot=P)
        out.update(targets=t["targets"], loss_mask=t["loss_mask"],
                   coord_mask=(t["loss_mask"] > 0) & self.ids.is_coord(t["targets"]), box_pos=t["box_pos"],
                   box_target=t["box_target"], box_valid=t["box_valid"],
                   num_objects=np.asarray([s["num_objects"] for s in samples], np.int32), links=links)
        if self._shared_memory:
            links = out.pop("links")
            out = self.base._to_shared_memory(out)
            out["links"] = links
        return out


def encode_hoi_prompts(records: Sequence[HOIRecord], encoder: HOIEncoder, collator: HOICollator) -> dict:
    """Prompt-only batch for generation / evaluation: every turn before the last (the answer) and
    `<|im_start|>assistant\\n`, left-padded to the text bucket, with the model-input keys, `links` (positions in the
    padded row) and `prompt_lengths [B]`. Images are loaded from the records."""
    from coordexp_jax.data.prompts import bucket_len
    from coordexp_jax.model.inputs import build_model_inputs

    cfg, t = encoder.cfg, encoder.token_ids
    B, N = len(records), encoder.hcfg.max_boxes
    rows, pvs, grids, link_rows = [], [], [], []
    m2 = cfg.image.merge_size ** 2
    for r in records:
        imgs = encoder.load_images(r)
        turns = row_turns(r, encoder.hcfg)
        tk = encoder.tokenize(turns, [int(np.prod(g)) // m2 for _, g, _ in imgs], generation_prompt=True)
        if len(tk["links"]) > N:
            raise RecordError(r.source, "too_many_boxes", f"{len(tk['links'])} prompt boxes > max_boxes {N}")
        rows.append(tk["ids"])
        link_rows.append([(pos, p, imgs[p.image][2]) for pos, p in tk["links"]])
        pvs += [x[0] for x in imgs]
        grids += [tuple(int(v) for v in x[1]) for x in imgs]
    S = bucket_len(max(len(x) for x in rows), cfg)
    ids = np.full((B, S), t.pad, np.int32)
    am = np.zeros((B, S), np.int32)
    links = empty_links(B, N)
    for b, (x, lk) in enumerate(zip(rows, link_rows)):
        off = S - len(x)
        ids[b, off:], am[b, off:] = x, 1
        for k, (pos, p, wh) in enumerate(lk):
            links["pos"][b, k] = off + pos
            links["boxes"][b, k] = box_to_resized_pixels(encoder.written_box(p.box), *wh)
            links["image"][b, k], links["kind"][b, k] = p.image, p.kind
    out = build_model_inputs(ids, am, grids, pvs, config=collator.model_config,
                             num_slots=B * encoder.hcfg.max_images,
                             patches_per_slot=collator.base.patches_per_slot([int(np.prod(g)) for g in grids]))
    out["prompt_lengths"] = np.asarray([len(x) for x in rows], np.int32)
    out["links"] = links
    return out


# ----------------------------------------------------------------------------------------------- pipeline
TASK_KEYS = ("referring", "grounding", "other")


def split_by_task(recs: Sequence[HOIRecord]) -> dict[str, list[HOIRecord]]:
    """Records grouped by task_type ("other" for records without one)."""
    out: dict[str, list[HOIRecord]] = {}
    for r in recs:
        out.setdefault(r.task_type or "other", []).append(r)
    return out


def make_hoi_iterator(sources: Mapping[str, Sequence[HOIRecord]], weights: Mapping[str, float], prompt_cfg,
                      hcfg: HOIConfig, *, batch_size: int, model_config, tokenizer=None,
                      tokenizer_dir: str | None = None, seed: int = 0, num_workers: int = 0,
                      shard_index: int | None = None, shard_count: int | None = None, reports=None):
    """The HOI training input: in-memory record sources (name -> records, e.g. `split_by_task`) mixed by `weights`
    (`pipeline.build_dataset`: per-source shuffle/repeat/shard, Grain mix, workers) -> `HOIEncoder` ->
    `HOICollator` batches with `links`. Returns a `pipeline.DataIterator` (exact resume with get/set_state)."""
    from coordexp_jax.data import pipeline

    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    enc = HOIEncoder(prompt_cfg, hcfg, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)
    coll = HOICollator(prompt_cfg, enc.token_ids, model_config, hcfg)
    ds = pipeline.build_dataset(dict(sources), dict(weights), transform=enc, batch_size=batch_size, batch_fn=coll,
                                seed=seed, shard_index=shard_index, shard_count=shard_count, num_workers=num_workers)
    return pipeline.DataIterator(ds, dict(reports or {}))


# ----------------------------------------------------------------------------------------------- training config
def hoi_config_from(cfg) -> HOIConfig:
    """HOIConfig of a training config: `data.hoi.*` and `model.spatial_linking.{max_boxes, interaction_box}`."""
    sl = cfg.model.get("spatial_linking") if hasattr(cfg.model, "get") else None
    h = cfg.data.hoi
    return HOIConfig(box_text=h.box_text, interaction_box=bool(sl.interaction_box) if sl is not None else True,
                     max_boxes=int(sl.max_boxes) if sl is not None else 8, max_images=int(h.max_images),
                     system_prompt=h.system_prompt or None)


def synthetic_dir(cfg) -> str:
    """Where the synthetic HOI set of a config lives: a cache dir keyed by its settings
    (`$COORDEXP_CACHE` or ~/.cache/coordexp_jax)."""
    import hashlib

    from coordexp_jax.data.hoi_synthetic import VERSION

    h = cfg.data.hoi
    key = json.dumps({"version": VERSION, "image_size": cfg.data.image_size, "num_train": cfg.data.num_train,
                      "num_eval": cfg.data.num_eval, "seed": cfg.data.seed, "min_pairs": h.min_pairs,
                      "max_pairs": h.max_pairs, "tool_ratio": h.tool_ratio}, sort_keys=True)
    root = os.environ.get("COORDEXP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "coordexp_jax"))
    return os.path.join(root, "hoi_synthetic_" + hashlib.sha1(key.encode()).hexdigest()[:10])


def data_files(cfg) -> tuple[list[str], list[str]]:
    """(train files, eval files) of `data.kind = 'hoi'`: the synthetic set's referring/grounding files (generated
    on first use) when `data.path` is '', else `data.path` and `data.eval_path` (either may be '')."""
    if not cfg.data.path:
        from coordexp_jax.data import hoi_synthetic as hs

        h = cfg.data.hoi
        scfg = hs.HOISyntheticConfig(image_size=cfg.data.image_size, min_pairs=h.min_pairs, max_pairs=h.max_pairs,
                                     tool_ratio=h.tool_ratio)
        p = hs.ensure_dataset(synthetic_dir(cfg), cfg.data.num_train, max(cfg.data.num_eval, 1), seed=cfg.data.seed,
                              cfg=scfg)
        return [p["train"]["referring"], p["train"]["grounding"]], [p["val"]["referring"], p["val"]["grounding"]]
    return [cfg.data.path], [cfg.data.eval_path] if cfg.data.eval_path else []


def load_files(paths: Sequence[str], *, refer_format: str = "qwen1000", check_images: str = "header",
               policy=None) -> tuple[list[HOIRecord], ValidationReport]:
    """Every valid record of the files (one report over all; `read_hoi_file`)."""
    report = ValidationReport()
    recs: list[HOIRecord] = []
    for p in paths:
        recs += read_hoi_file(p, report=report, refer_format=refer_format, check_images=check_images,
                              policy=policy)[0]
    return recs, report


def task_weights(cfg) -> dict[str, float]:
    """Mix weights by task: referring / grounding from `data.hoi`, records without a task_type 1.0."""
    return {"referring": float(cfg.data.hoi.referring_weight), "grounding": float(cfg.data.hoi.grounding_weight),
            "other": 1.0}


def mixed_sources(recs: Sequence[HOIRecord], weights: Mapping[str, float], where: str):
    """(sources, weights) for `make_hoi_iterator`: records by task, tasks with weight 0 left out. DataConfigError
    naming `where` when nothing is left."""
    by = split_by_task(recs)
    src = {k: v for k, v in by.items() if weights.get(k, 1.0) > 0}
    if not src:
        raise records_lib.DataConfigError(f"{where}: no HOI record of a task with a positive weight (tasks "
                                          f"{sorted(by)}, weights {dict(weights)})")
    return src, {k: weights.get(k, 1.0) for k in src}


def build_train_data(cfg, prompt_cfg, model_config, tokenizer_dir: str, batch_size: int, eval_batch_size: int):
    """The HOI data of a training run: (train DataIterator, eval iterator factory or None, eval records).

    Train rows mix tasks by `data.hoi.*_weight`; evaluation batches (teacher-forced, same keys) take the first
    `data.num_eval` records of each eval task. Errors (a missing file, a bad record, no usable record) are raised
    here, as one line."""
    hcfg = hoi_config_from(cfg)
    train_files, eval_files = data_files(cfg)
    for p in train_files + eval_files:
        if not os.path.isfile(p):
            raise records_lib.DataConfigError(f"config key 'data.path'/'data.eval_path': HOI records file not found: "
                                              f"{p}")
    rf = cfg.data.hoi.refer_format
    recs, rep = load_files(train_files, refer_format=rf)
    if not recs:
        raise records_lib.DataConfigError(f"no usable HOI record in {train_files} ({rep.one_line()})")
    src, w = mixed_sources(recs, task_weights(cfg), str(train_files))
    it = make_hoi_iterator(src, w, prompt_cfg, hcfg, batch_size=batch_size, model_config=model_config,
                           tokenizer_dir=tokenizer_dir, seed=cfg.data.seed, num_workers=cfg.data.worker_count,
                           reports={"hoi": rep})
    eval_recs: list[HOIRecord] = []
    eval_fn = None
    if eval_files and cfg.data.num_eval > 0:
        ev, _ = load_files(eval_files, refer_format=rf)
        by = split_by_task(ev)
        eval_recs = [r for k in sorted(by) if task_weights(cfg).get(k, 1.0) > 0 for r in by[k][:cfg.data.num_eval]]

        def eval_fn():
            s, ww = mixed_sources(eval_recs, task_weights(cfg), str(eval_files))
            return make_hoi_iterator(s, ww, prompt_cfg, hcfg, batch_size=eval_batch_size, model_config=model_config,
                                     tokenizer_dir=tokenizer_dir, seed=0, num_workers=0)
    return it, eval_fn, eval_recs
