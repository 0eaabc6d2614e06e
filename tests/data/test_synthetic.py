"""Synthetic shapes set: deterministic, boxes tight around the drawn shapes, valid records, phrases unique."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from coordexp_jax.data import records as R
from coordexp_jax.data import synthetic as S


def test_deterministic_and_seed_dependent():
    cfg = S.SyntheticConfig()
    a1, o1 = S.make_image(S.image_rng(3, "train", 5), cfg)
    a2, o2 = S.make_image(S.image_rng(3, "train", 5), cfg)
    b, _ = S.make_image(S.image_rng(3, "val", 5), cfg)
    assert np.array_equal(a1, a2) and o1 == o2 and not np.array_equal(a1, b)


def test_boxes_tight_on_flat_background():
    """With no noise, texture or clutter, the pixels that differ from the background lie inside the union of
    boxes, and every box edge touches the object's own drawn pixels (independent check of the geometry)."""
    cfg = S.SyntheticConfig(noise_std=0, texture=False, clutter=0, max_overlap=0.0, classes=tuple(S.SHAPES[:8]),
                            class_colors=True)
    for i in range(20):
        rng = S.image_rng(0, "train", i)
        img, objs = S.make_image(rng, cfg)
        bg = S._background(S.image_rng(0, "train", i), cfg)
        diff = np.any(np.abs(img.astype(int) - bg.astype(int)) > 0, axis=-1)
        inside = np.zeros_like(diff)
        for o in objs:
            x1, y1, x2, y2 = o["box"]
            inside[y1:y2, x1:x2] = True
            m = diff[y1:y2, x1:x2]
            assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any(), (i, o)
        assert not (diff & ~inside).any()
        assert cfg.min_objects <= len(objs) <= cfg.max_objects


def test_write_split_records_valid_and_coco_loads(tmp_path):
    from pycocotools.coco import COCO

    cfg = S.SyntheticConfig()
    paths = S.write_split(str(tmp_path), "val", 40, seed=1, cfg=cfg)
    recs, rep = R.read_jsonl(paths["jsonl"], check_images="decode")
    assert len(recs) == 40 and rep.records_kept == 40 and not rep.counts
    side = min(cfg.image_size)
    for r in recs:
        assert 1 <= len(r.objects) <= 4 and {o.desc for o in r.objects} <= set(cfg.classes)
        b = r.boxes_px()
        assert (np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) >= side / 8 * 0.85 - 1).all()
    api = COCO(paths["coco"])
    assert len(api.getImgIds()) == 40 and len(api.getAnnIds()) == sum(len(r.objects) for r in recs)
    g, _ = R.read_jsonl(paths["grounding"], check_images="none")
    for rec in g:
        assert rec.task == "grounding" and rec.objects[0].desc.startswith("the ")
    assert {o.desc for r in recs for o in r.objects} == set(cfg.classes)


def test_ensure_dataset_reuses_a_match_and_refuses_to_overwrite_another_set(tmp_path):
    small = S.SyntheticConfig(image_size=(64, 64))
    S.ensure_dataset(str(tmp_path), 6, 2, cfg=small)
    img = tmp_path / "images" / "train_000000.png"
    stamp = img.stat().st_mtime_ns
    S.ensure_dataset(str(tmp_path), 6, 2, cfg=small)  # same request: reused, nothing rewritten
    assert img.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"other settings \(config.image_size: .*\[\[64, 64\]\].*\[\[96, 96\]\]"):
        S.ensure_dataset(str(tmp_path), 6, 2, cfg=S.SyntheticConfig(image_size=(96, 96)))
    with pytest.raises(ValueError, match="num_train"):
        S.ensure_dataset(str(tmp_path), 7, 2, cfg=small)
    assert img.stat().st_mtime_ns == stamp  # the existing set is untouched


def test_phrases_single_out_objects():
    objs = [{"shape": "circle", "color": "red", "size": "large", "box": (0, 0, 10, 10)},
            {"shape": "circle", "color": "red", "size": "small", "box": (20, 0, 30, 10)},
            {"shape": "square", "color": "blue", "size": "small", "box": (40, 0, 50, 10)},
            {"shape": "square", "color": "blue", "size": "small", "box": (60, 0, 70, 10)}]
    assert S._phrases(objs) == ["the large red circle", "the small red circle", "the leftmost blue square",
                                "the rightmost blue square"]


def test_cli(tmp_path):
    tool = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "make_synthetic.py")
    r = subprocess.run([sys.executable, tool, "--out", str(tmp_path), "--num", "6", "--val", "2", "--seed", "4",
                        "--size", "96", "160", "--classes", "star,ring,cross,hexagon"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in open(tmp_path / "train.jsonl")]
    assert len(lines) == 6 and lines[0]["width"] == 160 and lines[0]["height"] == 96
    r = subprocess.run([sys.executable, tool, "--out", str(tmp_path), "--num", "1", "--classes", "blob"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "blob" in r.stderr


def test_config_errors():
    with pytest.raises(ValueError, match="subset"):
        S.SyntheticConfig(classes=("circle", "pentagon"))
    with pytest.raises(ValueError, match="min_objects"):
        S.SyntheticConfig(min_objects=3, max_objects=2)
