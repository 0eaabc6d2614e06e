"""Converters: hypothesis property for COCO -> JSONL -> COCO (pycocotools loads it), and each other format."""
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from coordexp_jax.data import converters as C
from coordexp_jax.data import records as R


@st.composite
def coco_dicts(draw):
    ncat = draw(st.integers(1, 4))
    cats = [{"id": 10 + i, "name": f"cat_{i}"} for i in range(ncat)]
    images, anns = [], []
    for i in range(draw(st.integers(1, 4))):
        w, h = draw(st.integers(8, 500)), draw(st.integers(8, 500))
        images.append({"id": 100 + i, "file_name": f"im{i}.jpg", "width": w, "height": h})
        for _ in range(draw(st.integers(0, 4))):
            x, y = draw(st.floats(0, w - 1)), draw(st.floats(0, h - 1))
            bw = draw(st.one_of(st.just(0.0), st.floats(0.01, w - x)))
            bh = draw(st.floats(0.01, h - y))
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": 10 + draw(st.integers(0, ncat - 1)),
                         "bbox": [x, y, bw, bh], "iscrowd": int(draw(st.integers(0, 5)) == 0), "area": bw * bh})
    return {"images": images, "annotations": anns, "categories": cats}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(coco_dicts())
def test_property_coco_round_trip(tmp_path, coco):
    from pycocotools.coco import COCO

    p = tmp_path / "inst.json"
    p.write_text(json.dumps(coco))
    rep = R.ValidationReport()
    dicts = list(C.from_coco(str(p), "imgs", None, rep))
    assert len(dicts) == len(coco["images"])
    kept = [a for a in coco["annotations"] if not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0]
    assert sum(len(d["objects"]) for d in dicts) == len(kept)
    assert rep.counts["crowd"] == sum(a["iscrowd"] for a in coco["annotations"])
    assert rep.counts["crowd"] + rep.counts["degenerate_box"] + len(kept) == len(coco["annotations"])
    recs = [R.parse_record(d, check_images="none") for d in dicts]
    assert all(r is not None for r in recs)  # a converter never emits something validation rejects
    out = C.records_to_coco(recs, categories=[c["name"] for c in coco["categories"]])
    back = tmp_path / "back.json"
    back.write_text(json.dumps(out))
    api = COCO(str(back))
    assert len(api.getImgIds()) == len(coco["images"])
    got = sorted((api.imgs[a["image_id"]]["file_name"], a["category_id"], *a["bbox"]) for a in out["annotations"])
    fname = {im["id"]: "imgs/" + im["file_name"] for im in coco["images"]}
    want = sorted((fname[a["image_id"]], a["category_id"] - 9, *a["bbox"]) for a in kept)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g[:2] == w[:2]
        np.testing.assert_allclose(g[2:], w[2:], rtol=1e-9, atol=1e-9)


def test_lvis_names_and_negatives(tmp_path):
    lv = {"images": [{"id": 1, "coco_url": "http://images.cocodataset.org/val2017/000000000139.jpg", "width": 50,
                      "height": 40, "neg_category_ids": [2], "not_exhaustive_category_ids": []}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 20]}],
          "categories": [{"id": 1, "name": "baseball_bat"}, {"id": 2, "name": "zebra"}]}
    (tmp_path / "lvis.json").write_text(json.dumps(lv))
    [d] = C.from_lvis(str(tmp_path / "lvis.json"), "val2017")
    assert d["images"] == ["val2017/000000000139.jpg"]
    assert d["objects"] == [{"desc": "baseball bat", "bbox_2d": [1.0, 2.0, 11.0, 22.0]}]
    assert d["metadata"]["neg_category"] == ["zebra"]


