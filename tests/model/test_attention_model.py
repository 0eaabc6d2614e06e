"""ModelConfig.attention through the whole model: a tiny Qwen3-VL with 'blockwise' attention (text decoder and
ViT) gives the dense model's hidden states, parameter gradients and KV-cache greedy logits; the train config's
`model.attention` reaches the built model (random init and checkpoint alike)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _prompts import make_batch
from coordexp_jax.model.config import tiny_config
from coordexp_jax.model.inputs import build_model_inputs
from coordexp_jax.model.qwen3vl import Qwen3VL
from coordexp_jax.train import build, config as C
from coordexp_jax.train.checkpoint import fingerprint

VISION_KEYS = ("pixel_values", "vision_segment_ids", "vision_pos_taps", "vision_pos_weights", "vision_rope_rc",
               "visual_index")


@pytest.fixture(scope="module")
def case():
    cfg = tiny_config()
    model = Qwen3VL(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    model.config = model.config.replace(attention="blockwise")
    graphdef_bw, _ = nnx.split(model)
    # left padding (fully masked pad queries in row 1), three images packed into ViT slots (several segments each)
    rows = [[5, ("img", (1, 6, 8)), 7], [3, ("img", (1, 4, 4)), 2, ("img", (1, 2, 6)), 4]]
    ids, mask, items = make_batch(cfg, np.random.default_rng(7), rows)
    inp = build_model_inputs(ids, mask, config=cfg, pack=True, **items)
    assert (inp["vision_segment_ids"] == 1).any()  # at least one slot holds two images
    batch = {k: jnp.asarray(v) for k, v in inp.items() if k != "rope_deltas"}
    return graphdef, graphdef_bw, state, batch


@functools.partial(jax.jit, static_argnums=0)
def _hidden_and_grads(graphdef, state, batch, g):
    def loss(state):
        m = nnx.merge(graphdef, state)
        h = m(batch["input_ids"], batch["positions"], batch["attention_mask"], {k: batch[k] for k in VISION_KEYS})
        return jnp.sum(h * g * batch["attention_mask"][..., None]), h  # the loss sees real positions only
    (_, h), grads = jax.value_and_grad(loss, has_aux=True)(state)
    return h, grads


def test_blockwise_model_equals_dense(case):
    graphdef, graphdef_bw, state, batch = case
    g = jax.random.normal(jax.random.PRNGKey(1), batch["input_ids"].shape + (tiny_config().text.hidden_size,))
    h, grads = _hidden_and_grads(graphdef, state, batch, g)
    h_bw, grads_bw = _hidden_and_grads(graphdef_bw, state, batch, g)
    # float32 through 2 ViT blocks and 2 decoder layers, attention summed in another order: ~1e-7 of the largest
    # |value| seen; 1e-5 of it leaves ~50x margin on AVX2 and AVX-512 (a wrong mask changes values by O(1))
    valid = np.asarray(batch["attention_mask"]).astype(bool)
    h, h_bw = np.asarray(h), np.asarray(h_bw)
    np.testing.assert_allclose(h_bw[valid], h[valid], rtol=0, atol=1e-5 * np.abs(h[valid]).max())
    flat, flat_bw = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(grads_bw))
    assert flat.keys() == flat_bw.keys()
    assert max(float(jnp.abs(v.get_value()).max()) for k, v in flat.items() if "visual" in k) > 0  # ViT trained
    for k, v in flat.items():
        want, got = np.asarray(v.get_value()), np.asarray(flat_bw[k].get_value())
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max() + 1e-30, err_msg=str(k))


@functools.partial(jax.jit, static_argnums=0)
def _prefill(graphdef, state, batch):
    m = nnx.merge(graphdef, state)
    vis = {k: batch[k] for k in VISION_KEYS}
    return m.prefill(batch["input_ids"], batch["positions"], batch["attention_mask"], vis,
                     cache_len=batch["input_ids"].shape[1] + 2)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, logits, cache):
    return nnx.merge(graphdef, state).decode_step(jnp.argmax(logits, -1), None, cache)[0]


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(graphdef, state, h):
    return nnx.merge(graphdef, state).lm_logits(h[:, -1])


def test_blockwise_prefill_and_decode_equal_dense(case):
    """Prefill runs the configured implementation (its logits = the dense forward's last position); the decode step
    over the cache runs the dense path whatever the switch."""
    graphdef, graphdef_bw, state, batch = case
    g = jnp.zeros(batch["input_ids"].shape + (tiny_config().text.hidden_size,))
    want = np.asarray(_last_logits(graphdef, state, _hidden_and_grads(graphdef, state, batch, g)[0]))
    logits, cache = _prefill(graphdef_bw, state, batch)
    V = tiny_config().vocab_size
    # float32 logits of magnitude ~1: 1e-5 of the largest, as above
    np.testing.assert_allclose(np.asarray(logits)[:, :V], want[:, :V], rtol=0, atol=1e-5 * np.abs(want[:, :V]).max())
    np.testing.assert_array_equal(_decode(graphdef_bw, state, logits, cache), _decode(graphdef, state, logits, cache))


def test_train_config_model_attention_reaches_the_model():
    cfg = C.base_config()
    cfg.model.attention = "blockwise"
    cfg = C.validate(cfg)
    ids = build.token_ids(cfg)
    mc = build.model_config(cfg, ids)
    assert build.make_model_fn(cfg, mc, ids)[0]().config.attention == "blockwise"
    bad = C.base_config()
    bad.model.attention = "flash"
    with pytest.raises(C.ConfigError, match="model.attention"):
        C.validate(bad)
    # the implementation does not change the parameters: a run may resume with another one (but not another dtype)
    dense = C.validate(C.base_config())
    other = C.base_config()
    other.model.param_dtype = "bfloat16"
    assert fingerprint(cfg, 1000, []) == fingerprint(dense, 1000, []) != fingerprint(C.validate(other), 1000, [])
