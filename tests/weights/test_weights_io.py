"""HF -> ours -> HF round trip (bitwise), transformers reloads the export, sharded checkpoints, CLI bad inputs."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from coordexp_jax.model.config import tiny_config
from coordexp_jax.model.hf_reference import build_hf_model
from coordexp_jax.weights.checkpoint import load_checkpoint
from coordexp_jax.weights.hf import load_hf_checkpoint, save_hf_checkpoint
from coordexp_jax.weights.names import WeightsError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(name, argv, capsys):
    from coordexp_jax.weights.cli import run

    code = run(_tool(name).main, argv)
    return code, capsys.readouterr().err.strip()


def _all_tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_dir(request, tmp_path_factory):
    cfg = tiny_config(tie_word_embeddings=request.param)
    model = build_hf_model(cfg, seed=11)
    d = str(tmp_path_factory.mktemp("src"))
    model.save_pretrained(d)
    return cfg, model, d


def _hf_logits(model):
    ids = torch.tensor([[1, 5, 9, 200, 17, 3, 800, 42]])
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


def test_round_trip_bitwise_and_transformers_reload(hf_dir, tmp_path, capsys):
    from transformers import Qwen3VLForConditionalGeneration

    cfg, model, src = hf_dir
    ours, out = str(tmp_path / "ours"), str(tmp_path / "export")
    assert _run("convert_hf", ["--hf_dir", src, "--out", ours], capsys)[0] == 0
    assert _run("export_hf", ["--checkpoint", ours, "--out", out], capsys)[0] == 0
    a, b = _all_tensors(src), _all_tensors(out)
    assert sorted(a) == sorted(b)
    assert ("lm_head.weight" in b) == (not cfg.tie_word_embeddings)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert a[k].tobytes() == b[k].tobytes(), k
    re, info = Qwen3VLForConditionalGeneration.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert bool(re.config.tie_word_embeddings) == cfg.tie_word_embeddings
    np.testing.assert_array_equal(_hf_logits(re.eval()), _hf_logits(model))  # bitwise-equal weights, same program


def test_sharded_export_and_load(hf_dir, tmp_path):
    cfg, _, src = hf_dir
    cfg2, m = load_hf_checkpoint(src)
    out = str(tmp_path / "sharded")
    files = save_hf_checkpoint(m, cfg2, out, max_shard_bytes=200_000)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    a, b = _all_tensors(src), _all_tensors(out)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a) and sorted(a) == sorted(b)
    cfg3, (_, state) = load_checkpoint(out, return_state=True)
    assert cfg3 == cfg


def test_bf16_convert_keeps_config(hf_dir, tmp_path, capsys):
    cfg, _, src = hf_dir
    out = str(tmp_path / "bf16")
    assert _run("convert_hf", ["--hf_dir", src, "--out", out, "--dtype", "bfloat16"], capsys)[0] == 0
    cfg2, (_, state) = load_checkpoint(out, return_state=True)
    assert cfg2 == cfg
    from flax import nnx
    import jax
    assert {str(x.dtype) for x in jax.tree.leaves(nnx.to_pure_dict(state))} == {"bfloat16"}


# ------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    cfg = tiny_config()
    d = str(tmp_path_factory.mktemp("bad_src"))
    build_hf_model(cfg, seed=2, perturb=False).save_pretrained(d)
    return d


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _expect_fail(capsys, tmp_path, src, needle):
    out = tmp_path / "out"
    code, err = _run("convert_hf", ["--hf_dir", src, "--out", str(out)], capsys)
    assert code != 0
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")], "temp dir left behind"


def test_bad_no_safetensors(untied_dir, tmp_path, capsys):
    d = _copy(untied_dir, tmp_path / "src")
    os.remove(os.path.join(d, "model.safetensors"))
    _expect_fail(capsys, tmp_path, d, "no *.safetensors")


def test_bad_missing_tensor(untied_dir, tmp_path, capsys):
    d = _copy(untied_dir, tmp_path / "src")
    t = load_file(os.path.join(d, "model.safetensors"))
    del t["model.language_model.layers.1.mlp.up_proj.weight"]
    save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    _expect_fail(capsys, tmp_path, d, "model.language_model.layers.1.mlp.up_proj.weight")


def test_bad_shape(untied_dir, tmp_path, capsys):
    d = _copy(untied_dir, tmp_path / "src")
    p = os.path.join(d, "config.json")
    c = json.load(open(p))
    c["text_config"]["intermediate_size"] = 96
    json.dump(c, open(p, "w"))
    out = tmp_path / "out"
    code, err = _run("convert_hf", ["--hf_dir", d, "--out", str(out)], capsys)
    assert code != 0 and len(err.splitlines()) == 1 and "mlp.gate_proj.weight" in err and "(128, 64)" in err and "(96, 64)" in err, err
    assert not out.exists()


def test_bad_not_qwen3vl(untied_dir, tmp_path, capsys):
    d = _copy(untied_dir, tmp_path / "src")
    p = os.path.join(d, "config.json")
    c = json.load(open(p))
    c["model_type"] = "qwen2_5_vl"
    json.dump(c, open(p, "w"))
    _expect_fail(capsys, tmp_path, d, "'model_type'")


def test_loader_rejects_unexpected_tensor(untied_dir, tmp_path):
    d = _copy(untied_dir, tmp_path / "src")
    t = load_file(os.path.join(d, "model.safetensors"))
    t["model.visual.extra.weight"] = np.zeros((2,), np.float32)
    save_file(t, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="model.visual.extra.weight"):
        load_hf_checkpoint(d)


def test_cli_subprocess_help_and_exit_code(tmp_path):
    for tool in ("convert_hf", "export_hf", "expand_coord_vocab"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", f"{tool}.py"), "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_hf.py"), "--checkpoint", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "nope" in r.stderr
    assert not (tmp_path / "o").exists()
