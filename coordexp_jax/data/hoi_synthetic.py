"""A synthetic human-object interaction set for the CPU demo: stick-figure people and simple objects whose
interaction is defined by geometry, several pairs per image (so the boxes are needed to answer).

Each image (default 160 x 160) has two rows, each with a ground line; every row holds 1-2 (person, object) pairs
placed side by side with a gap between pairs (a pair never touches another pair). A person is a head (disc), a
body, two arms and two legs drawn with PIL lines; objects are a ball, a cup, a bike and a horse. The actions and
their geometry (person box p, object box o, person height h = p.y2 - p.y1; `action_of_boxes` is the rule):

- riding: the person sits on the bike / horse (hip at its top, legs down its sides);
  rule p.y1 < o.y1 < p.y2 < o.y2 - 0.1 o.h and o.x1 < centre_x(p) < o.x2 (checked first);
- looking at: standing, the face turned to the object, which stands apart on the ground; rule: horizontal gap
  between the boxes >= 0.1 h;
- holding: an arm held out, the ball / cup in the hand at chest height; rule: the boxes overlap in x,
  centre_y(o) - p.y1 in [0.2 h, 0.65 h] and o.y2 < p.y2 - 0.2 h;
- kicking: one leg swung forward, the ball at that foot on the ground; rule: the boxes overlap in x,
  abs(o.y2 - p.y2) <= 0.1 h and o.y1 > p.y1 + 0.5 h.

Objects and their actions: ball (holding, kicking, looking at), cup (holding, looking at), bike and horse (riding,
looking at). The (action, object) combinations of one image are distinct, so every pair has a grounding query with
one answer. Records (`hoi.py` format, the HOI seed's chat shape):
- `<split>_referring.jsonl`: one per pair: "What is the person <box> doing with the object <box>?" -> "kicking ball";
  with `tool_ratio` > 0 that fraction is in the tool-calling form (the assistant asks `zoom_in` on the pair, a tool
  turn shows the crop as a second image, then answers);
- `<split>_grounding.jsonl`: one per pair: "Who is kicking a ball?" -> `<|object_ref_start|>person<|object_ref_end|>
  <|box_start|>(x1,y1),(x2,y2)<|box_end|><|object_ref_start|>ball<|object_ref_end|><|box_start|>...<|box_end|>`.
Boxes are written in the 0..1000 text form (q = round(1000 x / W)); `metadata` holds the pixel boxes of the pair
and of every pair of the image. Image i of a split is drawn from `default_rng([seed, split, i])`: deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from coordexp_jax.data import hoi
from coordexp_jax.data.records import atomic_write

ACTIONS = ("holding", "kicking", "riding", "looking at")
OBJECT_ACTIONS = {"ball": ("holding", "kicking", "looking at"), "cup": ("holding", "looking at"),
                  "bike": ("riding", "looking at"), "horse": ("riding", "looking at")}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
# Bumped whenever the drawing changes: part of the cache key and of the set's metadata, so that a cached set drawn
# by an older generator is never reused.
VERSION = 2
SHIRTS = ((200, 40, 40), (40, 90, 210), (30, 150, 60), (150, 60, 200), (230, 130, 20), (20, 160, 170))
# saturated or dark: every colour differs from the light background (185..225 per channel) by > 60 in a channel
OBJECT_COLOURS = {"ball": ((230, 60, 30), (240, 190, 20), (30, 150, 230)), "cup": ((30, 60, 160), (20, 140, 120),
                                                                                (200, 60, 140)),
                  "bike": ((30, 30, 30), (120, 20, 20), (20, 40, 110)), "horse": ((120, 70, 30), (70, 40, 20),
                                                                              (40, 30, 30))}
SKIN = (200, 140, 100)  # > 60 from the background in a channel


@dataclasses.dataclass(frozen=True)
class HOISyntheticConfig:
    """Parameters of the generator: square images of `image_size` px, `min_pairs`..`max_pairs` pairs per image
    (at most 2 per row), the actions used, the fraction of referring records in the tool-calling form."""

    image_size: int = 160
    min_pairs: int = 2
    max_pairs: int = 3
    actions: tuple[str, ...] = ACTIONS
    tool_ratio: float = 0.0
    noise_std: float = 6.0

    def __post_init__(self):
        bad = [a for a in self.actions if a not in ACTIONS]
        if bad or not self.actions:
            raise ValueError(f"HOISyntheticConfig.actions must be a non-empty subset of {ACTIONS}, got {self.actions}")
        if not 1 <= self.min_pairs <= self.max_pairs <= 4:
            raise ValueError(f"need 1 <= min_pairs <= max_pairs <= 4, got {self.min_pairs}, {self.max_pairs}")
        if self.image_size < 96:
            raise ValueError(f"image_size must be >= 96 px (figures would be too small), got {self.image_size}")
        if not 0.0 <= self.tool_ratio <= 1.0:
            raise ValueError(f"tool_ratio must be in [0, 1], got {self.tool_ratio}")


# ----------------------------------------------------------------------------------------------- figures
def _person(cx: float, g: float, H: float, d: int, pose: str, hip=None) -> list:
    """Primitives of a stick figure: ("line", [pts], width) / ("disc", box) / ("dot", box)."""
    lw = max(2, round(H / 12))
    if pose == "riding":
        hx, hy = hip
    else:
        hx, hy = cx, g - 0.45 * H
    shy = hy - 0.30 * H
    r = 0.11 * H
    head_c = (hx, hy - 0.44 * H)
    prims = [("line", [(hx, hy), (hx, shy - 0.03 * H)], lw + 1)]
    if pose == "riding":
        legs = [[(hx, hy), (hx + 0.10 * H, hy + 0.14 * H), (hx + 0.06 * H, hy + 0.28 * H)],
                [(hx, hy), (hx - 0.10 * H, hy + 0.14 * H), (hx - 0.06 * H, hy + 0.28 * H)]]
        arms = [[(hx, shy), (hx + d * 0.25 * H, hy - 0.12 * H)], [(hx, shy), (hx + d * 0.18 * H, hy - 0.08 * H)]]
    elif pose == "kicking":
        legs = [[(hx, hy), (hx + d * 0.30 * H, g - 0.08 * H)], [(hx, hy), (hx - d * 0.10 * H, g)]]
        arms = [[(hx, shy), (hx - d * 0.18 * H, hy - 0.05 * H)], [(hx, shy), (hx + d * 0.16 * H, hy - 0.02 * H)]]
    else:
        legs = [[(hx, hy), (hx + 0.12 * H, g)], [(hx, hy), (hx - 0.12 * H, g)]]
        if pose == "holding":
            arms = [[(hx, shy), (hx + d * 0.32 * H, g - 0.62 * H)], [(hx, shy), (hx - d * 0.12 * H, hy)]]
        else:
            arms = [[(hx, shy), (hx + 0.14 * H, hy)], [(hx, shy), (hx - 0.14 * H, hy)]]
    prims += [("line", p, lw) for p in legs + arms]
    prims.append(("disc", (head_c[0] - r, head_c[1] - r, head_c[0] + r, head_c[1] + r)))
    return prims


def _hand(cx, g, H, d):
    """The holding hand (end of the held-out arm) of a standing person."""
    return cx + d * 0.32 * H, g - 0.62 * H


def _object(kind: str, x1: float, y1: float, w: float, h: float, d: int) -> list:
    """Primitives of an object filling the box (x1, y1, w, h) (continuous pixels)."""
    x2, y2 = x1 + w, y1 + h
    if kind == "ball":
        return [("disc", (x1, y1, x2 - 1, y2 - 1))]
    if kind == "cup":
        hw = 0.25 * w
        body = [(x1, y1), (x2 - hw, y1), (x2 - hw - 0.12 * w, y2 - 1), (x1 + 0.12 * w, y2 - 1)]
        return [("poly", body), ("ring", (x2 - hw - 0.2 * w, y1 + 0.2 * h, x2 - 1, y1 + 0.65 * h), max(2, w // 8))]
    lw = max(2, round(h / 10))
    if kind == "bike":
        rw = 0.42 * h
        wl, wr = (x1, y2 - 2 * rw, x1 + 2 * rw - 1, y2 - 1), (x2 - 2 * rw, y2 - 2 * rw, x2 - 1, y2 - 1)
        cl, cr = (x1 + rw, y2 - rw), (x2 - rw, y2 - rw)
        top = y1 + lw / 2
        seat = (x1 + 0.4 * w, top)
        return [("ring", wl, lw), ("ring", wr, lw), ("line", [cl, seat, cr], lw),
                ("line", [seat, (x1 + 0.8 * w, top), cr], lw), ("line", [(x1 + 0.3 * w, top), (x1 + 0.5 * w, top)], lw)]
    # horse: body ellipse at the top, four legs, neck and head at the front (d), tail at the back
    bx1, bx2 = x1 + 0.15 * w, x2 - 0.15 * w
    by1, by2 = y1, y1 + 0.45 * h
    legs = [(bx1 + 0.1 * w, by2 - 2), (bx1 + 0.22 * w, by2 - 2), (bx2 - 0.22 * w, by2 - 2), (bx2 - 0.1 * w, by2 - 2)]
    prims = [("disc", (bx1, by1, bx2, by2))] + [("line", [p, (p[0], y2 - 1)], lw) for p in legs]
    front, back = (bx2, x2 - 1) if d > 0 else (bx1, x1)
    prims.append(("poly", [(front - d * 0.05 * w, by1 + 0.1 * h), (back, y1), (back, y1 + 0.2 * h),
                           (front - d * 0.05 * w, by2 - 0.1 * h)]))
    tail = bx1 if d > 0 else bx2
    prims.append(("line", [(tail, by1 + 0.1 * h), (x1 if d > 0 else x2 - 1, by2)], lw))
    return prims


def _draw(draw: ImageDraw.ImageDraw, prims, fill, dx: float = 0.0):
    for p in prims:
        if p[0] == "line":
            draw.line([(x + dx, y) for x, y in p[1]], fill=fill, width=int(p[2]), joint="curve")
        elif p[0] == "disc":
            x1, y1, x2, y2 = p[1]
            draw.ellipse([x1 + dx, y1, x2 + dx, y2], fill=fill)
        elif p[0] == "ring":
            x1, y1, x2, y2 = p[1]
            draw.ellipse([x1 + dx, y1, x2 + dx, y2], outline=fill, width=int(p[2]))
        elif p[0] == "poly":
            draw.polygon([(x + dx, y) for x, y in p[1]], fill=fill)


def _mask_box(prims, size: int, dx: float = 0.0, width: int | None = None):
    """Tight continuous pixel box (x1, y1, x2, y2) of what the primitives draw, or None if nothing lands."""
    m = Image.new("L", (width or size, size), 0)
    _draw(ImageDraw.Draw(m), prims, 255, dx)
    a = np.asarray(m) > 0
    if not a.any():
        return None
    ys, xs = np.nonzero(a)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _pair(rng: np.random.Generator, action: str, obj: str, g: float, H: float) -> dict:
    """A pair laid out around x = 0 (shifted later): person and object primitives, facing d."""
    d = 1 if rng.random() < 0.5 else -1
    out = {"action": action, "object": obj, "d": d}
    if action == "riding":
        ow, oh = 0.95 * H * rng.uniform(0.95, 1.1), 0.5 * H
        ox1, oy1 = -ow / 2, g - oh
        hip = (rng.uniform(-0.1, 0.1) * ow, oy1 + 0.05 * H)
        out["object_prims"] = _object(obj, ox1, oy1, ow, oh, d)
        out["person_prims"] = _person(0, g, H, d, "riding", hip=hip)
        out["person_first"] = False  # the rider is drawn over the animal / bike
        return out
    out["person_first"] = True
    if action == "holding":
        s = 0.3 * H * rng.uniform(0.9, 1.1)
        hx, hy = _hand(0, g, H, d)
        lw = max(2, round(H / 12))
        cx = hx + d * (s / 2 - lw)
        out["object_prims"] = _object(obj, cx - s / 2, hy - s / 2, s, s, d)
        out["person_prims"] = _person(0, g, H, d, "holding")
        out["person_first"] = False  # the hand holds the object: arm over it
        return out
    if action == "kicking":
        s = 0.28 * H * rng.uniform(0.9, 1.1)
        fx = d * 0.30 * H
        lw = max(2, round(H / 12))
        cx = fx + d * (s / 2 - lw / 2)
        out["object_prims"] = _object(obj, cx - s / 2, g - s, s, s, d)
        out["person_prims"] = _person(0, g, H, d, "kicking")
        return out
    # looking at: the object stands apart on the ground, on the side the person faces
    if obj in ("bike", "horse"):
        ow, oh = 0.95 * H * rng.uniform(0.95, 1.1), 0.5 * H
    else:
        ow = oh = 0.3 * H * rng.uniform(0.9, 1.1)
    gap = rng.uniform(0.2, 0.4) * H
    half = 0.2 * H  # the standing person's half-width (arms and legs at +-0.14 H, head +-0.11 H)
    x1 = half + gap if d > 0 else -half - gap - ow
    out["object_prims"] = _object(obj, x1, g - oh, ow, oh, d)
    prims = _person(0, g, H, d, "looking")
    # the face: an eye dot on the side the person faces
    r = 0.11 * H
    hc = (0, g - 0.45 * H - 0.44 * H)
    out["eye"] = (hc[0] + d * 0.5 * r - 1, hc[1] - 1.5, hc[0] + d * 0.5 * r + 2, hc[1] + 1.5)
    out["person_prims"] = prims
    return out


def _background(rng: np.random.Generator, S: int, noise: float, grounds) -> np.ndarray:
    base = rng.uniform(185, 225, 3).astype(np.float32)
    t = np.arange(S, dtype=np.float32) / S
    ang = rng.uniform(0, 2 * np.pi)
    ramp = np.float32(np.cos(ang)) * t[None, :] + np.float32(np.sin(ang)) * t[:, None]  # [S, S]
    img = base + rng.uniform(-12, 12, 3).astype(np.float32) * ramp[..., None]
    img += rng.standard_normal((S, S, 3), dtype=np.float32) * np.float32(noise)
    for g in grounds:
        img[int(g):int(g) + 2] = base * 0.55
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image(rng: np.random.Generator, cfg: HOISyntheticConfig) -> tuple[np.ndarray, list[dict]]:
    """One image `[S, S, 3] uint8` and its pairs: dicts with action, object, person_box, object_box (tight
    continuous pixel boxes of what is drawn), row. Raises RuntimeError if min_pairs cannot be placed (never with
    the defaults)."""
    S = cfg.image_size
    R = S / 2
    grounds = [R - 3, S - 3]
    combos = [(a, o) for o, acts in OBJECT_ACTIONS.items() for a in acts if a in cfg.actions]
    for _attempt in range(50):
        n = int(rng.integers(cfg.min_pairs, cfg.max_pairs + 1))
        pick = rng.permutation(len(combos))[:n]
        rows: list[list] = [[], []]
        for j, ci in enumerate(pick):
            rows[j % 2 if rng.random() < 0.8 else (j + 1) % 2].append(combos[ci])
        placed = []
        ok = True
        for ri, row in enumerate(rows):
            g = grounds[ri]
            pairs = []
            for a, o in row:
                H = rng.uniform(0.7, 0.88) * R
                p = _pair(rng, a, o, g, H)
                ext = _mask_box(p["person_prims"] + p["object_prims"], S, dx=2 * S, width=4 * S)
                p["ext"] = (ext[0] - 2 * S, ext[2] - 2 * S)
                pairs.append(p)
            total = sum(p["ext"][1] - p["ext"][0] for p in pairs) + 6 * (len(pairs) + 1)
            if total > S:
                ok = False
                break
            slack = S - total
            cuts = np.sort(rng.uniform(0, slack, len(pairs)))
            x = 0.0
            for k, p in enumerate(pairs):
                x += 6 + (cuts[k] - (cuts[k - 1] if k else 0.0))
                p["dx"] = x - p["ext"][0]
                x += p["ext"][1] - p["ext"][0]
                p["row"] = ri
                placed.append(p)
        if ok and len(placed) >= cfg.min_pairs:
            break
    else:
        raise RuntimeError("could not place the pairs (image too small for max_pairs)")
    img = Image.fromarray(_background(rng, S, cfg.noise_std, grounds))
    d = ImageDraw.Draw(img)
    out = []
    for p in placed:
        shirt = SHIRTS[int(rng.integers(len(SHIRTS)))]
        ocol = OBJECT_COLOURS[p["object"]][int(rng.integers(3))]
        order = [("person", p["person_prims"]), ("object", p["object_prims"])]
        if not p["person_first"]:
            order = order[::-1]
        for who, prims in order:
            if who == "person":
                body = [q for q in prims if q[0] != "disc"]
                _draw(d, body, shirt, p["dx"])
                _draw(d, [q for q in prims if q[0] == "disc"], SKIN, p["dx"])
            else:
                _draw(d, prims, ocol, p["dx"])
        if "eye" in p:
            x1, y1, x2, y2 = p["eye"]
            d.ellipse([x1 + p["dx"], y1, x2 + p["dx"], y2], fill=(20, 20, 20))
        out.append({"action": p["action"], "object": p["object"], "row": p["row"], "facing": p["d"],
                    "person_box": list(_mask_box(p["person_prims"], S, p["dx"])),
                    "object_box": list(_mask_box(p["object_prims"], S, p["dx"]))})
    return np.asarray(img), out


def action_of_boxes(person_box, object_box) -> str | None:
    """The action the geometry rules of the module docstring give for a pair of pixel boxes (None: no rule)."""
    px1, py1, px2, py2 = person_box
    ox1, oy1, ox2, oy2 = object_box
    h = py2 - py1
    gap = max(ox1 - px2, px1 - ox2)
    pcx = (px1 + px2) / 2
    if py1 < oy1 < py2 < oy2 - 0.1 * (oy2 - oy1) and ox1 < pcx < ox2:
        return "riding"
    if gap >= 0.1 * h:
        return "looking at"
    if gap < 0:
        if 0.2 * h <= (oy1 + oy2) / 2 - py1 <= 0.65 * h and oy2 < py2 - 0.2 * h:
            return "holding"
        if abs(oy2 - py2) <= 0.1 * h and oy1 > py1 + 0.5 * h:
            return "kicking"
    return None


# ----------------------------------------------------------------------------------------------- records
def _q(box_px, S) -> tuple:
    return tuple(float(v) / S for v in box_px)


def grounding_query(action: str, obj: str) -> str:
    return f"Who is {action} a {obj}?"


def referring_messages(pair: dict, S: int) -> list[dict]:
    p, o = hoi.format_box(_q(pair["person_box"], S)), hoi.format_box(_q(pair["object_box"], S))
    return [{"role": "user", "content": f"{hoi.IMAGE_PLACEHOLDER}What is the person {p} doing with the object {o}?"},
            {"role": "assistant", "content": f"{pair['action']} {pair['object']}"}]


def grounding_messages(pair: dict, S: int) -> list[dict]:
    ans = (f"{hoi.REF_START}person{hoi.REF_END}{hoi.format_box(_q(pair['person_box'], S))}"
           f"{hoi.REF_START}{pair['object']}{hoi.REF_END}{hoi.format_box(_q(pair['object_box'], S))}")
    return [{"role": "user", "content": hoi.IMAGE_PLACEHOLDER + grounding_query(pair["action"], pair["object"])},
            {"role": "assistant", "content": ans}]


def tool_messages(pair: dict, S: int) -> list[dict]:
    """The tool-calling form of a referring record: zoom_in on the pair's union box, the crop, the answer."""
    u = hoi.union_box(_q(pair["person_box"], S), _q(pair["object_box"], S))
    q = [int(v) for v in np.rint(np.asarray(u) * 1000)]
    msgs = referring_messages(pair, S)
    call = json.dumps({"name": "zoom_in", "arguments": {"bbox_2d": q, "target_image": 1}})
    return [msgs[0], {"role": "assistant", "content": f"<tool_call>\n{call}\n</tool_call>"},
            {"role": "tool", "content": hoi.IMAGE_PLACEHOLDER}, msgs[1]]


