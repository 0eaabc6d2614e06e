"""Weights of scanned models (ModelConfig.scan_layers): HF -> scanned -> HF keeps every per-layer name and value,
and our orbax checkpoints record their layout and convert to the other one on load."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from coordexp_jax.model.config import tiny_config
from coordexp_jax.model.qwen3vl import Qwen3VL
from coordexp_jax.model.scan import stack_pure, unstack_pure
from coordexp_jax.weights.checkpoint import checkpoint_config, load_checkpoint, save_checkpoint
from coordexp_jax.weights.hf import load_hf_checkpoint, save_hf_checkpoint
from coordexp_jax.weights.names import name_table


def _pure(model_or_state):
    st = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    return jax.tree.map(np.asarray, nnx.to_pure_dict(st))


def _equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [jax.tree_util.keystr(k) for k, _ in fa] == [jax.tree_util.keystr(k) for k, _ in fb]
    for (k, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(k))  # copies: exact


def _tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """An HF directory of the tiny untied model, every parameter random (norms and biases too)."""
    cfg = tiny_config()
    model = Qwen3VL(cfg, rngs=nnx.Rngs(4))
    state = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(0)
    nnx.update(model, jax.tree.unflatten(tree, [x + rng.normal(0, 0.1, x.shape).astype(np.float32) for x in leaves]))
    d = str(tmp_path_factory.mktemp("hf"))
    save_hf_checkpoint(model, cfg, d, max_shard_bytes=200_000)  # several shards: an index file too
    return cfg, d


def test_hf_round_trip_through_scanned(hf_dir, tmp_path):
    cfg, d = hf_dir
    cfg_s, scan = load_hf_checkpoint(d, scan_layers=True)
    assert cfg_s.scan_layers and cfg_s == cfg
    k = scan.language_model.layers.self_attn.q_proj.kernel[...]
    assert k.shape == (cfg.text.num_hidden_layers, cfg.text.hidden_size, 64)
    _, loop = load_hf_checkpoint(d)
    _equal(_pure(scan), stack_pure(_pure(loop)))
    out = str(tmp_path / "out")
    save_hf_checkpoint(scan, cfg_s, out, max_shard_bytes=200_000)
    src, got = _tensors(d), _tensors(out)
    assert sorted(got) == sorted(src)  # the HF names stay per layer
    assert "model.language_model.layers.2.mlp.down_proj.weight" in got and "model.visual.blocks.1.attn.qkv.bias" in got
    for name in src:
        np.testing.assert_array_equal(got[name], src[name], err_msg=name)
    # the config argument's layout does not matter: the exporter reads it from the state
    out2 = str(tmp_path / "out2")
    save_hf_checkpoint(scan, cfg, out2)
    assert sorted(_tensors(out2)) == sorted(src)


def test_name_table_scanned_is_a_bijection_onto_the_same_names(hf_dir):
    cfg, _ = hf_dir
    loop, scan = name_table(cfg), name_table(cfg.replace(scan_layers=True))
    assert [e.hf for e in loop] == [e.hf for e in scan]
    e = next(e for e in scan if e.hf == "model.visual.blocks.1.norm2.bias")
    assert (e.path, e.layer) == (("visual", "blocks", "norm2", "bias"), 1)


def test_orbax_checkpoint_layouts(hf_dir, tmp_path):
    cfg, d = hf_dir
    _, scan = load_hf_checkpoint(d, scan_layers=True)
    _, loop = load_hf_checkpoint(d)
    ps, pl = str(tmp_path / "scan"), str(tmp_path / "loop")
    save_checkpoint(ps, scan, cfg)
    save_checkpoint(pl, loop, cfg)
    with open(os.path.join(ps, "model_config.json")) as f:
        assert json.load(f)["scan_layers"] is True
    assert checkpoint_config(ps).scan_layers and not checkpoint_config(pl).scan_layers
    c, m = load_checkpoint(ps)  # as saved
    assert c.scan_layers
    _equal(_pure(m), _pure(scan))
    c, m = load_checkpoint(ps, scan_layers=False)  # stacked -> per layer
    assert not c.scan_layers
    _equal(_pure(m), _pure(loop))
    c, m = load_checkpoint(pl, scan_layers=True)  # per layer -> stacked
    assert c.scan_layers
    _equal(_pure(m), _pure(scan))
    _equal(unstack_pure(_pure(scan)), _pure(loop))
