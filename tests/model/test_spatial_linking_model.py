"""Spatial linking composed into Qwen3VL (links=None argument, `model.spatial_linking` add-on): parity with the plain
model, several images per sample, jit and prefill, gradients under LoRA with the vision tower frozen, the training
config section, and the export / load round trips (our checkpoint, the HF export, a training run's checkpoint)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from _prompts import make_batch
from test_spatial_linking import np_mask
from coordexp_jax.model.config import tiny_config
from coordexp_jax.model.inputs import build_model_inputs
from coordexp_jax.model.qwen3vl import Qwen3VL
from coordexp_jax.model.spatial_linking import (ATTR, LinkingConfig, SpatialLinking, attach_linking, linking_of,
                                                maybe_attach, token_geometry)
from coordexp_jax.train import config as C
from coordexp_jax.train import lora as lora_lib, optim
from coordexp_jax.train.objective import Stage1Objective, links_of, vision_inputs

CFG = tiny_config()
N = 4


def _batch():
    """Row 0: two images (4x6 and 4x4 patches) then text; row 1: one image (6x4), left-padded. Links at text
    positions after the images: row 0 -> image 0, image 1, their union on image 0, an empty slot; row 1 -> image 0
    and three empty slots (one naming an image the row does not have)."""
    ids, mask, items = make_batch(CFG, np.random.default_rng(0),
                                  [[3, ("img", (1, 4, 6)), 2, ("img", (1, 4, 4)), 8],
                                   [2, ("img", (1, 6, 4)), 6]])
    inp = build_model_inputs(ids, mask, config=CFG, **items)
    S = ids.shape[1]
    pos = np.array([[S - 6, S - 5, S - 4, -1], [S - 4, S - 3, -1, -1]], np.int32)
    boxes = np.array([[[0, 0, 64, 40], [30, 30, 64, 64], [0, 0, 96, 64], [0, 0, 0, 0]],
                      [[0, 40, 64, 96], [0, 0, 64, 64], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32)
    image = np.array([[0, 1, 0, 0], [0, 1, 0, 0]], np.int32)
    inp.update(link_pos=pos, link_boxes=boxes, link_image=image, link_kind=np.array([[0, 1, 2, 3], [0, 3, 3, 3]]))
    return {k: jnp.asarray(v) for k, v in inp.items()}


@pytest.fixture(scope="module")
def batch():
    return _batch()


def _random_linking(seed=1, **kw):
    m = SpatialLinking(LinkingConfig(hidden_size=CFG.text.hidden_size, heads=4, zero_init=False, **kw),
                       rngs=nnx.Rngs(seed))
    out = m.out.bias
    out[...] = jax.random.normal(jax.random.key(seed), out[...].shape) * 0.1
    return m


@functools.partial(jax.jit, static_argnums=(0, 3))
def _logits(graphdef, state, batch, with_links):
    m = nnx.merge(graphdef, state)
    hid = m(batch["input_ids"], batch["positions"], batch["attention_mask"], vision_inputs(batch),
            links_of(batch) if with_links else None)
    return m.lm_logits(hid)


@pytest.fixture(scope="module")
def models():
    plain = Qwen3VL(CFG, rngs=nnx.Rngs(0))
    linked = attach_linking(Qwen3VL(CFG, rngs=nnx.Rngs(0)), _random_linking())
    zero = attach_linking(Qwen3VL(CFG, rngs=nnx.Rngs(0)), _random_linking())  # same graph: one compile
    zero.spatial_linking.out.kernel[...] = jnp.zeros_like(zero.spatial_linking.out.kernel[...])
    zero.spatial_linking.out.bias[...] = jnp.zeros_like(zero.spatial_linking.out.bias[...])
    return plain, zero, linked


def _run(model, batch, with_links=True):
    g, s = nnx.split(model)
    return np.asarray(_logits(g, s, batch, with_links))


def test_parity_zero_output_projection_and_parameter_tree(models, batch):
    plain, zero, linked = models
    ref = _run(plain, batch, False)
    # the module's output projection at zero (its default init): logits exactly the plain model's
    np.testing.assert_array_equal(_run(zero, batch), ref)
    # links=None with a trained (non-zero) module: exactly the plain model too
    np.testing.assert_array_equal(_run(linked, batch, False), ref)
    # and the module does act when it is non-zero
    assert np.abs(_run(linked, batch) - ref).max() > 1e-4
    # the Qwen3-VL parameter tree is unchanged: same paths and values, plus one subtree spatial_linking/...
    flat = lambda m: {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}  # noqa: E731
    fp, fz = flat(plain), flat(zero)
    assert set(fp) <= set(fz) and all(k.startswith(ATTR + "/") for k in set(fz) - set(fp))
    assert all(np.array_equal(fp[k].get_value(), fz[k].get_value()) for k in fp)
    # config disabled (the default): no module, the plain tree
    cfg = C.validate(C.base_config())
    assert not cfg.model.spatial_linking.enabled
    m = maybe_attach(Qwen3VL(CFG, rngs=nnx.Rngs(0)), cfg)
    assert linking_of(m) is None and set(flat(m)) == set(fp)


def test_update_only_at_linked_tokens(models, batch):
    _, _, linked = models

    @jax.jit
    def embeds(s, b):
        m = nnx.merge(g, s)
        return m.embed(b["input_ids"], vision_inputs(b))[0], m.embed(b["input_ids"], vision_inputs(b), links_of(b))[0]

    g, s = nnx.split(linked)
    h0, h1 = embeds(s, batch)
    diff = np.abs(np.asarray(h1 - h0)).max(-1)
    usable = {(0, int(batch["link_pos"][0, n])) for n in range(3)} | {(1, int(batch["link_pos"][1, 0]))}
    assert {tuple(map(int, x)) for x in zip(*np.nonzero(diff))} == usable


def test_link_attention_several_images(models, batch):
    _, _, linked = models
    vis, links = vision_inputs(batch), links_of(batch)
    w = np.asarray(jax.jit(lambda g, s, b: nnx.merge(g, s).link_attention(b["input_ids"], vision_inputs(b),
                                                                           links_of(b)))(*nnx.split(linked), batch))
    assert w.shape == (2, N, 4, batch["input_ids"].shape[1])
    ti, tr = (np.asarray(x) for x in token_geometry(vis))
    mask = np_mask(ti, tr, *(np.asarray(links[k]) for k in ("pos", "boxes", "image")))
    sel = np.broadcast_to(mask[:, :, None], w.shape)
    assert np.all(w[~sel] == 0)
    np.testing.assert_allclose(w.sum(-1)[mask.any(-1)], 1.0, atol=1e-6)  # float32 sums of <= 24 weights
    # slot (0, 1) reads image 1 of row 0 only; slot (0, 0) image 0 only; row 1's image-1 slot nothing
    assert set(ti[0][mask[0, 1]]) == {1} and set(ti[0][mask[0, 0]]) == {0}
    assert not mask[1, 1].any() and mask[0, 2].sum() > mask[0, 0].sum()
    with pytest.raises(ValueError, match="no spatial-linking module"):
        models[0].link_attention(batch["input_ids"], vis, links)


def test_prefill_with_links_matches_forward(models, batch):
    _, _, linked = models
    vis, links = vision_inputs(batch), links_of(batch)
    g, s = nnx.split(linked)

    @jax.jit
    def pre(s, b):
        return nnx.merge(g, s).prefill(b["input_ids"], b["positions"], b["attention_mask"], vision_inputs(b),
                                       links_of(b), cache_len=b["input_ids"].shape[1] + 4)[0]

    full = _run(linked, batch)[:, -1]
    # the same float32 math on the last position: ulps of O(1) logits
    np.testing.assert_allclose(np.asarray(pre(s, batch)), full, atol=1e-5 * np.abs(full).max(), rtol=0)
    assert np.abs(full - _run(linked, batch, False)[:, -1]).max() > 1e-5  # the links reached the last position


def _train_cfg(**linking):
    c = C.base_config()
    c.lora.enabled = True
    c.optim.coord_rows.freeze = True
    c.optim.linking.lr_mult = 3.0
    c.model.spatial_linking.enabled = True
    c.model.spatial_linking.heads = 4
    for k, v in linking.items():
        c.model.spatial_linking[k] = v
    return C.validate(c)


def test_gradients_reach_module_and_lora_only(batch):
    cfg = _train_cfg(zero_init=False, dropout=0.0)
    model = maybe_attach(Qwen3VL(CFG, rngs=nnx.Rngs(0)), cfg, seed=2)
    lora_lib.apply_lora(model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha, nnx.Rngs(1))
    assert not any(isinstance(m, lora_lib.ScaledLoRA) for _, m in nnx.iter_graph(linking_of(model)))
    graphdef, params, frozen = nnx.split(model, optim.trainable_filter(cfg), ...)
    names = [optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    link_names = [n for n in names if n.startswith(ATTR + "/")]
    assert len(link_names) == len(jax.tree.leaves(nnx.state(linking_of(model), nnx.Param)))  # the whole module
    assert all(n.startswith(ATTR + "/") or "lora_" in n for n in names)  # nothing else trainable
    assert not any("visual" in n for n in names)  # vision frozen: no gradient, no optimizer state
    obj = Stage1Objective(weights={"ce": 1.0}, coord_start=-1, vocab_size=CFG.vocab_size)
    tb = dict(batch, targets=jnp.roll(batch["input_ids"], -1, axis=1), loss_mask=batch["attention_mask"] * 1.0,
              coord_mask=jnp.zeros_like(batch["attention_mask"], bool), box_valid=jnp.zeros((2, 1), bool))

    @jax.jit
    def grads(params, frozen, b):
        return jax.grad(lambda p: obj.sums(nnx.merge(graphdef, p, frozen), b)["ce"])(params)

    g = {optim.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(grads(params, frozen, tb))[0]}
    assert all(np.abs(g[n]).max() > 0 for n in link_names), [n for n in link_names if not np.abs(g[n]).max() > 0]
    assert all(np.abs(g[n]).max() > 0 for n in names if n.endswith("lora_b"))  # B gets gradients first (A @ 0)
    # no usable link (every slot empty): the module gets no gradient (the batch decides, through objective.links_of)
    nolink = dict(tb, link_pos=jnp.full_like(tb["link_pos"], -1))
    g0 = {optim.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(grads(params, frozen, nolink))[0]}
    assert all(np.all(g0[n] == 0) for n in link_names)
    # the optimizer's group 'linking' carries optim.linking.lr_mult; LoRA keeps its layer's group
    mults = {optim.path_str(p): m for p, m in jax.tree_util.tree_flatten_with_path(
        optim.multipliers(params, cfg, CFG.padded_vocab_size, -1))[0]}
    assert all(mults[n] == 3.0 for n in link_names) and all(mults[n] == 1.0 for n in names if "lora_" in n)


def test_config_section_validation():
    c = C.base_config()
    c.model.spatial_linking.dropout = 1.0
    with pytest.raises(C.ConfigError, match="model.spatial_linking.dropout"):
        C.validate(c)
    c = C.base_config()
    c.model.spatial_linking.dim = 30
    c.model.spatial_linking.heads = 4
    with pytest.raises(C.ConfigError, match="model.spatial_linking.heads"):
        C.validate(c)
    c = C.base_config()
    c.model.spatial_linking.head = 4
    with pytest.raises(C.ConfigError, match="did you mean 'model.spatial_linking.heads'"):
        C.validate(c)
    cfg = _train_cfg(heads=5)  # 5 does not divide the tiny model's 64: refused when the module is built
    with pytest.raises(C.ConfigError, match="model.spatial_linking.heads"):
        maybe_attach(Qwen3VL(CFG, rngs=nnx.Rngs(0)), cfg)


def test_checkpoint_and_hf_export_round_trip(models, batch, tmp_path):
    from coordexp_jax.weights.checkpoint import load_checkpoint, save_checkpoint
    from coordexp_jax.weights.safetensors_io import read_header

    sys_path = os.path.join(os.path.dirname(__file__), "..", "..", "tools")
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_hf", os.path.join(sys_path, "export_hf.py"))
    export_hf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_hf)

    _, _, linked = models
    want = _run(linked, batch)
    ours = str(tmp_path / "ours")
    save_checkpoint(ours, linked, CFG)
    assert {"spatial_linking.safetensors", "spatial_linking.json"} <= set(os.listdir(ours))
    _, back = load_checkpoint(ours)
    np.testing.assert_array_equal(_run(back, batch), want)  # float32 stored and read back: bit-exact
    hf = str(tmp_path / "hf")
    export_hf.main(["--checkpoint", ours, "--out", hf])
    meta = json.load(open(os.path.join(hf, "spatial_linking.json")))
    assert meta["heads"] == 4 and meta["hidden_size"] == CFG.text.hidden_size and meta["refine_mlp"]
    hdr, _ = read_header(os.path.join(hf, "spatial_linking.safetensors"))
    assert hdr["out.weight"]["shape"] == [CFG.text.hidden_size, CFG.text.hidden_size]  # torch [out, in]
    assert not any(k.startswith("spatial_linking") for k in read_header(os.path.join(hf, "model.safetensors"))[0])
    _, back = load_checkpoint(hf)
    np.testing.assert_array_equal(_run(back, batch), want)
    # a plain model's files stay as they were: no spatial_linking files
    plain = str(tmp_path / "plain")
    save_checkpoint(plain, models[0], CFG)
    assert not any(f.startswith("spatial_linking") for f in os.listdir(plain))
    assert linking_of(load_checkpoint(plain)[1]) is None


TRAIN_CONFIG = """
from coordexp_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.preset = "tiny"
    c.model.spatial_linking.enabled = True
    c.model.spatial_linking.heads = 4
    c.model.spatial_linking.zero_init = False
    c.lora.enabled = True
    c.data.kind = "jsonl"
    c.data.path = {path!r}
    c.data.image_size = 64
    c.data.seq_len = 128
    c.data.batch_size = 2
    c.data.num_eval = 0
    c.train.steps = 1
    c.train.progress = False
    c.train.tensorboard = False
    c.train.async_checkpoint = False
    c.eval.at_end = False
    return c
