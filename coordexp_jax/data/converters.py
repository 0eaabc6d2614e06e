"""Converters from public annotation formats to the JSONL record contract (`records.py`), and back to COCO JSON.

Every `from_*` function yields contract dicts with **pixel** boxes `[x1, y1, x2, y2]` (continuous COCO
convention) and image paths relative to `out_dir` when given (so the JSONL resolves its images from its own
directory), and counts what it leaves out in a `ValidationReport` (`crowd`, `degenerate_box`, ...). Nothing is
changed silently: boxes are copied as they are (xywh -> xyxy is the only arithmetic); validation of the output
(`records.read_jsonl`) applies the contract's policy.

| format | input | records |
|---|---|---|
| coco | instances JSON (`images`, `annotations` with xywh `bbox`, `categories`) | detection, desc = category name |
| lvis | LVIS JSON (like COCO; file name from `coco_url`) | detection; `neg_category_ids`/`not_exhaustive_category_ids` as names in metadata; `_` in names -> space |
| odvg | ODVG JSONL (`filename`, `height`, `width`, `detection.instances[{bbox, label, category}]` or `grounding.regions[{bbox, phrase}]`) | detection / one grounding record per phrase |
| refcoco | refs JSON (`ref_id`, `ann_id`, `image_id`, `split`, `sentences[{sent}]`) + COCO instances JSON | one grounding record per sentence |
| mmkd | MMKD-RL-Grounding JSON list (`image_path`, `height`, `width`, `instruction`, `abs_box {tag: [[x1,y1,x2,y2], ...]}` or `bbox`) | grounding, prompt = instruction, desc = tag ("object" for single `bbox`) |
| fsc147 | FSC-147 annotation JSON (`{"img.jpg": {"points": [[x, y]], "box_examples_coordinates": ...}}`) + optional class file | counting, objects with `point_2d` |

`records_to_coco` writes COCO instances JSON from validated records for evaluation (pycocotools loads it).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from coordexp_jax.errors import CoordExpError
from coordexp_jax.data import image as image_lib
from coordexp_jax.data.records import Record, ValidationReport, json_lines, parse_record

FORMATS = ("coco", "lvis", "odvg", "refcoco", "mmkd", "fsc147")


class ConversionError(CoordExpError, ValueError):
    """The input does not have the structure of its format; the message names the file and the key."""


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None


def _need(d: Mapping, key: str, where: str):
    if not isinstance(d, Mapping) or key not in d:
        raise ConversionError(f"{where}: missing key {key!r}")
    return d[key]


def _int(d: Mapping, key: str, where: str) -> int:
    """`d[key]` as an int (an integral number or numeric string); ConversionError naming `where` and the key."""
    v = _need(d, key, where)
    try:
        f = float(v)
        if isinstance(v, bool) or not f.is_integer():
            raise ValueError
        return int(f)
    except (TypeError, ValueError):
        raise ConversionError(f"{where}: {key!r} must be an integer, got {v!r}") from None


def _floats(v, n: int, where: str, what: str) -> list[float]:
    """`v` as a list of `n` floats; ConversionError naming `where` otherwise."""
    try:
        if isinstance(v, (str, bytes)) or len(v) != n:
            raise ValueError
        return [float(x) for x in v]
    except (TypeError, ValueError):
        raise ConversionError(f"{where}: {what} must be {n} numbers, got {v!r}"[:300]) from None


def _img_path(images_dir: str, name: str, out_dir: str | None) -> str:
    p = os.path.join(images_dir, name)
    return os.path.relpath(p, out_dir) if out_dir else p


def _xywh_to_xyxy(b, where: str):
    if not isinstance(b, (list, tuple)):
        raise ConversionError(f"{where}: bbox must be [x, y, w, h], got {b!r}"[:300])
    x, y, w, h = _floats(b, 4, where, "bbox [x, y, w, h]")
    return [x, y, x + w, y + h]


def _degenerate(b) -> bool:
    return not (b[2] > b[0] and b[3] > b[1])


def _coco_like(path: str, images_dir: str, out_dir: str | None, report: ValidationReport, *, lvis: bool,
               include_crowd: bool = False, keep_empty: bool = True) -> Iterator[dict]:
    data = _load_json(path)
    for k in ("images", "annotations", "categories"):
        _need(data, k, path)
    cats = {}
    for c in data["categories"]:
        name = str(_need(c, "name", f"{path}: categories[]"))
        cats[c["id"]] = name.replace("_", " ") if lvis else name
    by_img = collections.defaultdict(list)
    for i, a in enumerate(data["annotations"]):
        by_img[_need(a, "image_id", f"{path}: annotations[{i}]")].append((i, a))
    for im in data["images"]:
        iid = _need(im, "id", f"{path}: images[]")
        where = f"{path}: image {iid}"
        if lvis and "file_name" not in im:
            name = os.path.basename(_need(im, "coco_url", where))
        else:
            name = _need(im, "file_name", where)
        objs = []
        for i, a in by_img.get(iid, []):
            aw = f"{path}: annotations[{i}] (id {a.get('id')})"
            if a.get("iscrowd", 0) and not include_crowd:
                report.add("crowd", aw, "iscrowd=1 left out")
                continue
            box = _xywh_to_xyxy(_need(a, "bbox", aw), aw)
            if _degenerate(box):
                report.add("degenerate_box", aw, f"bbox {a['bbox']} has zero width or height (left out)")
                continue
            cid = _need(a, "category_id", aw)
            if cid not in cats:
                raise ConversionError(f"{aw}: category_id {cid} is not in categories")
            objs.append({"desc": cats[cid], "bbox_2d": box})
        if not objs and not keep_empty:
            report.add("no_objects", where, "left out")
            continue
        meta = {"source": "lvis" if lvis else "coco", "image_id": iid}
        if lvis:
            for k in ("neg_category_ids", "not_exhaustive_category_ids"):
                if k in im:
                    meta[k.replace("_ids", "")] = [cats[c] for c in im[k] if c in cats]
        yield {"images": [_img_path(images_dir, name, out_dir)], "width": _int(im, "width", where),
               "height": _int(im, "height", where), "objects": objs, "metadata": meta}


def from_coco(path, images_dir, out_dir=None, report=None, **kw) -> Iterator[dict]:
    """COCO instances JSON -> detection records (crowd annotations and zero-area boxes left out, counted)."""
    return _coco_like(path, images_dir, out_dir, report if report is not None else ValidationReport(), lvis=False, **kw)


def from_lvis(path, images_dir, out_dir=None, report=None, **kw) -> Iterator[dict]:
    """LVIS JSON -> detection records (see the module table)."""
    return _coco_like(path, images_dir, out_dir, report if report is not None else ValidationReport(), lvis=True, **kw)


def _boxes(b, where):
    """A box [x1,y1,x2,y2] or a list of them -> list of boxes."""
    if isinstance(b, (list, tuple)) and b and isinstance(b[0], (list, tuple)):
        return [_floats(x, 4, where, "each bbox [x1, y1, x2, y2]") for x in b]
    if isinstance(b, (list, tuple)):
        return [_floats(b, 4, where, "bbox [x1, y1, x2, y2] (or a list of them)")]
    raise ConversionError(f"{where}: bbox must be [x1, y1, x2, y2] or a list of them, got {b!r}"[:300])


def from_odvg(path, images_dir, out_dir=None, report=None, label_map: Mapping | None = None) -> Iterator[dict]:
    """ODVG JSONL -> detection records (`detection`) or grounding records (`grounding`, one per phrase)."""
    report = report if report is not None else ValidationReport()
    for lineno, where, d in json_lines(path):
        if isinstance(d, json.JSONDecodeError):
            raise ConversionError(f"{where}: not valid JSON ({d.msg})") from None
        base = {"images": [_img_path(images_dir, _need(d, "filename", where), out_dir)],
                "width": _int(d, "width", where), "height": _int(d, "height", where)}
        if "detection" in d:
            objs = []
            for j, inst in enumerate(_need(d["detection"], "instances", where)):
                iw = f"{where}: instances[{j}]"
                name = inst.get("category")
                if name is None:
                    lab = _need(inst, "label", iw)
                    if label_map is None or str(lab) not in label_map:
                        raise ConversionError(f"{iw}: no 'category' and label {lab} not in the label map")
                    name = label_map[str(lab)]
                for b in _boxes(_need(inst, "bbox", iw), iw):
                    if _degenerate(b):
                        report.add("degenerate_box", iw, f"bbox {b} left out")
                        continue
                    objs.append({"desc": str(name), "bbox_2d": b})
            yield {**base, "objects": objs, "metadata": {"source": "odvg", "line": lineno}}
        elif "grounding" in d:
            g = d["grounding"]
            phrases = collections.OrderedDict()
            for j, reg in enumerate(_need(g, "regions", where)):
                rw = f"{where}: regions[{j}]"
                phrase = str(_need(reg, "phrase", rw))
                for b in _boxes(_need(reg, "bbox", rw), rw):
                    if _degenerate(b):
                        report.add("degenerate_box", rw, f"bbox {b} left out")
                        continue
                    phrases.setdefault(phrase, []).append(b)
            for phrase, bs in phrases.items():
                yield {**base, "task": "grounding", "objects": [{"desc": phrase, "bbox_2d": b} for b in bs],
                       "metadata": {"source": "odvg", "line": lineno, "caption": g.get("caption")}}
        else:
            raise ConversionError(f"{where}: neither 'detection' nor 'grounding'")


def from_refcoco(path, images_dir, out_dir=None, report=None, instances: str | None = None,
                 split: str | None = None) -> Iterator[dict]:
    """RefCOCO/+/g refs JSON + COCO instances JSON -> one grounding record per referring sentence."""
    report = report if report is not None else ValidationReport()
    instances = instances or os.path.join(os.path.dirname(path), "instances.json")
    refs, inst = _load_json(path), _load_json(instances)
    if not isinstance(refs, list):
        raise ConversionError(f"{path}: refs must be a JSON list")
    images = {im["id"]: im for im in _need(inst, "images", instances)}
    anns = {a["id"]: a for a in _need(inst, "annotations", instances)}
    for i, r in enumerate(refs):
        where = f"{path}: refs[{i}] (ref_id {r.get('ref_id')})"
        if split is not None and r.get("split") != split:
            continue
        ann = anns.get(_need(r, "ann_id", where))
        im = images.get(_need(r, "image_id", where))
        if ann is None or im is None:
            raise ConversionError(f"{where}: ann_id/image_id not found in {instances}")
        box = _xywh_to_xyxy(_need(ann, "bbox", f"{instances}: annotation {r.get('ann_id')}"), where)
        if _degenerate(box):
            report.add("degenerate_box", where, f"bbox {ann['bbox']} left out")
            continue
        for s in _need(r, "sentences", where):
            sent = str(s["sent"] if isinstance(s, Mapping) else s).strip()
            if not sent:
                report.add("empty_sentence", where)
                continue
            iw = f"{instances}: image {r.get('image_id')}"
            yield {"images": [_img_path(images_dir, _need(im, "file_name", iw), out_dir)],
                   "width": _int(im, "width", iw), "height": _int(im, "height", iw),
                   "task": "grounding", "objects": [{"desc": sent, "bbox_2d": box}],
                   "metadata": {"source": "refcoco", "ref_id": r.get("ref_id"), "split": r.get("split")}}


def from_mmkd(path, images_dir, out_dir=None, report=None) -> Iterator[dict]:
    """MMKD-RL-Grounding JSON (a list) -> grounding records: `abs_box` {tag: boxes} (desc = tag, empty tags
    omitted) or a single `bbox` (desc "object"); prompt = `instruction`."""
    report = report if report is not None else ValidationReport()
    data = _load_json(path)
    if not isinstance(data, list):
        raise ConversionError(f"{path}: expected a JSON list of samples")
    for i, d in enumerate(data):
        where = f"{path}: [{i}]"
        objs = []
        if "abs_box" in d:
            if not isinstance(d["abs_box"], Mapping):
                raise ConversionError(f"{where}: abs_box must map class tags to box lists")
            for tag, bs in d["abs_box"].items():
                for b in (_boxes(bs, f"{where}: abs_box[{tag!r}]") if bs else []):
                    if _degenerate(b):
                        report.add("degenerate_box", where, f"abs_box[{tag!r}] {b} left out")
                        continue
                    objs.append({"desc": str(tag), "bbox_2d": b})
        elif "bbox" in d:
            for b in _boxes(d["bbox"], f"{where}: bbox"):
                if _degenerate(b):
                    report.add("degenerate_box", where, f"bbox {b} left out")
                    continue
                objs.append({"desc": "object", "bbox_2d": b})
        else:
            raise ConversionError(f"{where}: neither 'abs_box' nor 'bbox'")
        rec = {"images": [_img_path(images_dir, _need(d, "image_path", where), out_dir)],
               "width": _int(d, "width", where), "height": _int(d, "height", where),
               "task": "grounding", "objects": objs, "metadata": {"source": "mmkd", "index": i}}
        if d.get("instruction"):
            rec["prompt"] = str(d["instruction"])
        yield rec


def from_fsc147(path, images_dir, out_dir=None, report=None, classes: str | None = None) -> Iterator[dict]:
    """FSC-147 annotation JSON -> counting records with one `point_2d` object per annotated point.

    `classes`: the `ImageClasses_FSC147.txt` file (`name<TAB>class` per line); without it desc is "object".
    Width/height come from `W`/`H` when present, else from the image header. Exemplar boxes (4 corners each)
    go to metadata as pixel `[x1, y1, x2, y2]`.
    """
    report = report if report is not None else ValidationReport()
    data = _load_json(path)
    names = {}
    if classes:
        with open(classes, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    k, _, v = line.rstrip("\n").partition("\t")
                    names[k.strip()] = v.strip()
    for fname, a in data.items():
        where = f"{path}: {fname!r}"
        pts = _need(a, "points", where)
        if "W" in a and "H" in a:
            w, h = _int(a, "W", where), _int(a, "H", where)
        else:
            try:
                w, h = image_lib.read_image_size(os.path.join(images_dir, fname))
            except image_lib.ImageLoadError as e:
                report.add("unreadable_image", where, str(e))
                continue
        ex = []
        for q in a.get("box_examples_coordinates", []):
            try:
                q = np.asarray(q, np.float64).reshape(-1, 2)
            except (TypeError, ValueError):
                raise ConversionError(f"{where}: box_examples_coordinates must be lists of [x, y] corners, "
                                      f"got {q!r}"[:300]) from None
            ex.append([float(q[:, 0].min()), float(q[:, 1].min()), float(q[:, 0].max()), float(q[:, 1].max())])
        desc = names.get(fname, "object")
        points = [_floats(p, 2, where, "each point [x, y]") for p in pts]
        yield {"images": [_img_path(images_dir, fname, out_dir)], "width": w, "height": h, "task": "counting",
               "objects": [{"desc": desc, "point_2d": p} for p in points],
               "metadata": {"source": "fsc147", "count": len(pts), "exemplars": ex}}


CONVERTERS = {"coco": from_coco, "lvis": from_lvis, "odvg": from_odvg, "refcoco": from_refcoco, "mmkd": from_mmkd,
              "fsc147": from_fsc147}


def convert(fmt: str, path: str, images_dir: str, out_dir: str | None = None, report: ValidationReport | None = None,
            **kw) -> Iterator[dict]:
    if fmt not in CONVERTERS:
        raise ConversionError(f"unknown format {fmt!r}; known: {sorted(CONVERTERS)}")
    return CONVERTERS[fmt](path, images_dir, out_dir, report if report is not None else ValidationReport(), **kw)


def records_to_coco(records: Sequence[Record], categories: Sequence[str] | None = None,
                    image_root: str | None = None, pixel_mode: str = "continuous") -> dict:
    """Validated records -> COCO instances dict (image ids 1.., annotation ids 1.., category ids 1.. in the order
    of `categories`, default sorted descs). Objects without a box are left out. Boxes are xywh in pixels."""
    if categories is None:
        categories = sorted({o.desc for r in records for o in r.objects if o.box is not None})
    cat_id = {c: i + 1 for i, c in enumerate(categories)}
    images, anns = [], []
    for i, r in enumerate(records, 1):
        fn = os.path.relpath(r.image, image_root) if image_root else r.image
        images.append({"id": i, "file_name": fn, "width": r.width, "height": r.height})
        boxed = [o for o in r.objects if o.box is not None]
        if not boxed:
            continue
        px = r.boxes_px(pixel_mode)
        for o, b in zip(boxed, px):
            if o.desc not in cat_id:
                raise ConversionError(f"{r.source}: desc {o.desc!r} is not one of the categories "
                                      f"{list(categories)[:10]}")
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat_id[o.desc],
                         "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h, "iscrowd": 0})
    return {"info": {"description": "coordexp_jax records"}, "images": images, "annotations": anns,
            "categories": [{"id": cat_id[c], "name": c} for c in categories]}


def jsonl_dicts_to_coco(dicts: Iterable[Mapping], categories: Sequence[str] | None = None, **kw) -> dict:
    """Contract dicts (e.g. from a generator) -> COCO dict, validating each (no image checks; errors raise)."""
    recs = [parse_record(d, where=f"<record {i}>", check_images="none") for i, d in enumerate(dicts)]
    return records_to_coco([r for r in recs if r is not None], categories, **kw)