def crop_box(pair: dict, S: int, margin: int = 4) -> tuple[int, int, int, int]:
    """The zoomed crop of a pair: its union box grown by `margin` px, clipped to the image (integer pixels)."""
    u = hoi.union_box(pair["person_box"], pair["object_box"])
    return (max(0, int(u[0]) - margin), max(0, int(u[1]) - margin), min(S, int(u[2]) + margin),
            min(S, int(u[3]) + margin))


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLIT_IDS.get(split, 3), int(index)])


def make_records(out_dir: str, split: str, index: int, seed: int, cfg: HOISyntheticConfig) -> tuple[list, list]:
    """Draws image `index` of `split`, writes it (and its crops) under out_dir/images; -> (referring, grounding)
    record dicts."""
    rng = image_rng(seed, split, index)
    arr, pairs = make_image(rng, cfg)
    S = cfg.image_size
    name = f"images/{split}_{index:06d}.png"
    Image.fromarray(arr).save(os.path.join(out_dir, name), compress_level=1)
    ref, grd = [], []
    for k, p in enumerate(pairs):
        meta = {"source": "hoi_synthetic", "split": split, "index": index, "pair": k, "action": p["action"],
                "object": p["object"], "person_box": p["person_box"], "object_box": p["object_box"],
                "pairs": pairs}
        base = {"images": [name], "image_sizes": [[S, S]], "metadata": meta}
        if cfg.tool_ratio > 0 and rng.random() < cfg.tool_ratio:
            cb = crop_box(p, S)
            crop = f"images/{split}_{index:06d}_crop{k}.png"
            Image.fromarray(arr[cb[1]:cb[3], cb[0]:cb[2]]).save(os.path.join(out_dir, crop), compress_level=1)
            ref.append({**base, "images": [name, crop], "image_sizes": [[S, S], [cb[2] - cb[0], cb[3] - cb[1]]],
                        "messages": tool_messages(p, S), "task_type": "referring",
                        "metadata": {**meta, "crop_box": list(cb)}})
        else:
            ref.append({**base, "messages": referring_messages(p, S), "task_type": "referring"})
        grd.append({**base, "messages": grounding_messages(p, S), "task_type": "grounding"})
    return ref, grd