"""


@pytest.mark.slow
def test_training_run_saves_and_reloads_the_module(tmp_path, capsys):
    """The real training CLI (tiny Qwen3-VL, LoRA, spatial linking on): the run's checkpoint and its final_model
    carry the module (final_model: spatial_linking.safetensors + .json beside params/), and load_trained_model,
    load_checkpoint(final_model) and the HF export all give the same module values."""
    import shutil

    from coordexp_jax.train import __main__ as train_cli
    from coordexp_jax.train.export import load_trained_model
    from coordexp_jax.weights.checkpoint import load_checkpoint, load_linking
    from coordexp_jax.model.spatial_linking import linking_to_numpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copy(os.path.join(root, "fixtures", "data", "bad_inputs", "good.png"), tmp_path / "good.png")  # 64x48
    rec = {"images": ["good.png"], "width": 64, "height": 48, "objects": [{"desc": "cat", "bbox_2d": [4, 5, 30, 40]}]}
    (tmp_path / "d.jsonl").write_text((json.dumps(rec) + "\n") * 2)
    (tmp_path / "cfg.py").write_text(TRAIN_CONFIG.format(path=str(tmp_path / "d.jsonl")))
    wd = tmp_path / "run"
    assert train_cli.main(["train", "--config", str(tmp_path / "cfg.py"), "--workdir", str(wd)]) == 0
    assert {"spatial_linking.safetensors", "spatial_linking.json"} <= set(os.listdir(wd / "final_model"))
    _, model, step = load_trained_model(str(wd))
    _, final = load_checkpoint(str(wd / "final_model"))
    assert step == 1 and linking_of(model) is not None
    want = linking_to_numpy(linking_of(model))
    for got in (linking_to_numpy(linking_of(final)), linking_to_numpy(load_linking(str(wd / "final_model")))):
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_linking_files_errors_name_the_file(tmp_path):
    from coordexp_jax.weights.checkpoint import load_linking, save_linking
    from coordexp_jax.weights.names import WeightsError
    from coordexp_jax.weights.safetensors_io import write_file

    m = SpatialLinking(LinkingConfig(hidden_size=8, heads=2, dim=4), rngs=nnx.Rngs(0))
    assert load_linking(str(tmp_path)) is None  # no spatial_linking.json: no module
    save_linking(str(tmp_path), m)
    back = load_linking(str(tmp_path))
    assert back.cfg == m.cfg
    from coordexp_jax.model.spatial_linking import linking_to_numpy

    t = linking_to_numpy(m)
    for k, v in linking_to_numpy(back).items():
        np.testing.assert_array_equal(v, t[k])
    meta = json.loads((tmp_path / "spatial_linking.json").read_text())
    (tmp_path / "spatial_linking.json").write_text(json.dumps(dict(meta, heads=3)))  # 3 does not divide 4
    with pytest.raises(WeightsError, match=r"spatial_linking\.json: not a spatial-linking description"):
        load_linking(str(tmp_path))
    (tmp_path / "spatial_linking.json").write_text(json.dumps(meta))
    t["query.weight"] = t["query.weight"][:, :5]
    write_file(str(tmp_path / "spatial_linking.safetensors"), [(k, v.shape, v.dtype) for k, v in t.items()],
               lambda k: t[k])
    with pytest.raises(WeightsError, match=r"spatial_linking\.safetensors: tensor query\.weight has shape \(4, 5\)"):
        load_linking(str(tmp_path))
    os.remove(tmp_path / "spatial_linking.safetensors")
    with pytest.raises(WeightsError, match=r"spatial_linking\.safetensors: missing"):
        load_linking(str(tmp_path))
