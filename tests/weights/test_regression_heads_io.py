"""Regression heads beside the Qwen3-VL parameters: our checkpoint and the HF export (regression_heads.safetensors +
.json) round trip, the HF model unchanged for transformers, bad files, and the <x> <y> tokens (small tokenizer,
vocabulary expansion)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from coordexp_jax.model.config import tiny_config
from coordexp_jax.model.qwen3vl import Qwen3VL
from coordexp_jax.model.regression import HeadsConfig, RegressionHeads, attach_heads, heads_of, heads_to_numpy
from coordexp_jax.weights.checkpoint import load_checkpoint, save_checkpoint
from coordexp_jax.weights.names import WeightsError


def _qwen_params(model):
    st = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    st.pop("regression_heads", None)
    return dict(jax.tree_util.tree_flatten_with_path(st)[0])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    mc = tiny_config(vocab_size=300)
    model = Qwen3VL(mc, rngs=nnx.Rngs(0))
    heads = RegressionHeads(HeadsConfig(hidden_size=mc.text.hidden_size, layers=3, width=24, activation="silu"),
                            rngs=nnx.Rngs(1))
    attach_heads(model, heads)
    d = str(tmp_path_factory.mktemp("ck") / "ours")
    save_checkpoint(d, model, mc)
    return mc, model, d


def test_our_checkpoint_round_trip(saved):
    mc, model, d = saved
    assert {"regression_heads.safetensors", "regression_heads.json", "params", "model_config.json"} <= set(os.listdir(d))
    _, back = load_checkpoint(d)
    a, b = heads_to_numpy(heads_of(model)), heads_to_numpy(heads_of(back))
    assert heads_of(back).cfg == heads_of(model).cfg  # activation and width come back from the JSON
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])  # float32 stored, float32 read: bit-exact
    pa, pb = _qwen_params(model), _qwen_params(back)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]))
    # params/ holds the Qwen3-VL tree only: without the heads files the same directory loads a model with no heads
    bare = d + "_bare"
    shutil.copytree(d, bare)
    os.remove(os.path.join(bare, "regression_heads.json"))
    _, m2 = load_checkpoint(bare)
    assert heads_of(m2) is None and _qwen_params(m2).keys() == pa.keys()


def test_hf_export_round_trip(saved, tmp_path):
    import importlib.util

    from transformers import Qwen3VLForConditionalGeneration

    mc, model, d = saved
    spec = importlib.util.spec_from_file_location("export_hf", os.path.join(os.path.dirname(__file__), "..", "..",
                                                                            "tools", "export_hf.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = str(tmp_path / "hf")
    assert tool.main(["--checkpoint", d, "--out", out]) in (0, None)
    assert {"model.safetensors", "config.json", "regression_heads.safetensors", "regression_heads.json"} <= set(
        os.listdir(out))
    # the heads file, read by the safetensors library: torch nn.Linear layout ([out, in] weights)
    want = heads_to_numpy(heads_of(model))
    got = load_file(os.path.join(out, "regression_heads.safetensors"))
    assert got.keys() == want.keys() and got["x.layers.0.weight"].shape == (24, mc.text.hidden_size)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    meta = json.load(open(os.path.join(out, "regression_heads.json")))
    assert (meta["layers"], meta["width"], meta["activation"], meta["hidden_size"]) == (3, 24, "silu",
                                                                                        mc.text.hidden_size)
    # the HF model is unchanged: no head tensor in model.safetensors, and transformers loads the directory
    assert not any(k.startswith(("x.", "y.")) for k in load_file(os.path.join(out, "model.safetensors")))
    Qwen3VLForConditionalGeneration.from_pretrained(out)
    # our loader reads the heads back from the export
    _, back = load_checkpoint(out)
    b = heads_to_numpy(heads_of(back))
    for k in want:
        np.testing.assert_array_equal(b[k], want[k])


def test_bad_heads_files(saved, tmp_path):
    _, _, d = saved
    bad = str(tmp_path / "bad")
    shutil.copytree(d, bad)
    t = load_file(os.path.join(bad, "regression_heads.safetensors"))
    del t["y.layers.2.bias"]
    from safetensors.numpy import save_file

    save_file(t, os.path.join(bad, "regression_heads.safetensors"))
    with pytest.raises(WeightsError, match=r"regression_heads.safetensors: missing tensor y.layers.2.bias"):
        load_checkpoint(bad)
    with open(os.path.join(bad, "regression_heads.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(WeightsError, match="regression_heads.json"):
        load_checkpoint(bad)


def test_small_xy_tokenizer():
    from coordexp_jax.data.tokenizer import (SMALL_XY_TOKENIZER_DIR, build_small_tokenizer, load_tokenizer,
                                             small_tokenizer, token_ids_from_tokenizer)

    base, xy = small_tokenizer(), load_tokenizer(SMALL_XY_TOKENIZER_DIR)
    vb, vx = base.get_vocab(), xy.get_vocab()
    assert len(xy) == len(base) + 2 and all(vx[t] == i for t, i in vb.items())  # every old id unchanged
    ids = token_ids_from_tokenizer(xy)
    assert (ids.x_token, ids.y_token) == (len(base), len(base) + 1) and ids.has_regression
    assert not token_ids_from_tokenizer(base).has_regression
    enc = xy.encode("Next: <x> <y>", add_special_tokens=False)
    assert enc[-3:] == [ids.x_token, xy.encode(" ", add_special_tokens=False)[0], ids.y_token]
    assert xy.decode(enc, skip_special_tokens=True).endswith("<x> <y>")  # plain tokens survive skip_special
    assert build_small_tokenizer(with_regression=True).get_vocab() == vx  # the shipped asset is this build


def test_expand_with_regression(tmp_path):
    from coordexp_jax.data.tokenizer import load_tokenizer, token_ids_from_tokenizer
    from coordexp_jax.model.hf_reference import build_hf_model
    from coordexp_jax.weights.vocab import expand_hf_dir
    from tests.weights.test_vocab_expansion import _base_tokenizer

    cfg = tiny_config()
    src = str(tmp_path / "src")
    build_hf_model(cfg, seed=5).save_pretrained(src)
    n_base = _base_tokenizer(src)
    info = expand_hf_dir(src, str(tmp_path / "dst"), with_regression=True)
    ids = token_ids_from_tokenizer(load_tokenizer(str(tmp_path / "dst")))
    # <x> <y> directly after the coordinate block, with embedding rows (mean init)
    assert (ids.x_token, ids.y_token) == (info["x_token"], info["y_token"]) == (n_base + 1001, n_base + 1002)
    emb = load_file(os.path.join(tmp_path, "dst", "model.safetensors"))["model.language_model.embed_tokens.weight"]
    assert emb.shape[0] >= n_base + 1003
    mean = load_file(os.path.join(src, "model.safetensors"))["model.language_model.embed_tokens.weight"][
        :n_base].astype(np.float64).mean(0)
    # the stored row is the float64 mean rounded once to the stored dtype: within one eps of the largest entry
    tol = np.finfo(emb.dtype).eps * np.abs(mean).max()
    np.testing.assert_allclose(emb[ids.x_token], mean, atol=tol, rtol=0)
