"""predict CLI end to end on tiny random checkpoints (HF and ours), the post-processing to original-image pixels,
and its bad-input errors."""

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
    rc = predict.main(["--checkpoint", hf_dir, "--image", img, "--out", out, "--max-new-tokens", "12",
                       "--prompt", "Find the red circle."])
    assert rc == 0, capsys.readouterr().err
    res = json.load(open(os.path.join(out, "prediction.json")))
    assert (res["width"], res["height"]) == (130, 90) and res["prompt"] == "Find the red circle."
    assert res["num_tokens"] == 12 or res["finished"]
    assert isinstance(res["objects"], list) and isinstance(res["answer"], str)
    png = Image.open(os.path.join(out, "prediction.png"))
    assert png.size[0] >= 130 and abs(png.size[0] / png.size[1] - 130 / 90) < 0.01  # original aspect (upscaled)


def test_end_to_end_ours_constrained_tags(setup, capsys):
    tok, tid, cfg, hf_dir, ours, img, root = setup
    out = str(root / "out_ours")
    rc = predict.main(["--checkpoint", ours, "--image", img, "--out", out, "--max-new-tokens", "24",
                       "--protocol", "tags", "--constrain", "--temperature", "1.0", "--seed", "3"])
    assert rc == 0, capsys.readouterr().err
    res = json.load(open(os.path.join(out, "prediction.json")))
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
    assert predict.main(["--checkpoint", hf_dir, "--image", img, "--out", out, "--max-new-tokens", "8"]) == 0
    res = json.load(open(os.path.join(out, "prediction.json")))
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
    assert predict.main(["--checkpoint", hf_dir, "--image", img, "--out", out, "--max-len", "64",
                         "--max-new-tokens", "8"]) == 2
    err = _err(capsys)
    assert len(err) == 1 and "cache" in err[0] and "tokens" in err[0], err
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
