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
| coco_class | COCO instances JSON + one category (name or id) | counting, one record per image holding the category, objects with `bbox_2d` (centre = box centre) |
| omnicount | OmniCount-191: `<root>/<Scene>/<split>/_annotations.coco.json` (COCO, images beside it), or one such file | counting, one record per (image, class present) |
| hico | the HOI seed's simplified HICO-DET / SWIG-HOI benchmark JSON (`file_name`, `width`, `height`, `boxes`, `person_box_idx`/`object_box_idx`/`gt_action` or `action`/`object_category`/`gt_box_inds`) | HOI chat records (`data/hoi.py`): referring or grounding |

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

FORMATS = ("coco", "lvis", "odvg", "refcoco", "mmkd", "fsc147", "coco_class", "omnicount", "hico")


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


def _counting_objects(anns, name: str, path: str, report: ValidationReport, include_crowd: bool):
    """COCO annotations of one class on one image -> counting objects, or None when the record must be left out
    (counted): a crowd region (its instances are not counted) or a box with a negative side. A box with a zero
    side is an annotated instance all the same: it becomes a `point_2d` at its centre (counted)."""
    objs = []
    for i, a in anns:
        aw = f"{path}: annotations[{i}] (id {a.get('id')})"
        if a.get("iscrowd", 0) and not include_crowd:
            report.add("crowd", aw, f"iscrowd=1: the {name!r} count of image {a.get('image_id')} is unknown "
                                    f"(record left out)")
            return None
        x1, y1, x2, y2 = _xywh_to_xyxy(_need(a, "bbox", aw), aw)
        if x2 < x1 or y2 < y1:
            report.add("bad_box", aw, f"bbox {a['bbox']} has a negative width or height (record left out)")
            return None
        if x2 == x1 or y2 == y1:
            report.add("point_from_degenerate_box", aw, f"bbox {a['bbox']} has zero width or height (kept as a "
                                                        f"point)")
            objs.append({"desc": name, "point_2d": [(x1 + x2) / 2, (y1 + y2) / 2]})
        else:
            objs.append({"desc": name, "bbox_2d": [x1, y1, x2, y2]})
    return objs


def _coco_counting(path: str, images_dir: str, out_dir: str | None, report: ValidationReport, *, wanted,
                   meta: Mapping, include_crowd: bool, keep_empty: bool, rename=lambda n: n,
                   data=None) -> Iterator[dict]:
    """One counting record per (image, wanted class present) of a COCO instances file (`data`: its loaded JSON,
    else read from `path`). `wanted(cat_id, name)` selects the classes; with `keep_empty` (one wanted class only)
    images without it give a record with no objects and `metadata.class`."""
    data = _load_json(path) if data is None else data
    for k in ("images", "annotations", "categories"):
        _need(data, k, path)
    cats = {}
    for j, c in enumerate(data["categories"]):
        cw = f"{path}: categories[{j}]"
        cats[_need(c, "id", cw)] = rename(str(_need(c, "name", cw)).strip())
    chosen = {cid: n for cid, n in cats.items() if wanted(cid, n)}
    by_img = collections.defaultdict(lambda: collections.defaultdict(list))
    for i, a in enumerate(data["annotations"]):
        aw = f"{path}: annotations[{i}] (id {a.get('id') if isinstance(a, Mapping) else None})"
        cid = _need(a, "category_id", aw)
        if cid not in cats:
            raise ConversionError(f"{aw}: category_id {cid} is not in categories")
        if cid in chosen:
            by_img[_need(a, "image_id", aw)][cid].append((i, a))
    for j, im in enumerate(data["images"]):
        iid = _need(im, "id", f"{path}: images[{j}]")
        where = f"{path}: image {iid}"
        base = {"images": [_img_path(images_dir, _need(im, "file_name", where), out_dir)],
                "width": _int(im, "width", where), "height": _int(im, "height", where), "task": "counting"}
        present = by_img.get(iid, {})
        if not present:
            if keep_empty and len(chosen) == 1:
                (cid, name), = chosen.items()
                yield {**base, "objects": [], "metadata": {**meta, "image_id": iid, "class": name, "count": 0}}
            else:
                report.add("no_objects", where, "none of the counted classes (left out)")
            continue
        for cid in sorted(present, key=lambda c: chosen[c]):
            objs = _counting_objects(present[cid], chosen[cid], path, report, include_crowd)
            if objs is None:
                continue
            yield {**base, "objects": objs,
                   "metadata": {**meta, "image_id": iid, "class": chosen[cid], "count": len(objs)}}


