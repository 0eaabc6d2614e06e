"""predict CLI, counting mode, end to end on a tiny checkpoint with regression heads whose answer is fixed (last
layers zeroed, the bias = atanh of the answer): the sequential loop's points in pixels of the original image, the
stop rules, the picture, folder handling with a skipped image, and the bad-input error lines."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from coordexp_jax import counting, predict
from coordexp_jax.data.tokenizer import SMALL_XY_TOKENIZER_DIR, load_tokenizer, token_ids_from_tokenizer
from coordexp_jax.model.config import tiny_config
from coordexp_jax.model.qwen3vl import Qwen3VL
from coordexp_jax.model.regression import HeadsConfig, RegressionHeads, attach_heads
from coordexp_jax.weights.checkpoint import save_checkpoint

ANSWER = (0.25, -0.5)  # the fixed head output (normalised [-1, 1])


def _model(tid, answer, heads=True):
    cfg = tiny_config(vocab_size=tid.vocab_size).replace(
        image_token_id=tid.image_pad, video_token_id=tid.video_pad, vision_start_token_id=tid.vision_start,
        vision_end_token_id=tid.vision_end)
    model = Qwen3VL(cfg, rngs=nnx.Rngs(0))
    if heads:
        h = RegressionHeads(HeadsConfig(hidden_size=cfg.text.hidden_size, layers=2, width=8), rngs=nnx.Rngs(1))
        for head, v in ((h.x, answer[0]), (h.y, answer[1])):
            last = head.layers[-1]
            last.kernel[...] = jnp.zeros_like(last.kernel[...])
            last.bias[...] = jnp.full_like(last.bias[...], np.arctanh(v))
        attach_heads(model, h)
    return cfg, model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tid = token_ids_from_tokenizer(load_tokenizer(SMALL_XY_TOKENIZER_DIR), require_coords=False)
    root = tmp_path_factory.mktemp("predict_counting")
    paths = {}
    for name, answer, heads in (("fixed", ANSWER, True), ("done", (-1 + 1e-3, -1 + 1e-3), True),
                                ("plain", ANSWER, False)):
        cfg, model = _model(tid, answer, heads)
        paths[name] = str(root / name)
        save_checkpoint(paths[name], model, cfg)
    imgs = root / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)).save(imgs / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(imgs / "b.jpg")
    Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)).save(imgs / "tiny.png")  # < the marks
    return paths, imgs, root


def test_counting_cli_writes_points_picture_and_summary(setup, capsys):
    paths, imgs, root = setup
    out = str(root / "out_fixed")
    rc = predict.main(["--checkpoint", paths["fixed"], "--images", str(imgs), "--out", out,
                       "--class_name", "circle"])
    assert rc == 0, capsys.readouterr().err
    assert "2/3 images counted, 1 skipped" in capsys.readouterr().out
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["mode"] == "counting" and [d["name"] for d in s["images"]] == ["a", "b"]
    assert len(s["skipped"]) == 1 and "tiny.png" in s["skipped"][0]["reason"]
    assert "too small" in s["skipped"][0]["reason"]
    for name, (h, w) in (("a", (90, 130)), ("b", (64, 64))):
        res = json.load(open(os.path.join(out, f"{name}.json")))
        # the same answer twice: the first is counted, the second falls on its mark -> "repeat" after 2 steps;
        # the point in pixels of the ORIGINAL image (continuous: u = 2 x / W - 1); the tiny random model's hidden
        # state does not matter, the zeroed last layer makes the head's output tanh(atanh(v)) = v (float32: ~1e-7)
        want = [(ANSWER[0] + 1) / 2 * w, (ANSWER[1] + 1) / 2 * h]
        assert res["count"] == 1 and res["steps"] == 2 and res["done_reason"] == "repeat"
        np.testing.assert_allclose(res["points"], [want], atol=0.01)  # written rounded to 0.01 px
        np.testing.assert_allclose(res["predictions"], [ANSWER, ANSWER], atol=1e-5)
        assert (res["width"], res["height"], res["class_name"]) == (w, h, "circle")
        # the last prompt (step 2, one point marked) is the seed's template for the class
        assert res["prompt"].startswith("Count the circles") and "1 object is already marked" in res["prompt"]
        assert res["prompt"].endswith("<x> <y>")
        # the picture: the left panel is the input upscaled (nearest) to a 384 px longer side
        pic = np.asarray(Image.open(os.path.join(out, f"{name}.png")).convert("RGB"))
        scale = 384 / max(h, w)
        sw, sh = round(w * scale), round(h * scale)
        ref = counting.draw_counting_result(np.asarray(Image.open(imgs / ("a.png" if name == "a" else "b.jpg"))
                                                       .convert("RGB")), np.asarray([want]))
        assert pic.shape[1] == ref.shape[1] and pic.shape[0] >= ref.shape[0] > sh
        gap = (pic.shape[1] - 2 * sw) // 3
        left = Image.open(imgs / ("a.png" if name == "a" else "b.jpg")).convert("RGB").resize((sw, sh), Image.NEAREST)
        head = ref.shape[0] - sh - gap
        np.testing.assert_array_equal(pic[head:head + sh, gap:gap + sw], np.asarray(left))


def test_counting_done_signal_and_auto_mode_glob(setup, capsys):
    paths, imgs, root = setup
    out = str(root / "out_done")
    rc = predict.main(["--checkpoint", paths["done"], "--images", str(imgs / "*.png"), "--out", out,
                       "--class_name", "egg", "--max_count", "5"])
    assert rc == 0, capsys.readouterr().err
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["mode"] == "counting" and s["max_count"] == 5 and [d["name"] for d in s["images"]] == ["a"]
    res = json.load(open(os.path.join(out, "a.json")))
    assert res["count"] == 0 and res["points"] == [] and res["done_reason"] == "done" and res["steps"] == 1
    assert res["prompt"].startswith("Count the eggs") and "0 objects are already marked" in res["prompt"]


@pytest.mark.parametrize("case", ["no_heads", "no_class", "all_too_small", "bad_max_count", "no_checkpoint"])
def test_counting_bad_input_is_one_error_line(setup, capsys, case):
    paths, imgs, root = setup
    out = str(root / f"bad_{case}")
    args = {"no_heads": ["--checkpoint", paths["plain"], "--mode", "counting", "--image", str(imgs / "a.png"),
                         "--class_name", "circle"],
            "no_class": ["--checkpoint", paths["fixed"], "--image", str(imgs / "a.png")],
            "all_too_small": ["--checkpoint", paths["fixed"], "--image", str(imgs / "tiny.png"),
                              "--class_name", "circle"],
            "bad_max_count": ["--checkpoint", paths["fixed"], "--image", str(imgs / "a.png"),
                              "--class_name", "circle", "--max_count", "0"],
            "no_checkpoint": ["--checkpoint", str(root / "missing"), "--mode", "counting", "--image",
                              str(imgs / "a.png")]}[case]
    assert predict.main(args + ["--out", out]) == predict.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    want = {"no_heads": "no regression heads", "no_class": "--class_name", "all_too_small": "too small",
            "bad_max_count": "--max_count must be >= 1", "no_checkpoint": "no such model directory"}[case]
    assert want in err[0]
