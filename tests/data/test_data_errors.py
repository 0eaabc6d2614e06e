"""Bad data is refused early, on one line, naming the record / source / key; what passes validation trains.

- images the Qwen3-VL processor refuses (aspect ratio over 200, more patches than a fixed slot) are refused at
  validation / pipeline build, per the policy; an exception in a Grain worker names the record (file:line);
- data-config mistakes (fusion keys, weights, empty sources, ...) are CoordExpErrors raised when the pipeline is
  built, before the first batch;
- one EXIF rule (transformers' `load_image`) for every image load; decode-time size mismatches counted as such;
- converter outputs are atomic, and a conversion with no valid record fails.
"""
import dataclasses
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from coordexp_jax.data import image as I
from coordexp_jax.data import pipeline as P
from coordexp_jax.data import prompts as Pr
from coordexp_jax.data import records as R
from coordexp_jax.data import tokenizer as T
from coordexp_jax.errors import CoordExpError

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "convert_dataset.py")


def _hf_smart_resize(h, w, factor, lo, hi):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)


def _rec(image, w, h, boxes=((1, 1, 5, 5),), **kw):
    return {"images": [image], "width": w, "height": h, "objects": [{"desc": "d", "bbox_2d": list(b)} for b in boxes],
            **kw}


def _write_jsonl(path, recs):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return str(path)


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    """A directory with a 64x64 image, a 500x1 strip (aspect 500) and a 1000x10 strip (aspect 100)."""
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for name, (w, h) in {"good.png": (64, 64), "strip.png": (500, 1), "long.png": (1000, 10)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / name)
    return d


@pytest.fixture(scope="module")
def tok():
    return T.small_tokenizer()


# --------------------------------------------------------------------------------------------- processor refusals
def test_aspect_over_200_refused_at_validation_per_policy(imgs):
    with pytest.raises(ValueError, match="aspect ratio"):  # the reference processor refuses this size
        _hf_smart_resize(1, 500, 32, I.QWEN3VL_MIN_PIXELS, I.QWEN3VL_MAX_PIXELS)
    path = _write_jsonl(imgs / "strip.jsonl", [_rec("good.png", 64, 64), _rec("strip.png", 500, 1, [(0, 0, 9, 1)])])
    recs, rep = R.read_jsonl(path)  # default policy: a counted skip naming file:line
    assert [r.source for r in recs] == [f"{path}:1"]
    assert rep.counts["unprocessable_image"] == 1 and rep.examples["unprocessable_image"][0].startswith(f"{path}:2")
    for check in ("none", "header", "decode"):  # decided from the size: whatever the image check
        with pytest.raises(R.RecordError, match=f"{path}:2: unprocessable_image: .*aspect ratio"):
            R.read_jsonl(path, check_images=check, policy={"unprocessable_image": "error"})
    # an aspect ratio of exactly 200 is processed by the reference, and kept
    _hf_smart_resize(1, 200, 32, I.QWEN3VL_MIN_PIXELS, I.QWEN3VL_MAX_PIXELS)
    assert R.parse_record(_rec("x.png", 200, 1, [(0, 0, 9, 1)]), check_images="none") is not None