def from_coco_class(path, images_dir, out_dir=None, report=None, category: str | int | None = None,
                    include_crowd: bool = False, keep_empty: bool = False) -> Iterator[dict]:
    """One class of a COCO instances JSON -> counting records: one per image holding the class, one object per
    instance (`bbox_2d`, so the counted centre is the box centre; a zero-size box becomes a `point_2d`, counted).

    `category`: the category name (exact) or id; ConversionError naming the file and the known names otherwise.
    Left out and counted: images without the class (`no_objects`; `keep_empty` keeps them as records with no
    objects and `metadata.class`), images with a crowd region of the class (`crowd`: the count is unknown;
    `include_crowd` counts the region as one object), images with a box of negative size (`bad_box`).
    """
    report = report if report is not None else ValidationReport()
    if category is None or (isinstance(category, str) and not category.strip()):
        raise ConversionError(f"{path}: coco_class needs a category (name or id)")
    data = _load_json(path)
    ids = {c.get("id"): str(c.get("name")) for c in _need(data, "categories", path) if isinstance(c, Mapping)}
    if isinstance(category, str) and category.strip().lstrip("-").isdigit() and category not in ids.values():
        category = int(category)
    if isinstance(category, int):
        if category not in ids:
            raise ConversionError(f"{path}: no category with id {category} (ids {sorted(ids)[:20]})")
        name = ids[category]
    else:
        if category not in ids.values():
            raise ConversionError(f"{path}: no category named {category!r} (known: {sorted(ids.values())[:30]})")
        name = category
    return _coco_counting(path, images_dir, out_dir, report, wanted=lambda cid, n: ids.get(cid) == name,
                          meta={"source": "coco_class"}, include_crowd=include_crowd, keep_empty=keep_empty,
                          data=data)


OMNICOUNT_ANNOTATIONS = "_annotations.coco.json"