def write_split(out_dir: str, split: str, num: int, seed: int, cfg: HOISyntheticConfig) -> dict:
    """Generates `num` images of `split`; writes `<split>_referring.jsonl` and `<split>_grounding.jsonl`
    (atomically); returns their paths."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    paths = {t: os.path.join(out_dir, f"{split}_{t}.jsonl") for t in ("referring", "grounding")}
    ref, grd = [], []
    for i in range(num):
        r, g = make_records(out_dir, split, i, seed, cfg)
        ref += r
        grd += g
    for t, recs in (("referring", ref), ("grounding", grd)):
        with atomic_write(paths[t]) as f:
            for d in recs:
                f.write(json.dumps(d) + "\n")
    return paths


def ensure_dataset(out_dir: str, num_train: int, num_val: int, seed: int = 0,
                   cfg: HOISyntheticConfig = HOISyntheticConfig()) -> dict:
    """Generates the set once and reuses it when `out_dir/hoi_synthetic.json` matches the request; a directory
    holding a set made with other settings is an error (ValueError) naming the differing keys (never regenerated
    in place: another run may be reading it). Returns {split: {"referring": path, "grounding": path}}."""
    meta = json.loads(json.dumps({"version": VERSION, "num_train": num_train, "num_val": num_val, "seed": seed,
                                  "config": dataclasses.asdict(cfg)}))
    meta_path = os.path.join(out_dir, "hoi_synthetic.json")
    paths = {s: {t: os.path.join(out_dir, f"{s}_{t}.jsonl") for t in ("referring", "grounding")}
             for s in ("train", "val")}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            have = json.load(f)
        if have == meta:
            return paths
        flat = lambda m: {**{k: v for k, v in m.items() if k != "config"},  # noqa: E731
                          **{f"config.{k}": v for k, v in m.get("config", {}).items()}}
        fh, fw = flat(have), flat(meta)
        diff = sorted(k for k in set(fh) | set(fw) if fh.get(k) != fw.get(k))
        raise ValueError(f"{out_dir} holds a synthetic HOI set generated with other settings ({', '.join(diff)}: "
                         f"{meta_path} has {[fh.get(k) for k in diff]}, asked {[fw.get(k) for k in diff]}); point "
                         "data.path at another directory or delete this one")
    write_split(out_dir, "train", num_train, seed, cfg)
    write_split(out_dir, "val", num_val, seed, cfg)
    with atomic_write(meta_path) as f:
        json.dump(meta, f, indent=1)
    return paths