def test_odvg_detection_and_grounding(tmp_path):
    lines = [{"filename": "a.jpg", "height": 100, "width": 200,
              "detection": {"instances": [{"bbox": [1, 2, 30, 40], "label": 0, "category": "dog"},
                                          {"bbox": [5, 5, 5, 9], "label": 1}]}},
             {"filename": "b.jpg", "height": 100, "width": 200,
              "grounding": {"caption": "a dog and two cats", "regions": [
                  {"bbox": [1, 2, 3, 4], "phrase": "a dog"}, {"bbox": [[10, 10, 20, 20], [30, 30, 40, 45]],
                                                              "phrase": "two cats"}]}}]
    (tmp_path / "o.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    rep = R.ValidationReport()
    out = list(C.from_odvg(str(tmp_path / "o.jsonl"), "img", None, rep, label_map={"1": "cat"}))
    assert out[0]["objects"] == [{"desc": "dog", "bbox_2d": [1.0, 2.0, 30.0, 40.0]}]
    assert rep.counts["degenerate_box"] == 1
    assert [(o["task"], [b["desc"] for b in o["objects"]]) for o in out[1:]] == [
        ("grounding", ["a dog"]), ("grounding", ["two cats", "two cats"])]
    with pytest.raises(C.ConversionError, match=r"o2\.jsonl:1: instances\[0\]: no 'category' and label 3"):
        (tmp_path / "o2.jsonl").write_text(json.dumps({"filename": "a", "height": 1, "width": 1, "detection": {
            "instances": [{"bbox": [0, 0, 1, 1], "label": 3}]}}))
        list(C.from_odvg(str(tmp_path / "o2.jsonl"), "img"))


def test_refcoco(tmp_path):
    inst = {"images": [{"id": 7, "file_name": "COCO_train2014_000000000007.jpg", "width": 300, "height": 200}],
            "annotations": [{"id": 70, "image_id": 7, "category_id": 1, "bbox": [10, 20, 30, 40]}],
            "categories": [{"id": 1, "name": "person"}]}
    refs = [{"ref_id": 0, "ann_id": 70, "image_id": 7, "split": "val",
             "sentences": [{"sent": "man on the left"}, {"sent": "guy in red"}]},
            {"ref_id": 1, "ann_id": 70, "image_id": 7, "split": "train", "sentences": [{"sent": "x"}]}]
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    out = list(C.from_refcoco(str(tmp_path / "refs.json"), "train2014", split="val"))
    assert [o["objects"] for o in out] == [[{"desc": "man on the left", "bbox_2d": [10.0, 20.0, 40.0, 60.0]}],
                                           [{"desc": "guy in red", "bbox_2d": [10.0, 20.0, 40.0, 60.0]}]]
    assert all(o["task"] == "grounding" for o in out)


def test_mmkd_multi_and_single(tmp_path):
    data = [{"image_path": "345.jpg", "height": 720, "width": 1280, "instruction": "Draw boxes, tags 0..3",
             "abs_box": {"0": [[456, 337, 725, 557]], "1": [], "2": [[849, 407, 961, 482], [965, 480, 1099, 550]],
                         "3": []}},
            {"image_path": "APP.png", "height": 1080, "width": 1920, "instruction": "find the button",
             "bbox": [850, 720, 1070, 780]}]
    (tmp_path / "m.json").write_text(json.dumps(data))
    a, b = C.from_mmkd(str(tmp_path / "m.json"), "imgs")
    assert [(o["desc"], o["bbox_2d"]) for o in a["objects"]] == [
        ("0", [456.0, 337.0, 725.0, 557.0]), ("2", [849.0, 407.0, 961.0, 482.0]), ("2", [965.0, 480.0, 1099.0, 550.0])]
    assert a["prompt"] == "Draw boxes, tags 0..3" and a["task"] == "grounding"
    assert b["objects"] == [{"desc": "object", "bbox_2d": [850.0, 720.0, 1070.0, 780.0]}]
    assert R.parse_record(a, check_images="none") is not None


def test_fsc147_points(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "2.jpg")
    ann = {"2.jpg": {"points": [[10.5, 20.0], [30, 40]],
                     "box_examples_coordinates": [[[1, 2], [1, 8], [9, 8], [9, 2]]]}}
    (tmp_path / "a.json").write_text(json.dumps(ann))
    (tmp_path / "cls.txt").write_text("2.jpg\tsea shells\n")
    [d] = C.from_fsc147(str(tmp_path / "a.json"), str(tmp_path), None, classes=str(tmp_path / "cls.txt"))
    assert (d["width"], d["height"], d["task"]) == (64, 48, "counting")
    assert d["objects"] == [{"desc": "sea shells", "point_2d": [10.5, 20.0]}, {"desc": "sea shells", "point_2d": [30.0, 40.0]}]
    assert d["metadata"]["exemplars"] == [[1.0, 2.0, 9.0, 8.0]]
    r = R.parse_record(d, image_root=str(tmp_path))
    np.testing.assert_allclose(r.objects[0].point, [10.5 / 64, 20 / 48])


def test_cli_convert_and_back(tmp_path):
    import subprocess
    import sys

    Image.new("RGB", (50, 40)).save(tmp_path / "im0.jpg")
    coco = {"images": [{"id": 1, "file_name": "im0.jpg", "width": 50, "height": 40}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 20], "iscrowd": 0}],
            "categories": [{"id": 3, "name": "dog"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_dataset.py")
    r = subprocess.run([sys.executable, tool, "--format", "coco", "--input", str(tmp_path / "c.json"), "--images",
                        str(tmp_path), "--out", str(tmp_path / "out" / "d.jsonl")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "1 records" in r.stdout and "1 kept" in r.stdout
    d = json.loads((tmp_path / "out" / "d.jsonl").read_text())
    assert d["images"] == ["../im0.jpg"] and d["objects"][0]["bbox_2d"] == [1.0, 2.0, 11.0, 22.0]
    r = subprocess.run([sys.executable, tool, "--format", "jsonl2coco", "--input", str(tmp_path / "out" / "d.jsonl"),
                        "--out", str(tmp_path / "back.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    back = json.loads((tmp_path / "back.json").read_text())
    assert back["annotations"][0]["bbox"] == [1.0, 2.0, 10.0, 20.0]
    r = subprocess.run([sys.executable, tool, "--format", "coco", "--input", str(tmp_path / "nope.json"), "--images",
                        str(tmp_path), "--out", str(tmp_path / "x.jsonl")], capture_output=True, text=True)
    assert r.returncode != 0 and "nope.json" in r.stderr
