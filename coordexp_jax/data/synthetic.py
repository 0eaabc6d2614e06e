"""A procedural detection set: coloured shapes on textured, noisy backgrounds, with clutter and occlusion.

The demo's default data. Each image `i` of split `s` is drawn from its own generator seeded by
`(seed, split_id, i)`, so any image can be regenerated alone and the set is identical across runs and machines.

Per image: `min_objects..max_objects` objects (each of a class in `classes`, drawn as a distinct shape; by
default every class has its own colour, jittered), sizes from `min_size_frac` to `max_size_frac` of the shorter
side, placed so that no object hides more than `max_overlap` of another (later objects partly occlude earlier
ones: boxes are amodal, i.e. the full shape), plus up to `clutter` distractors (small marks and thin lines in
muted colours that are not objects). Each object also gets a referring phrase that singles it out among the
image's objects, e.g. "the large red circle", "the leftmost blue square".

Outputs (`write_split`): `images/<split>_<i>.png`, `<split>.jsonl` (detection records, pixel boxes),
`<split>_grounding.jsonl` (one grounding record per object with a unique phrase) and `<split>_coco.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")
PALETTE = {  # saturated colours, far from the muted backgrounds
    "red": (220, 40, 40), "blue": (40, 80, 230), "yellow": (235, 210, 30), "green": (30, 170, 60),
    "purple": (150, 50, 210), "orange": (245, 130, 20), "cyan": (20, 200, 220), "magenta": (230, 40, 180),
}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generator. The defaults are tuned for the demo (a ~2M-parameter model at 128 px)."""

    image_size: tuple[int, int] = (128, 128)  # (height, width)
    classes: tuple[str, ...] = ("circle", "square", "triangle")
    class_colors: bool = True  # True: class k always has colour k of PALETTE (jittered); False: random colours
    min_objects: int = 1
    max_objects: int = 4
    min_size_frac: float = 1 / 8  # of the shorter image side
    max_size_frac: float = 0.4
    max_overlap: float = 0.25  # the largest fraction of an object's box another box may cover
    clutter: int = 3  # up to this many distractor marks per image
    noise_std: float = 10.0  # pixel noise on the background
    texture: bool = True  # stripes / checks / blobs on the background
    color_jitter: int = 25

    def __post_init__(self):
        bad = [c for c in self.classes if c not in SHAPES]
        if bad or not self.classes:
            raise ValueError(f"SyntheticConfig.classes must be a non-empty subset of {SHAPES}, got {self.classes}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"SyntheticConfig.classes has duplicates: {self.classes}")
        if self.class_colors and len(self.classes) > len(PALETTE):
            raise ValueError(f"at most {len(PALETTE)} classes with class_colors=True")
        if not 0 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 0 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_size_frac <= self.max_size_frac <= 1:
            raise ValueError(f"need 0 < min_size_frac <= max_size_frac <= 1, got {self.min_size_frac}, "
                             f"{self.max_size_frac}")
        h, w = self.image_size
        if min(h, w) * self.min_size_frac < 4:
            raise ValueError(f"objects of {self.min_size_frac} x {min(h, w)} px are too small to draw")


def class_color(cfg: SyntheticConfig, cls: str) -> str:
    return list(PALETTE)[cfg.classes.index(cls)]


def _polygon(shape: str, x1, y1, x2, y2):
    """Vertices of a shape that touches all four sides of the box (x1, y1)-(x2, y2) (inclusive pixels)."""
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
    if shape == "triangle":
        return [(x1, y2), (x2, y2), (cx, y1)]
    if shape == "diamond":
        return [(cx, y1), (x2, cy), (cx, y2), (x1, cy)]
    if shape == "hexagon":
        return [(x1 + rx / 2, y1), (x2 - rx / 2, y1), (x2, cy), (x2 - rx / 2, y2), (x1 + rx / 2, y2), (x1, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            r = 1.0 if k % 2 == 0 else 0.45
            pts.append((math.cos(a) * r, math.sin(a) * r))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        lo_x, hi_x, lo_y, hi_y = min(xs), max(xs), min(ys), max(ys)
        return [(x1 + (px - lo_x) / (hi_x - lo_x) * (x2 - x1), y1 + (py - lo_y) / (hi_y - lo_y) * (y2 - y1))
                for px, py in pts]
    raise ValueError(shape)


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, box, fill):
    x1, y1, x2, y2 = box  # continuous box; the shape covers pixels x1..x2-1
    a, b, c, e = x1, y1, x2 - 1, y2 - 1
    if shape == "circle":
        d.ellipse([a, b, c, e], fill=fill)
    elif shape == "ring":
        d.ellipse([a, b, c, e], outline=fill, width=max(2, (x2 - x1) // 5))
    elif shape == "square":
        d.rectangle([a, b, c, e], fill=fill)
    elif shape == "cross":
        tw, th = max(2, (x2 - x1) // 3), max(2, (y2 - y1) // 3)
        cx, cy = (a + c) // 2, (b + e) // 2
        d.rectangle([cx - tw // 2, b, cx - tw // 2 + tw - 1, e], fill=fill)
        d.rectangle([a, cy - th // 2, c, cy - th // 2 + th - 1], fill=fill)
    else:
        d.polygon(_polygon(shape, a, b, c, e), fill=fill)


def _background(rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
    h, w = cfg.image_size
    base = rng.uniform(70, 170, size=3)
    tint = rng.uniform(-25, 25, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(ang) * xx / w + np.sin(ang) * yy / h)[..., None]
    img = base + tint * grad
    if cfg.texture:
        kind = rng.integers(0, 3)
        amp = rng.uniform(6, 18)
        if kind == 0:  # stripes
            period = rng.uniform(6, 20)
            t = np.sin(2 * np.pi * (xx * np.cos(ang) + yy * np.sin(ang)) / period)
        elif kind == 1:  # checks
            s = int(rng.integers(6, 16))
            t = (((xx // s) + (yy // s)) % 2) * 2 - 1
        else:  # smooth blobs from a coarse random grid
            g = rng.standard_normal((h // 16 + 2, w // 16 + 2)).astype(np.float32)
            t = np.kron(g, np.ones((16, 16), np.float32))[:h, :w]
        img = img + amp * t[..., None]
    img = img + rng.normal(0, cfg.noise_std, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _overlap_ok(box, boxes, max_overlap):
    x1, y1, x2, y2 = box
    a = (x2 - x1) * (y2 - y1)
    for b in boxes:
        iw = min(x2, b[2]) - max(x1, b[0])
        ih = min(y2, b[3]) - max(y1, b[1])
        if iw > 0 and ih > 0:
            inter = iw * ih
            if inter > max_overlap * a or inter > max_overlap * (b[2] - b[0]) * (b[3] - b[1]):
                return False
    return True


def _size_word(frac: float, cfg: SyntheticConfig) -> str:
    lo, hi = cfg.min_size_frac, cfg.max_size_frac
    t = (frac - lo) / max(hi - lo, 1e-9)
    return "small" if t < 1 / 3 else ("large" if t > 2 / 3 else "medium")


def _phrases(objs: list[dict]) -> list[str | None]:
    """The shortest phrase that singles out each object among the image's objects (None if none does)."""
    out = []
    for i, o in enumerate(objs):
        phrase = None
        for keys in (("shape",), ("color", "shape"), ("size", "color", "shape")):
            same = [p for p in objs if all(p[k] == o[k] for k in keys)]
            if len(same) == 1:
                phrase = "the " + " ".join(o[k] for k in keys)
                break
        if phrase is None:  # same size, colour and shape: use position among those
            same = [p for p in objs if p["color"] == o["color"] and p["shape"] == o["shape"]]
            cx = [(p["box"][0] + p["box"][2]) / 2 for p in same]
            me = (o["box"][0] + o["box"][2]) / 2
            if me == min(cx) and cx.count(me) == 1:
                phrase = f"the leftmost {o['color']} {o['shape']}"
            elif me == max(cx) and cx.count(me) == 1:
                phrase = f"the rightmost {o['color']} {o['shape']}"
        out.append(phrase)
    return out


def make_image(rng: np.random.Generator, cfg: SyntheticConfig) -> tuple[np.ndarray, list[dict]]:
    """One image `[H, W, 3] uint8` and its objects: dicts with shape, color, size, box (pixels, continuous
    x1, y1, x2, y2; the full shape even where occluded) and phrase."""
    h, w = cfg.image_size
    img = Image.fromarray(_background(rng, cfg))
    d = ImageDraw.Draw(img)
    side = min(h, w)
    # Clutter first (below the objects): small muted marks and thin lines, never larger than the smallest object.
    for _ in range(int(rng.integers(0, cfg.clutter + 1))):
        col = tuple(int(v) for v in rng.uniform(40, 200, 3) * 0.6 + 60)
        s = int(rng.integers(2, max(3, int(side * cfg.min_size_frac * 0.5))))
        x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
        if rng.random() < 0.5:
            d.line([x, y, int(rng.integers(0, w)), int(rng.integers(0, h))], fill=col, width=1)
        else:
            d.ellipse([x, y, x + s, y + s], fill=col)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    objs, boxes = [], []
    for _ in range(n):
        cls = cfg.classes[int(rng.integers(len(cfg.classes)))]
        color = class_color(cfg, cls) if cfg.class_colors else list(PALETTE)[int(rng.integers(len(PALETTE)))]
        for _try in range(30):
            frac = rng.uniform(cfg.min_size_frac, cfg.max_size_frac)
            bw = int(round(side * frac * rng.uniform(0.85, 1.15)))
            bh = int(round(side * frac * rng.uniform(0.85, 1.15)))
            bw, bh = max(4, min(bw, w)), max(4, min(bh, h))
            x1, y1 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            box = (x1, y1, x1 + bw, y1 + bh)
            if _overlap_ok(box, boxes, cfg.max_overlap):
                break
        else:
            continue  # no room: fewer objects
        rgb = np.clip(np.asarray(PALETTE[color]) + rng.integers(-cfg.color_jitter, cfg.color_jitter + 1, 3), 0, 255)
        _draw_shape(d, cls, box, tuple(int(v) for v in rgb))
        boxes.append(box)
        objs.append({"shape": cls, "color": color, "size": _size_word(frac, cfg), "box": box})
    for o, p in zip(objs, _phrases(objs)):
        o["phrase"] = p
    return np.asarray(img), objs


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLIT_IDS.get(split, 3), int(index)])


def _record(name: str, objs: list[dict], cfg: SyntheticConfig, index: int, split: str) -> dict:
    h, w = cfg.image_size
    return {"images": [name], "width": w, "height": h,
            "objects": [{"desc": o["shape"], "bbox_2d": [float(v) for v in o["box"]]} for o in objs],
            "metadata": {"source": "synthetic", "split": split, "index": index,
                         "attributes": [{"color": o["color"], "size": o["size"], "phrase": o["phrase"]}
                                        for o in objs]}}


def grounding_records(det: dict) -> list[dict]:
    """One grounding record per object whose phrase is unique in its image (desc = the phrase)."""
    out = []
    for o, a in zip(det["objects"], det["metadata"]["attributes"]):
        if a["phrase"]:
            out.append({"images": det["images"], "width": det["width"], "height": det["height"], "task": "grounding",
                        "objects": [{"desc": a["phrase"], "bbox_2d": o["bbox_2d"]}],
                        "metadata": {"source": "synthetic", "of": det["metadata"]["index"]}})
    return out


def _gen_one(args):
    out_dir, split, seed, i, cfg = args
    arr, objs = make_image(image_rng(seed, split, i), cfg)
    name = f"images/{split}_{i:06d}.png"
    Image.fromarray(arr).save(os.path.join(out_dir, name), compress_level=1)
    return _record(name, objs, cfg, i, split)


def write_split(out_dir: str, split: str, num: int, seed: int, cfg: SyntheticConfig = SyntheticConfig(),
                workers: int = 0) -> dict:
    """Generates `num` images of `split` into `out_dir`; returns the paths written. Deterministic in `seed`."""
    from coordexp_jax.data import converters

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    jobs = [(out_dir, split, seed, i, cfg) for i in range(num)]
    if workers and workers > 1 and num >= 256:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            recs = pool.map(_gen_one, jobs, chunksize=64)
    else:
        recs = [_gen_one(j) for j in jobs]
    paths = {"jsonl": os.path.join(out_dir, f"{split}.jsonl"),
             "grounding": os.path.join(out_dir, f"{split}_grounding.jsonl"),
             "coco": os.path.join(out_dir, f"{split}_coco.json")}
    with open(paths["jsonl"], "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    with open(paths["grounding"], "w") as f:
        for r in recs:
            for g in grounding_records(r):
                f.write(json.dumps(g) + "\n")
    coco = converters.jsonl_dicts_to_coco(recs, categories=list(cfg.classes))
    with open(paths["coco"], "w") as f:
        json.dump(coco, f)
    return paths


def config_to_json(cfg: SyntheticConfig) -> dict:
    return dataclasses.asdict(cfg)


def ensure_dataset(out_dir: str, num_train: int, num_val: int, seed: int = 0,
                   cfg: SyntheticConfig = SyntheticConfig(), workers: int = 0) -> dict:
    """Generates the set once (first use) and reuses it when `out_dir/synthetic.json` matches the request."""
    meta = {"num_train": num_train, "num_val": num_val, "seed": seed, "config": config_to_json(cfg)}
    meta_path = os.path.join(out_dir, "synthetic.json")
    paths = {s: {"jsonl": os.path.join(out_dir, f"{s}.jsonl"), "grounding": os.path.join(out_dir, f"{s}_grounding.jsonl"),
                 "coco": os.path.join(out_dir, f"{s}_coco.json")} for s in ("train", "val")}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            have = json.load(f)
        want = json.loads(json.dumps(meta))
        if have == want:
            return paths
        # Never regenerate over an existing set: another run may be reading it (its records would then point at
        # images of another size), and the caller asked for this directory by name.
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if "config" in diff:
            hc, wc = have.get("config", {}), want["config"]
            diff = [k for k in diff if k != "config"] + [f"config.{k}" for k in sorted(set(hc) | set(wc))
                                                          if hc.get(k) != wc.get(k)]
        raise ValueError(f"{out_dir} holds a synthetic set generated with other settings ({', '.join(diff)}: "
                         f"{meta_path} has {[_get(have, k) for k in diff]}, asked {[_get(want, k) for k in diff]}); "
                         "point data.path at another directory or delete this one")
    paths["train"] = write_split(out_dir, "train", num_train, seed, cfg, workers)
    paths["val"] = write_split(out_dir, "val", num_val, seed, cfg, workers)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    return paths


def _get(meta: dict, dotted: str):
    for part in dotted.split("."):
        meta = meta.get(part) if isinstance(meta, dict) else None
    return meta


def parse_classes(s: str | Sequence[str]) -> tuple[str, ...]:
    return tuple(c.strip() for c in (s.split(",") if isinstance(s, str) else s) if c.strip())
