"""Config in/out, presets' parameter counts (abstract, no memory), logical sharding names, bf16 vs f32, remat."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _prompts import make_batch
from coordexp_jax.model.config import ConfigError, ModelConfig, tiny_config
from coordexp_jax.model.inputs import build_model_inputs, build_vision_inputs, get_rope_index
from coordexp_jax.model.qwen3vl import Qwen3VL, param_count
from coordexp_jax.model.sharding import LOGICAL_AXES, logical_partition_specs

# bf16 params + bf16 compute vs float32, tiny random model: max |dlogit| as a fraction of the largest float32
# |logit| (~1 here, so ~5 bf16 ulps; measured 0.0056): documented in docs/model.md
BF16_TOL = 0.02


@pytest.mark.parametrize("name,count", [("2b", 2_127_532_032), ("4b", 4_437_815_808), ("8b", 8_767_123_696)])
def test_preset_param_counts(name, count):
    assert param_count(ModelConfig.preset(name)) == count


def test_hf_config_forms():
    from transformers import Qwen3VLConfig

    cfg = ModelConfig.preset("8b")
    d = cfg.to_hf()
    assert ModelConfig.from_hf(d) == cfg
    # transformers accepts our dict and writes it back to something we read identically
    assert ModelConfig.from_hf(Qwen3VLConfig(**d).to_dict()) == cfg
    legacy = json.loads(json.dumps(d))
    rp = legacy["text_config"].pop("rope_parameters")
    legacy["text_config"]["rope_theta"] = rp["rope_theta"]
    legacy["text_config"]["rope_scaling"] = {"mrope_interleaved": True, "mrope_section": rp["mrope_section"], "rope_type": "default"}
    v = legacy["vision_config"]
    v["num_attention_heads"], v["num_hidden_layers"] = v.pop("num_heads"), v.pop("depth")
    v["model_type"] = "qwen3_vl"  # old vision model_type
    assert ModelConfig.from_hf(legacy) == cfg
    bad = json.loads(json.dumps(d))
    bad["model_type"] = "qwen2_vl"
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.from_hf(bad)
    bad = json.loads(json.dumps(d))
    bad["vision_config"]["out_hidden_size"] = 7
    with pytest.raises(ConfigError, match="out_hidden_size"):
        ModelConfig.from_hf(bad)
    assert cfg.padded_vocab_size == 152064 and tiny_config().padded_vocab_size == 1024


def test_logical_axis_names():
    abstract = nnx.eval_shape(lambda: Qwen3VL(ModelConfig.preset("2b")))
    specs = logical_partition_specs(nnx.state(abstract, nnx.Param))
    flat = {p: v.get_value() if hasattr(v, "get_value") else v for p, v in nnx.to_flat_state(specs)}
    names = {n for s in flat.values() for n in s if n is not None}
    assert names <= set(LOGICAL_AXES)
    assert tuple(flat[("language_model", "embed_tokens", "embedding")]) == ("vocab", "embed")
    # the 2b preset runs scanned: stacked layers carry the (never sharded) 'layers' axis first
    assert tuple(flat[("language_model", "layers", "self_attn", "k_proj", "kernel")]) == ("layers", "embed", "kv_heads")


def test_random_init_follows_initializer_range():
    # HF initialises every Linear/Embedding with std = initializer_range; ours must too (it used to ignore it)
    import dataclasses

    base = tiny_config()
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, initializer_range=0.1),
                              vision=dataclasses.replace(base.vision, initializer_range=0.05))
    m = Qwen3VL(cfg, rngs=nnx.Rngs(0))
    lm = m.language_model
    for w, want in [(lm.layers[0].self_attn.q_proj.kernel, 0.1), (lm.layers[2].mlp.down_proj.kernel, 0.1),
                    (lm.embed_tokens.embedding[: cfg.text.vocab_size], 0.1), (m.lm_head.kernel, 0.1),
                    (m.visual.blocks[0].attn.qkv.kernel, 0.05), (m.visual.patch_embed.kernel, 0.05),
                    (m.visual.merger.linear_fc2.kernel, 0.05)]:
        # statistical, not float: the sample std of >= 3072 normal draws is within ~1.3% (1 sigma; seen <= 0.6%)
        np.testing.assert_allclose(float(jnp.std(w[...])), want, rtol=0.08)
    default = Qwen3VL(base, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(float(jnp.std(default.language_model.layers[0].self_attn.q_proj.kernel[...])), 0.02,
                               rtol=0.08)


def test_vision_builder_matches_torch_interpolate():
    """pos-embed taps/weights reproduce F.interpolate(bilinear, align_corners=True) in block order."""
    import torch
    import torch.nn.functional as F

    S, D, h, w = 8, 3, 6, 10
    table = np.random.default_rng(0).standard_normal((S * S, D)).astype(np.float32)
    arrays, offs = build_vision_inputs([np.zeros((2 * h * w, 1536), np.float32), np.zeros((4 * 4, 1536), np.float32)],
                                       [(2, h, w), (1, 4, 4)], num_position_embeddings=S * S, pack=True,
                                       patches_per_slot=2 * h * w + 16)
    assert arrays["pixel_values"].shape[0] == 1 and offs == [0, 2 * h * w // 4]
    seg = arrays["vision_segment_ids"][0]
    assert list(np.unique(seg)) == [0, 1, 2]
    ref = F.interpolate(torch.from_numpy(table.reshape(S, S, D)).permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                        align_corners=True)[0].permute(1, 2, 0).numpy()  # [h,w,D]
    rc = arrays["vision_rope_rc"][0, :h * w]
    got = (table[arrays["vision_pos_taps"][0, :h * w]] * arrays["vision_pos_weights"][0, :h * w, :, None]).sum(1)
    # float32 bilinear blends of the table (4 taps, weights in [0, 1]): a few ulps of the largest entry
    np.testing.assert_allclose(got, ref[rc[:, 0], rc[:, 1]], atol=1e-5 * np.abs(table).max())
    # block order: every 4 consecutive patches form one 2x2 window
    assert (rc[:4] == [[0, 0], [0, 1], [1, 0], [1, 1]]).all() and (rc[4:8] == [[0, 2], [0, 3], [1, 2], [1, 3]]).all()


def test_rope_index_errors():
    with pytest.raises(ValueError, match="does not match"):
        get_rope_index(np.array([[1, 9, 9, 9, 2]]), None, np.array([[1, 4, 4]]), image_token_id=9, video_token_id=8)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, b):
    m = nnx.merge(graphdef, state)
    return m.lm_logits(m(b["input_ids"], b["positions"], b["attention_mask"], b["vision"]))


def test_bf16_close_to_f32():
    cfg = tiny_config()
    model = Qwen3VL(cfg, rngs=nnx.Rngs(1))
    ids, mask, items = make_batch(cfg, np.random.default_rng(0), [[5, ("img", (1, 6, 8)), 7]])
    inp = build_model_inputs(ids, mask, config=cfg, **items)
    vis = {k: jnp.asarray(v) for k, v in inp.items() if k.startswith("vision") or k in ("pixel_values", "visual_index")}
    b = dict(input_ids=jnp.asarray(ids), positions=jnp.asarray(inp["positions"]), attention_mask=jnp.asarray(mask), vision=vis)
    g, s = nnx.split(model)
    ref = np.asarray(_logits(g, s, b))[..., : cfg.vocab_size]
    m16 = Qwen3VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    g16, s16 = nnx.split(m16)
    s16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), s)  # same weights, rounded to bf16
    out = np.asarray(_logits(g16, s16, b))[..., : cfg.vocab_size]
    err = np.abs(out - ref).max()
    assert err <= BF16_TOL * np.abs(ref).max(), (err, np.abs(ref).max())
    assert err > 0  # it really ran in bf16

    print("bf16 max |dlogit|", err)


def test_remat_grads_equal():
    cfg = tiny_config()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 900, (1, 12)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (3, 1, 12))

    def loss(graphdef, state):
        m = nnx.merge(graphdef, state)
        return m.lm_logits(m(ids, pos, jnp.ones_like(ids))).mean()

    gr = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
    g, s = nnx.split(Qwen3VL(cfg, rngs=nnx.Rngs(1)))
    g_remat, s_remat = nnx.split(Qwen3VL(cfg, rngs=nnx.Rngs(1), remat=True))
    a, c = gr(g, nnx.state(s, nnx.Param)), gr(g_remat, nnx.state(s_remat, nnx.Param))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)):
        # the same float32 ops recomputed (XLA may fuse them differently): ulps of the leaf's largest gradient
        # (seen <= 3e-7 of it)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5 * np.abs(np.asarray(y)).max())
