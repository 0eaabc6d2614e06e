"""predict CLI end to end on tiny random checkpoints (HF and ours): one image, a folder with one compile, a glob,
duplicate names, skipped inputs; the post-processing to original-image pixels; its bad-input errors."""

import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from coordexp_jax import predict
from coordexp_jax.coord import protocols
from coordexp_jax.data.tokenizer import SMALL_TOKENIZER_DIR, small_tokenizer, token_ids_from_tokenizer
from coordexp_jax.model.config import tiny_config
from coordexp_jax.model.qwen3vl import Qwen3VL
from coordexp_jax.rollout.sampler import Rollout, Sampler
from coordexp_jax.weights.checkpoint import save_checkpoint
from coordexp_jax.weights.hf import save_hf_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = small_tokenizer()
    tid = token_ids_from_tokenizer(tok)
    cfg = tiny_config(vocab_size=tid.vocab_size).replace(
        image_token_id=tid.image_pad, video_token_id=tid.video_pad, vision_start_token_id=tid.vision_start,
        vision_end_token_id=tid.vision_end)
    model = Qwen3VL(cfg, rngs=nnx.Rngs(0))
    root = tmp_path_factory.mktemp("predict")
    hf_dir = str(root / "hf")
    save_hf_checkpoint(model, cfg, hf_dir, SMALL_TOKENIZER_DIR)
    ours = str(root / "ours")
    save_checkpoint(ours, model, cfg)
    img_path = str(root / "img.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(img_path)
    return tok, tid, cfg, hf_dir, ours, img_path, root


def test_end_to_end_hf_checkpoint(setup, capsys):
    tok, tid, cfg, hf_dir, ours, img, root = setup
    out = str(root / "out_hf")
    rc = predict.main(["--checkpoint", hf_dir, "--image", img, "--out", out, "--max_new_tokens", "12",
                       "--prompt", "Find the red circle."])
    assert rc == 0, capsys.readouterr().err
    res = json.load(open(os.path.join(out, "img.json")))
    assert (res["width"], res["height"]) == (130, 90) and res["prompt"] == "Find the red circle."
    assert res["num_tokens"] == 12 or res["finished"]
    assert isinstance(res["objects"], list) and isinstance(res["answer"], str)
    png = Image.open(os.path.join(out, "img.png"))
    # upscaled to a 512 px longer side (nearest), original aspect, the legend strip under it
    assert png.size[0] == 512 and png.size[1] > round(512 * 90 / 130)
    if not res["objects"]:  # nothing drawn: the picture is the image upscaled (PIL nearest)
        H = round(512 * 90 / 130)
        np.testing.assert_array_equal(np.asarray(png)[:H], np.asarray(Image.open(img).resize((512, H), Image.NEAREST)))
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["compiles"] == 1 and s["images"][0]["name"] == "img" and s["totals"]["predicted"] == 1


def test_end_to_end_ours_constrained_tags(setup, capsys):
    tok, tid, cfg, hf_dir, ours, img, root = setup
    out = str(root / "out_ours")
    rc = predict.main(["--checkpoint", ours, "--image", img, "--out", out, "--max_new_tokens", "24",
                       "--protocol", "tags", "--constrain", "--temperature", "1.0", "--seed", "3"])
    assert rc == 0, capsys.readouterr().err
    res = json.load(open(os.path.join(out, "img.json")))
    # constrained: the random model's answer never breaks the tags grammar, so nothing is dropped except a
    # box cut off by max_new_tokens
    assert set(res["parse"]["dropped"]) <= {"truncated"}


def test_boxes_in_original_pixels_and_score(setup, monkeypatch, capsys):
    """The CLI's post-processing with a scripted rollout: a known answer -> known pixel boxes and scores."""
    tok, tid, cfg, hf_dir, ours, img, root = setup
    body = protocols.serialize([protocols.AnswerObject("red circle", bins=(0, 111, 999, 555)),
                                protocols.AnswerObject("cat", bins=(500, 500, 600, 700))], tok, tid,
                               "coordjson", order="given")
    ids = list(body.ids) + [tid.eos]
    T = len(ids) + 3
    lp = np.full((1, T), -0.1, np.float32)
    lp[0, body.coord_positions[0]] = np.log([0.9, 0.8, 0.7, 0.6])
    chat = np.full((1, T), np.nan, np.float32)
    chat[0, body.coord_positions.ravel()] = 0.5
    tokens = np.full((1, T), tid.pad, np.int32)
    tokens[0, :len(ids)] = ids
    fake = Rollout(tokens=tokens, logprobs=lp, sample_logprobs=np.zeros_like(lp), coord_expectation=chat,
                   lengths=np.array([len(ids)]), finished=np.array([True]))
    monkeypatch.setattr(Sampler, "generate", lambda self, batch, **kw: fake)
    out = str(root / "out_scripted")
    assert predict.main(["--checkpoint", hf_dir, "--image", img, "--out", out, "--max_new_tokens", "8"]) == 0
    res = json.load(open(os.path.join(out, "img.json")))
    o1, o2 = res["objects"]
    assert o1["desc"] == "red circle" and o2["desc"] == "cat"
    # continuous pixels of the ORIGINAL 130x90 image: x = k/999 * 130, y = k/999 * 90 (atol: the JSON's
    # 2-decimal rounding, 0.005 px); scores from float32 log-probs: relative
    np.testing.assert_allclose(o1["bbox"], [0, 111 / 999 * 90, 130, 555 / 999 * 90], atol=0.01)
    np.testing.assert_allclose(o2["bbox"], [500 / 999 * 130, 500 / 999 * 90, 600 / 999 * 130, 700 / 999 * 90],
                               atol=0.01)
    np.testing.assert_allclose(o1["score"], np.exp(np.mean(np.log([0.9, 0.8, 0.7, 0.6]))), rtol=1e-5)
    np.testing.assert_allclose(o2["score"], np.exp(-0.1), rtol=1e-5)
    np.testing.assert_allclose(o1["bbox_expectation"], [65, 45, 65, 45], atol=0.01)
    assert res["answer"].startswith('{"objects": [{"desc": "red circle"')


def _err(capsys):
    return capsys.readouterr().err.strip().splitlines()


def test_bad_inputs(setup, capsys, tmp_path):
    tok, tid, cfg, hf_dir, ours, img, root = setup
    out = str(tmp_path / "o")
    bad_img = str(tmp_path / "broken.png")
    open(bad_img, "wb").write(b"\x89PNG\r\n\x1a\n not really a png")
    assert predict.main(["--checkpoint", hf_dir, "--image", bad_img, "--out", out]) == 2
    err = _err(capsys)
    assert len(err) == 1 and err[0].startswith("error:") and "broken.png" in err[0]
    assert predict.main(["--checkpoint", hf_dir, "--image", str(tmp_path / "missing.jpg"), "--out", out]) == 2
    assert "missing.jpg" in _err(capsys)[0]
    # a checkpoint whose tensors do not match its config.json (hidden size changed)
    wrong = str(tmp_path / "wrong")
    os.makedirs(wrong)
    for f in os.listdir(hf_dir):
        os.symlink(os.path.join(hf_dir, f), os.path.join(wrong, f))
    os.remove(os.path.join(wrong, "config.json"))
    c = json.load(open(os.path.join(hf_dir, "config.json")))
    c["text_config"]["intermediate_size"] = 96
    json.dump(c, open(os.path.join(wrong, "config.json"), "w"))
    assert predict.main(["--checkpoint", wrong, "--image", img, "--out", out]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "shape" in err[0] and "mlp" in err[0], err
    # prompt longer than the cache
    assert predict.main(["--checkpoint", hf_dir, "--image", img, "--out", out, "--max_len", "64",
                         "--max_new_tokens", "8"]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "cache" in err[0] and "tokens" in err[0], err
    # a human-object-interaction model (spatial-linking files beside it): its prompts need links predict cannot build
    hoi = str(tmp_path / "hoi")
    os.makedirs(hoi)
    for f in os.listdir(hf_dir):
        os.symlink(os.path.join(hf_dir, f), os.path.join(hoi, f))
    json.dump({"heads": 2}, open(os.path.join(hoi, "spatial_linking.json"), "w"))
    assert predict.main(["--checkpoint", hoi, "--image", img, "--out", out]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "human-object-interaction" in err[0] and "coordexp_jax.evaluate" in err[0], err
    assert not os.path.exists(out)


def test_preprocessing_defaults_come_from_the_checkpoint(tmp_path):
    """Options not given on the command line come from the checkpoint's preprocessing.json (the training settings);
    explicit options win; without the file the released defaults apply."""
    import argparse
    import json

    from coordexp_jax import predict as P

    def args(**kw):
        base = dict(checkpoint=str(tmp_path), protocol=None, pixel_mode=None, min_pixels=None, max_pixels=None)
        base.update(kw)
        return argparse.Namespace(**base)

    a = args()
    P._apply_preprocessing_defaults(a)
    assert (a.protocol, a.pixel_mode, a.min_pixels, a.max_pixels) == ("coordjson", "continuous", None, None)
    with open(tmp_path / P.PREPROCESSING, "w") as f:
        json.dump({"protocol": "tags", "pixel_mode": "continuous", "min_pixels": 4096, "max_pixels": 16384}, f)
    a = args(max_pixels=9000)
    P._apply_preprocessing_defaults(a)
    assert (a.protocol, a.min_pixels, a.max_pixels) == ("tags", 4096, 9000)


def _write_png(path, w, h, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def test_folder_of_images_compiles_once(setup, capsys):
    """3 images of two sizes with --batch_size 2: two batches (the second padded) of one shape -> one compile; a
    JSON and a picture per image and the summary."""
    tok, tid, cfg, hf_dir, ours, img, root = setup
    folder = root / "folder"
    for i, (w, h) in enumerate([(130, 90), (64, 64), (130, 90)]):
        _write_png(str(folder / f"im{i}.png"), w, h, seed=i)
    (folder / "notes.txt").write_text("not an image: not taken")
    out = str(root / "out_folder")
    rc = predict.main(["--checkpoint", hf_dir, "--images", str(folder), "--out", out, "--max_new_tokens", "6",
                       "--batch_size", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sorted(os.listdir(out)) == ["im0.json", "im0.png", "im1.json", "im1.png", "im2.json", "im2.png",
                                       "summary.json"]
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["compiles"] == 1 and s["batch_shape"]["batch_size"] == 2
    assert [x["name"] for x in s["images"]] == ["im0", "im1", "im2"] and s["skipped"] == []
    t = s["totals"]
    assert (t["inputs"], t["predicted"], t["skipped"]) == (3, 3, 0) and sum(t["parse"].values()) == 3
    assert t["objects"] == sum(len(json.load(open(os.path.join(out, f"im{i}.json")))["objects"]) for i in range(3))
    r1 = json.load(open(os.path.join(out, "im1.json")))
    assert (r1["width"], r1["height"]) == (64, 64) and r1["parse"]["status"] in ("ok", "partial", "failed")
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1 and "3/3 images" in lines[0] and "1 compile," in lines[0]


@pytest.fixture
def scripted(setup, monkeypatch):
    """Sampler.generate replaced by a scripted answer (one box at bins (0, 0, 499, 999)) for every row; records the
    batch shapes it was called with."""
    tok, tid, cfg, hf_dir, ours, img, root = setup
    body = protocols.serialize([protocols.AnswerObject("cat", bins=(0, 0, 499, 999))], tok, tid, "coordjson",
                               order="given")
    ids = list(body.ids) + [tid.eos]
    shapes = []

    def fake(self, batch, **kw):
        B = batch["input_ids"].shape[0]
        shapes.append({k: np.shape(v) for k, v in batch.items()})
        tokens = np.full((B, len(ids)), tid.pad, np.int32)
        tokens[:] = ids
        lp = np.full((B, len(ids)), -0.1, np.float32)
        return Rollout(tokens=tokens, logprobs=lp, sample_logprobs=np.zeros_like(lp),
                       coord_expectation=np.full_like(lp, 0.5), lengths=np.full(B, len(ids)),
                       finished=np.ones(B, bool))

    monkeypatch.setattr(Sampler, "generate", fake)
    return shapes


def test_glob_duplicate_names_and_boxes_per_image(setup, scripted, tmp_path, capsys):
    tok, tid, cfg, hf_dir, ours, img, root = setup
    _write_png(str(tmp_path / "a" / "x.png"), 100, 60)
    _write_png(str(tmp_path / "b" / "x.png"), 50, 80)
    _write_png(str(tmp_path / "b" / "y.jpg.png"), 70, 70)
    out = str(tmp_path / "out")
    rc = predict.main(["--checkpoint", hf_dir, "--images", str(tmp_path / "**" / "*.png"), "--out", out,
                       "--max_new_tokens", "32", "--batch_size", "4"])
    assert rc == 0, capsys.readouterr().err
    s = json.load(open(os.path.join(out, "summary.json")))
    assert [x["name"] for x in s["images"]] == ["a__x", "b__x", "y.jpg"]
    # each image's box in ITS pixels: x2 = 499/999 * width, y2 = height (continuous pixels; JSON rounds to 0.01)
    for name, (w, h) in (("a__x", (100, 60)), ("b__x", (50, 80)), ("y.jpg", (70, 70))):
        res = json.load(open(os.path.join(out, f"{name}.json")))
        np.testing.assert_allclose(res["objects"][0]["bbox"], [0, 0, 499 / 999 * w, h], atol=0.01)
        assert res["parse"]["status"] == "ok" and os.path.isfile(os.path.join(out, f"{name}.png"))
    # one batch of 3 images padded to the fixed shape? batch_size 4 > 3 images: 3 rows, no padding
    assert len(scripted) == 1 and scripted[0]["input_ids"][0] == 3


def test_every_batch_has_one_shape(setup, scripted, tmp_path, capsys):
    tok, tid, cfg, hf_dir, ours, img, root = setup
    sizes = [(40, 40), (130, 90), (64, 48), (90, 130), (32, 32)]
    for i, (w, h) in enumerate(sizes):
        _write_png(str(tmp_path / "in" / f"{i}.png"), w, h, seed=i)
    out = str(tmp_path / "out")
    assert predict.main(["--checkpoint", hf_dir, "--images", str(tmp_path / "in"), "--out", out,
                         "--max_new_tokens", "32", "--batch_size", "2"]) == 0, capsys.readouterr().err
    assert len(scripted) == 3 and all(sh == scripted[0] for sh in scripted)  # 2 + 2 + (1 padded to 2)
    assert len(json.load(open(os.path.join(out, "summary.json")))["images"]) == 5


def test_unreadable_images_are_skipped(setup, scripted, tmp_path, capsys, caplog):
    tok, tid, cfg, hf_dir, ours, img, root = setup
    folder = tmp_path / "in"
    _write_png(str(folder / "good.png"), 60, 40)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = folder / "good.png"
    (folder / "cut.jpg").write_bytes(good.read_bytes()[:60])  # a truncated file
    out = str(tmp_path / "out")
    rc = predict.main(["--checkpoint", hf_dir, "--images", str(folder), "--out", out, "--max_new_tokens", "32"])
    assert rc == 0, capsys.readouterr().err
    s = json.load(open(os.path.join(out, "summary.json")))
    assert [x["name"] for x in s["images"]] == ["good"]
    err = "\n".join(r.getMessage() for r in caplog.records if r.name == "coordexp_jax.predict")
    assert sorted(os.path.basename(x["image"]) for x in s["skipped"]) == ["broken.png", "cut.jpg"]
    assert s["totals"]["skipped"] == 2 and "broken.png" in err and "cut.jpg" in err
    assert sorted(os.listdir(out)) == ["good.json", "good.png", "summary.json"]
    # nothing readable: one error line, exit 2; a path that does not exist: the same
    os.remove(good)
    assert predict.main(["--checkpoint", hf_dir, "--images", str(folder), "--out", str(tmp_path / "o2")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error:") and "none of the 2 images" in lines[-1]
    for flag, path in (("--image", "missing.png"), ("--images", "missing_dir"), ("--images", "nothing*.png")):
        assert predict.main(["--checkpoint", hf_dir, flag, str(tmp_path / path), "--out", str(tmp_path / "o3")]) == 2
        err = _err(capsys)
        assert len(err) == 1 and err[0].startswith("error:") and path in err[0], err
    assert not os.path.exists(tmp_path / "o2") and not os.path.exists(tmp_path / "o3")


def test_output_names_are_unique():
    names = predict.output_names(["d/a/x.png", "d/b/x.png", "d/b/x.jpg", "d/c/y.png", "d/summary.png",
                                  "d/a/x.png"])
    assert names[:4] == ["a__x", "b__x", "b__x_jpg", "y"] and names[4] != "summary"
    assert len(set(names)) == len(names)