def omnicount_files(root: str, split: str = "train", scenes: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(scene, annotation file) of an OmniCount-191 root: `<root>/<Scene>/<split>/_annotations.coco.json` for every
    scene folder that has one (or the `scenes` named, each required). ConversionError when none is found."""
    if scenes:
        out = []
        for sc in scenes:
            f = os.path.join(root, sc, split, OMNICOUNT_ANNOTATIONS)
            if not os.path.isfile(f):
                raise ConversionError(f"{f}: file not found (scene {sc!r}, split {split!r})")
            out.append((sc, f))
        return out
    out = [(sc, os.path.join(root, sc, split, OMNICOUNT_ANNOTATIONS)) for sc in sorted(os.listdir(root))]
    out = [(sc, f) for sc, f in out if os.path.isfile(f)]
    if not out:
        raise ConversionError(f"{root}: no <scene>/{split}/{OMNICOUNT_ANNOTATIONS} below it (is it the "
                              f"OmniCount-191 root, and does split {split!r} exist?)")
    return out


def from_omnicount(path, images_dir=None, out_dir=None, report=None, split: str | None = None,
                   scenes: Sequence[str] | None = None, classes: Sequence[str] | None = None,
                   include_crowd: bool = False) -> Iterator[dict]:
    """OmniCount-191 -> counting records, one per (image, class present), objects with `bbox_2d` (the counted centre
    is the box centre; a zero-size box becomes a `point_2d`, counted).

    Assumed layout (the released archive, as read by public loaders): one folder per scene (`Supermarket`, `Fruits`,
    `Urban`, `Wild`, `Satellite`, `Vegetables`, `Birds`, `Pets`, `Household`), each with split folders (`train`,
    `valid`/`test`) holding the images and a COCO instances file `_annotations.coco.json` (Roboflow export: `images`
    {id, file_name, width, height}, `annotations` {image_id, category_id, bbox [x, y, w, h] pixels, iscrowd},
    `categories` {id, name}; a category never used by an annotation, such as Roboflow's dataset-name category 0,
    gives no record). Several classes per image (multi-label): one record each.

    `path`: the root (with `split`, default "train", and optional `scenes`) or one `_annotations.coco.json`.
    `images_dir`: where the file names are relative to; None (the root form always): the annotation file's folder.
    `classes`: keep only these class names. `_` in class names becomes a space. Left out and counted as in
    `from_coco_class` (`crowd`, `bad_box`; images without a kept class: `no_objects`).
    """
    report = report if report is not None else ValidationReport()
    keep = None if not classes else {c.strip() for c in classes}
    if os.path.isdir(path):
        files = omnicount_files(path, split or "train", scenes)
        images_dir = None
    else:
        if not os.path.isfile(path):
            raise ConversionError(f"{path}: file not found")
        files = [(os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path)))), path)]

    def gen():
        for scene, f in files:
            yield from _coco_counting(
                f, images_dir or os.path.dirname(f), out_dir, report,
                wanted=lambda cid, n: keep is None or n in keep,
                meta={"source": "omnicount", "scene": scene, "split": os.path.basename(os.path.dirname(f))},
                include_crowd=include_crowd, keep_empty=False, rename=lambda n: n.replace("_", " "))
    return gen()


def _hico_box(sample: Mapping, idx: int, where: str) -> tuple[list[float], str]:
    """Box `idx` of a simplified HICO-DET sample: pixels from `boxes` (preferred), else 0..1000 from `boxes_1000`."""
    key = "boxes" if "boxes" in sample else "boxes_1000"
    bs = _need(sample, key, where)
    if not isinstance(bs, list) or not 0 <= idx < len(bs):
        raise ConversionError(f"{where}: box index {idx} is not in '{key}' ({len(bs) if isinstance(bs, list) else 0} "
                              "boxes)")
    return _floats(bs[idx], 4, where, f"{key}[{idx}]"), ("pixel" if key == "boxes" else "qwen1000")


def from_hico(path, images_dir, out_dir=None, report=None) -> Iterator[dict]:
    """The HOI seed's simplified HICO-DET (or SWIG-HOI) benchmark JSON (a list) -> HOI chat records (`data/hoi.py`).

    Referring samples (`person_box_idx`, `object_box_idx`, `gt_action`): "What is the person <box> doing with the
    object <box>?" -> the action phrase, with `refer_boxes`. Grounding samples (`action`, `object_category`,
    `gt_box_inds` alternating person, object): "Who is <action> <object>?" -> every pair as
    `<|object_ref_start|>person<|object_ref_end|><box><|object_ref_start|>object<|object_ref_end|><box>`.
    Boxes come from `boxes` (pixels, with `width`/`height`; written on the 0..1000 grid as q = round(1000 x / W),
    the continuous convention of `coord/codec.py`) or else `boxes_1000` (copied). A pre-built `query`/`response` is
    not used (its boxes are JSON text, not box tokens) but kept in metadata. A pair with a degenerate box is left
    out and counted (`degenerate_box`); a sample left with no pair is counted `no_objects`.
    """
    from coordexp_jax.coord import codec
    from coordexp_jax.data import hoi

    report = report if report is not None else ValidationReport()
    data = _load_json(path)
    if not isinstance(data, list):
        raise ConversionError(f"{path}: expected a JSON list of samples")
    for i, d in enumerate(data):
        where = f"{path}: [{i}]"
        name = _need(d, "file_name", where)
        w = _int(d, "width", where) if "boxes" in d else None
        h = _int(d, "height", where) if "boxes" in d else None

        def q(idx):
            b, unit = _hico_box(d, int(idx), where)
            if _degenerate(b):
                report.add("degenerate_box", where, f"box {idx} {b} has zero width or height (pair left out)")
                return None
            if unit == "pixel":
                return [int(v) for v in codec.px_to_qwen1000(np.asarray(b, np.float64), w, h)]
            if not all(0 <= v <= codec.QWEN_SCALE for v in b):
                raise ConversionError(f"{where}: boxes_1000[{idx}] {b} is outside 0..1000")
            return [int(round(v)) for v in b]

        def text(b):
            return hoi.format_box(np.asarray(b, np.float64) / codec.QWEN_SCALE)

        meta = {"source": "hico", "index": i, "file_name": name}
        meta.update({k: d[k] for k in ("query", "response", "hoi_id", "image_id") if k in d})
        base = {"images": [_img_path(images_dir, name, out_dir)], "metadata": meta}
        if w is not None:
            base["image_sizes"] = [[w, h]]
        if "gt_action" in d or "person_box_idx" in d:
            p, o = q(d.get("person_box_idx", 0)), q(d.get("object_box_idx", 1))
            if p is None or o is None:
                continue
            action = str(_need(d, "gt_action", where)).strip()
            if not action:
                raise ConversionError(f"{where}: empty 'gt_action'")
            yield {**base, "task_type": "referring", "refer_boxes": [p, o],
                   "messages": [{"role": "user", "content": f"{hoi.IMAGE_PLACEHOLDER}What is the person {text(p)} "
                                                            f"doing with the object {text(o)}?"},
                                {"role": "assistant", "content": action}],
                   "metadata": {**meta, "action": action}}
        elif "action" in d:
            action, obj = str(d["action"]).strip(), str(d.get("object_category", "object")).strip()
            inds = d.get("gt_box_inds")
            if inds is None:
                n = len(_need(d, "boxes" if "boxes" in d else "boxes_1000", where))
                inds = list(range(n))
            if not isinstance(inds, list) or len(inds) % 2:
                raise ConversionError(f"{where}: 'gt_box_inds' must list (person, object) index pairs, "
                                      f"got {inds!r}"[:300])
            answer = []
            for k in range(0, len(inds), 2):
                p, o = q(inds[k]), q(inds[k + 1])
                if p is None or o is None:
                    continue
                answer.append(f"{hoi.REF_START}person{hoi.REF_END}{text(p)}{hoi.REF_START}{obj}{hoi.REF_END}{text(o)}")
            if not answer:
                report.add("no_objects", where, "no pair left")
                continue
            yield {**base, "task_type": "grounding",
                   "messages": [{"role": "user", "content": f"{hoi.IMAGE_PLACEHOLDER}Who is {action} {obj}?"},
                                {"role": "assistant", "content": "".join(answer)}],
                   "metadata": {**meta, "action": action, "object": obj, "num_pairs": len(answer)}}
        else:
            raise ConversionError(f"{where}: neither a referring sample ('gt_action') nor a grounding one ('action')")


CONVERTERS = {"coco": from_coco, "lvis": from_lvis, "odvg": from_odvg, "refcoco": from_refcoco, "mmkd": from_mmkd,
              "fsc147": from_fsc147, "coco_class": from_coco_class, "omnicount": from_omnicount, "hico": from_hico}
HOI_FORMATS = ("hico",)  # formats whose output is HOI chat records (read back with data/hoi.py)


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
