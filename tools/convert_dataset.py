"""Converts annotations to the JSONL record contract, or JSONL back to COCO JSON.

  python tools/convert_dataset.py --format coco --input instances_val2017.json --images val2017 --out val.jsonl
  python tools/convert_dataset.py --format jsonl2coco --input val.jsonl --out val_coco.json

  python tools/convert_dataset.py --format coco_class --category cup --input instances_val2017.json \
      --images val2017 --out cups.jsonl
  python tools/convert_dataset.py --format omnicount --input OmniCount-191 --split train --scenes Fruits,Urban \
      --out omnicount_train.jsonl

Formats: coco, lvis, odvg, refcoco (--instances, --split), mmkd, fsc147 (--classes), coco_class (--category,
--keep_empty), omnicount (--split, --scenes, --classes; --images optional), hico (HOI chat records), jsonl2coco.
Every output line is validated as the contract reads it back and the per-reason counts are printed. The output
is written atomically: on an error (a truncated input, a record the contract refuses), or when no record passes
validation, nothing is written (a previous file is kept) and the exit code is 2.
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coordexp_jax.cli import ArgumentParser, guard  # noqa: E402
from coordexp_jax.data import converters, records  # noqa: E402
from coordexp_jax.errors import CoordExpError  # noqa: E402


# the policy the output is read back with: a record the contract would refuse for a size or box mismatch is
# counted (training decides with its own policy); any other contract violation stops the conversion
READBACK_POLICY = {"size_mismatch": "skip", "degenerate_box": "skip"}


def write_validated(dicts, out: str, check_images: str, report: records.ValidationReport,
                    parse=records.parse_record) -> int:
    """Writes contract dicts to `out` as JSONL, validating each line as `records.read_jsonl` would read it back
    (messages name `out:line`). Atomic: on any error, or when no record passes validation, `out` is left as it was
    (absent, or its previous content) and `ConversionError` / `RecordError` is raised."""
    out_dir = os.path.dirname(os.path.abspath(out))
    n = 0
    with records.atomic_write(out) as f:
        for d in dicts:
            line = json.dumps(d, ensure_ascii=False)
            n += 1
            parse(json.loads(line), where=f"{out}:{n}", image_root=out_dir, check_images=check_images,
                  policy=READBACK_POLICY, report=report)
            f.write(line + "\n")
        if report.records_kept == 0:
            raise converters.ConversionError(
                f"{out}: no record passed validation ({'the input has no records' if n == 0 else report.one_line()});"
                f" nothing written")
    return n


@guard
def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", required=True, choices=list(converters.FORMATS) + ["jsonl2coco"])
    p.add_argument("--input", required=True, help="annotation file (JSON / JSONL)")
    p.add_argument("--images", help="image directory (required except for jsonl2coco)")
    p.add_argument("--out", required=True, help="output .jsonl (or .json for jsonl2coco); written atomically")
    p.add_argument("--instances", help="refcoco: COCO instances JSON (default: instances.json next to --input)")
    p.add_argument("--split", help="refcoco: keep only refs of this split (train/val/testA/...); omnicount: the split "
                                   "folder read under each scene (default train)")
    p.add_argument("--classes", help="fsc147: ImageClasses_FSC147.txt; omnicount: comma-separated class names to keep")
    p.add_argument("--category", help="coco_class: the category counted (name or id)")
    p.add_argument("--scenes", help="omnicount: comma-separated scene folders (default: every one with the split)")
    p.add_argument("--keep_empty", action="store_true",
                   help="coco_class: keep images without the category (records with no objects)")
    p.add_argument("--label_map", help="odvg: JSON {label: name} for instances without 'category'")
    p.add_argument("--categories", help="jsonl2coco: comma-separated category order (default: sorted descs)")
    p.add_argument("--check_images", default="header", choices=records.CHECK_IMAGES,
                   help="how the written JSONL's images are checked when it is read back")
    p.add_argument("--include_crowd", action="store_true", help="coco/lvis: keep iscrowd=1 boxes")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not os.path.exists(a.input):
        p.error(f"--input {a.input}: file not found")
    try:
        if a.format == "jsonl2coco":
            recs, report = records.read_jsonl(a.input, check_images=a.check_images)
            if not recs:
                raise converters.ConversionError(f"{a.input}: no record passed validation ({report.one_line()}); "
                                                 f"nothing written")
            cats = a.categories.split(",") if a.categories else None
            coco = converters.records_to_coco(recs, cats, image_root=os.path.dirname(os.path.abspath(a.input)))
            with records.atomic_write(a.out) as f:
                json.dump(coco, f)
            print(f"{len(coco['images'])} images, {len(coco['annotations'])} boxes, "
                  f"{len(coco['categories'])} categories -> {a.out}")
            print(report.summary())
            return 0
        if a.format == "omnicount" and not a.images:  # images lie beside each annotation file
            a.images = a.input if os.path.isdir(a.input) else os.path.dirname(os.path.abspath(a.input))
        if not a.images or not os.path.isdir(a.images):
            p.error(f"--images {a.images}: not a directory")
        kw = {}
        if a.format == "refcoco":
            kw = {"instances": a.instances, "split": a.split}
        elif a.format == "fsc147":
            kw = {"classes": a.classes}
        elif a.format == "odvg" and a.label_map:
            with open(a.label_map) as f:
                kw = {"label_map": json.load(f)}
        elif a.format in ("coco", "lvis"):
            kw = {"include_crowd": a.include_crowd}
        elif a.format == "coco_class":
            kw = {"category": a.category, "include_crowd": a.include_crowd, "keep_empty": a.keep_empty}
        elif a.format == "omnicount":
            split = lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None  # noqa: E731
            kw = {"split": a.split, "scenes": split(a.scenes), "classes": split(a.classes),
                  "include_crowd": a.include_crowd}
        conv_report = records.ValidationReport()
        out_dir = os.path.dirname(os.path.abspath(a.out))
        report = records.ValidationReport()
        parse = records.parse_record
        if a.format in converters.HOI_FORMATS:  # HOI chat records: read back as data/hoi.py reads them
            from coordexp_jax.data.hoi import parse_hoi_record as parse
        n = write_validated(converters.convert(a.format, a.input, a.images, out_dir, conv_report, **kw), a.out,
                            a.check_images, report, parse)
        print(f"{n} records -> {a.out}")
        if conv_report.counts:
            print("left out during conversion:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(conv_report.counts.items())))
        print("validation of the output:\n" + report.summary())
        return 0
    except (CoordExpError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