def test_processing_problem_agrees_with_the_reference_processor():
    """None exactly when transformers' smart_resize accepts the size and its patches fit the slot."""
    sizes = [(1, 500), (1, 200), (1, 201), (10, 1000), (10, 400), (64, 64), (3000, 17), (2000, 31), (7, 5)]
    for lo, hi, slot in [(4096, 4096, 16), (4096, 16384, 64), (65536, 16777216, None)]:
        cfg = I.ImageConfig(min_pixels=lo, max_pixels=hi)
        for h, w in sizes:
            try:
                th, tw = _hf_smart_resize(h, w, 32, lo, hi)
            except ValueError:
                assert "aspect ratio" in I.processing_problem(h, w, cfg, slot)
                continue
            fits = slot is None or (th // 16) * (tw // 16) <= slot
            assert (I.processing_problem(h, w, cfg, slot) is None) == fits, (h, w, lo, hi, slot)
            strict = dataclasses.replace(cfg, allow_resize=False)
            assert (I.processing_problem(h, w, strict, None) is None) == ((th, tw) == (h, w))


def test_process_image_names_the_image_it_refuses():
    with pytest.raises(I.ImageSizeError, match="rec.jsonl:7.*aspect ratio") as e:
        I.process_image(np.zeros((1, 500, 3), np.uint8), name="rec.jsonl:7 (a.png)")
    assert isinstance(e.value, CoordExpError)
    with pytest.raises(I.ImageConfigError, match="min_pixels"):
        I.ImageConfig(min_pixels=10, max_pixels=5)


def test_train_iterator_refuses_images_its_slot_cannot_hold(imgs, tok):
    """A 1000x10 image passes validation (aspect 100) but becomes 80 patches at 64x64-pixel settings, more than a
    16-patch slot: the pipeline refuses it when it is built (counted), never in the collator."""
    cfg = Pr.PromptConfig(image=I.ImageConfig(min_pixels=4096, max_pixels=4096), patches_per_slot=16,
                          max_objects=2, text_bucket=256, max_text_len=256)
    th, tw = _hf_smart_resize(10, 1000, 32, 4096, 4096)
    assert (th // 16) * (tw // 16) > 16  # the reference processor makes more patches than the slot holds
    path = _write_jsonl(imgs / "long.jsonl", [_rec("good.png", 64, 64)] * 3 + [_rec("long.png", 1000, 10)])
    mc = Pr.released_model_config(cfg, T.token_ids_from_tokenizer(tok))
    kw = dict(batch_size=2, tokenizer=tok, model_config=mc, shard_index=0, shard_count=1)
    it = P.make_train_iterator([P.SourceSpec("s", path)], cfg, **kw)
    assert it.reports["s"].counts["unprocessable_image"] == 1
    assert it.reports["s"].examples["unprocessable_image"][0].startswith(f"{path}:4")
    for _ in range(4):  # two epochs of the 3 kept records
        assert next(it)["pixel_values"].shape[1] == 16
    with pytest.raises(R.RecordError, match=f"{path}:4: unprocessable_image: .*more than the 16"):
        P.make_train_iterator([P.SourceSpec("s", path, policy={"unprocessable_image": "error"})], cfg, **kw)


class FailsOnThird:
    """A transform that raises a non-project exception on record 3 and a project error naming record 4."""

    def __call__(self, r):
        if r.source.endswith(":3"):
            raise ZeroDivisionError("boom")
        if r.source.endswith(":4"):
            raise Pr.SampleError(f"{r.source}: a grounding record with no objects needs a 'prompt' (no phrase)")
        return {"w": np.int32(r.width)}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_exception_in_a_worker_names_the_record(num_workers):
    for bad, want in [(3, "f.jsonl:3: sample_failed: ZeroDivisionError: boom"), (4, "f.jsonl:4: a grounding")]:
        recs = [R.Record(image="a.png", width=i, height=1, objects=(), source=f"f.jsonl:{i}") for i in (1, 2, bad)]
        ds = P.build_dataset({"a": recs}, {"a": 1.0}, transform=FailsOnThird(), batch_size=1, batch_fn=list,
                             num_workers=num_workers)
        with pytest.raises(CoordExpError) as e:
            for _, _b in zip(range(4), ds):
                pass
        assert str(e.value).startswith(want) and "\n" not in str(e.value)
        assert isinstance(e.value, R.RecordError if bad == 3 else Pr.SampleError)


def test_record_error_survives_pickling():
    e = pickle.loads(pickle.dumps(R.RecordError("f.jsonl:3", "bad_value", "x")))
    assert (type(e), str(e), e.where, e.reason, e.detail) == (R.RecordError, "f.jsonl:3: bad_value: x", "f.jsonl:3",
                                                              "bad_value", "x")


def test_predict_refuses_the_image_before_loading_a_checkpoint(imgs, tmp_path, capsys):
    from coordexp_jax import predict

    argv = ["--checkpoint", str(tmp_path / "no_checkpoint"), "--image", str(imgs / "strip.png"), "--out",
            str(tmp_path / "out")]
    try:
        rc = predict.main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "strip.png" in err and "aspect ratio" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------------------------- data-config errors, early
def _corpus_case(tmp_path, imgs, case):
    good = _write_jsonl(tmp_path / "good.jsonl", [_rec(str(imgs / "good.png"), 64, 64)])
    src = [dict(name="a", path=good, weight=1.0), dict(name="b", path=good, weight=2.0)]
    want = "'b'"
    if case == "bin_1000":
        p = _write_jsonl(tmp_path / "n.jsonl", [_rec(str(imgs / "good.png"), 64, 64, [(0, 0, 999, 999)]),
                                                _rec(str(imgs / "good.png"), 64, 64, [(0, 0, 1000, 10)])])
        src[1].update(path=p, box_format="norm1000")
        want = f"{p}:2"
    elif case == "three_numbers":
        p = _write_jsonl(tmp_path / "t.jsonl", [_rec(str(imgs / "good.png"), 64, 64, [(1, 2, 3)])])
        src[1].update(path=p)
        want = f"{p}:1"
    elif case == "box_format_typo":
        src[1].update(box_format="norm_1000")
        want = "'b': key 'box_format'"
    elif case == "unknown_key":
        src[1]["wieght"] = 3
        want = "'b': unknown keys ['wieght']"
    elif case == "zero_weights":
        src[0]["weight"] = src[1]["weight"] = 0
        want = "'a': key 'weight'"
    elif case == "negative_weight":
        src[1]["weight"] = -1.0
        want = "'b': key 'weight'"
    elif case == "policy_typo":
        src[1]["policy"] = {"size_mismatch": "skp"}
        want = "'b': key 'policy'"
    elif case == "empty_source":
        src[1]["path"] = _write_jsonl(tmp_path / "empty.jsonl", [])
        want = "'b': no usable record"
    elif case == "all_skipped":
        src[1]["path"] = p = _write_jsonl(tmp_path / "gone.jsonl", [_rec("missing.png", 64, 64)] * 2)
        want = f"'b': no usable record in {p} (every record was skipped: 2 read, 0 kept; 2 missing_image"
    elif case == "missing_file":
        src[1]["path"] = str(tmp_path / "nope.jsonl")
        want = "'b': key 'path'"
    elif case == "duplicate_names":
        src[1]["name"] = "a"
        want = "duplicate names ['a']"
    return src, want


CASES = ["bin_1000", "three_numbers", "box_format_typo", "unknown_key", "zero_weights", "negative_weight",
         "policy_typo", "empty_source", "all_skipped", "missing_file", "duplicate_names"]


@pytest.mark.parametrize("case", CASES)
def test_bad_source_is_one_line_coordexp_error_at_build(tmp_path, imgs, case):
    src, want = _corpus_case(tmp_path, imgs, case)
    with pytest.raises(CoordExpError) as e:  # raised by build_pipeline: before any batch exists
        P.build_pipeline(P.fusion_config(src), transform=lambda r: r.width, batch_size=1, shard_index=0,
                         shard_count=1)
    msg = str(e.value)
    assert want in msg and "\n" not in msg, msg


def test_build_dataset_refuses_zero_and_negative_weights():
    for weights, name in [({"a": 0, "b": 0}, "'a'"), ({"a": 1, "b": -1}, "'b'"), ({"a": float("nan"), "b": 1}, "'a'")]:
        with pytest.raises(CoordExpError, match=f"{name}: key 'weight'"):
            P.build_dataset({"a": [1], "b": [2]}, weights, transform=lambda x: x, batch_size=1)
    with pytest.raises(CoordExpError, match="'b' is empty"):
        P.build_dataset({"a": [1], "b": []}, {"a": 1, "b": 1}, transform=lambda x: x, batch_size=1)


# ------------------------------------------------------------------------------------------- one EXIF rule
@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_exif_orientation_applied_as_transformers_load_image(tmp_path, fmt):
    from transformers.image_utils import load_image as hf_load_image

    arr = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o  # the EXIF Orientation tag
        p = str(tmp_path / f"o{o}.{fmt}")
        Image.fromarray(arr).save(p, exif=exif.tobytes())
        want = np.asarray(hf_load_image(p))
        np.testing.assert_array_equal(I.load_image(p), want)  # same decoder and transpose: bit-identical
        assert I.read_image_size(p) == (want.shape[1], want.shape[0])
        # records carry the upright size; the stored (unturned) size is a size mismatch that says why
        assert R.parse_record(_rec(p, want.shape[1], want.shape[0]), check_images="header") is not None
        if o >= 5:
            with pytest.raises(R.RecordError, match="size_mismatch: .*EXIF orientation"):
                R.parse_record(_rec(p, 60, 40), check_images="header")


def test_decode_time_size_mismatch_counted_as_size_mismatch(imgs, tok):
    enc = Pr.SampleEncoder(Pr.PromptConfig(image=I.ImageConfig(min_pixels=1024, max_pixels=4096)), tok)
    r = R.parse_record(_rec(str(imgs / "good.png"), 32, 64), check_images="none")  # the file is 64x64
    assert enc(r) is None and enc.counts == {"size_mismatch": 1}


# ------------------------------------------------------------------------------------------ converter outputs
def _convert(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True)


def test_write_jsonl_is_atomic(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("previous\n")

    def dicts():
        yield {"a": 1}
        raise R.RecordError("in.json:9", "bad_value", "x")

    with pytest.raises(R.RecordError):
        R.write_jsonl(dicts(), str(out))
    assert out.read_text() == "previous\n" and os.listdir(tmp_path) == ["o.jsonl"]
    assert R.write_jsonl([{"a": 1}], str(tmp_path / "new" / "p.jsonl")) == 1
    assert (tmp_path / "new" / "p.jsonl").read_text() == '{"a": 1}\n'


def test_convert_truncated_input_leaves_no_output(tmp_path, imgs):
    coco = {"images": [{"id": 1, "file_name": "good.png", "width": 64, "height": 64}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 20]}],
            "categories": [{"id": 1, "name": "dog"}]}
    text = json.dumps(coco)
    (tmp_path / "c.json").write_text(text[: len(text) // 2])
    out = tmp_path / "out" / "d.jsonl"
    r = _convert("--format", "coco", "--input", str(tmp_path / "c.json"), "--images", str(imgs), "--out", str(out))
    assert r.returncode == 2 and "c.json" in r.stderr and not out.exists()
    out.write_text("previous\n")
    r = _convert("--format", "coco", "--input", str(tmp_path / "c.json"), "--images", str(imgs), "--out", str(out))
    assert r.returncode == 2 and out.read_text() == "previous\n" and os.listdir(out.parent) == ["d.jsonl"]
    (tmp_path / "c.json").write_text(text)  # the complete file converts
    r = _convert("--format", "coco", "--input", str(tmp_path / "c.json"), "--images", str(imgs), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["objects"] == [{"desc": "dog", "bbox_2d": [1.0, 2.0, 11.0, 22.0]}]


def test_convert_fails_when_no_record_passes_validation(tmp_path, imgs):
    coco = {"images": [{"id": i, "file_name": f"gone{i}.png", "width": 64, "height": 64} for i in (1, 2)],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 20]}],
            "categories": [{"id": 1, "name": "dog"}]}
    (tmp_path / "c.json").write_text(json.dumps(coco))
    out = tmp_path / "d.jsonl"
    r = _convert("--format", "coco", "--input", str(tmp_path / "c.json"), "--images", str(imgs), "--out", str(out))
    assert r.returncode == 2 and "2 missing_image" in r.stderr and not out.exists()
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "empty.jsonl").write_text("")
    r = _convert("--format", "jsonl2coco", "--input", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "e.json"))
    assert r.returncode == 2 and not (tmp_path / "e.json").exists()
