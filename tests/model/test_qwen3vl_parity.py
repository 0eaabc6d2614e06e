"""Parity of our Qwen3VL against a tiny random transformers Qwen3VLForConditionalGeneration (float32, all params
perturbed): forward logits, 3-D positions, and KV-cache greedy decoding vs HF generate."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from _prompts import make_batch
from coordexp_jax.model.config import tiny_config
from coordexp_jax.model.hf_reference import build_hf_model, hf_forward_logits, hf_kwargs
from coordexp_jax.model.inputs import build_model_inputs
from coordexp_jax.weights.hf import load_hf_checkpoint

# float32 vs torch float32 through the ViT and decoder: max |dlogit| ~5e-7 of the largest |logit| (~1 here) on
# AVX2 and AVX-512; TOL is 1e-4 of the largest |logit| (200x margin, far below a wrong rope/mask, >= 1e-2)
TOL = 1e-4


def _tol(ref):
    return TOL * np.abs(ref).max()


VISION_KEYS = ("pixel_values", "vision_segment_ids", "vision_pos_taps", "vision_pos_weights", "vision_rope_rc", "visual_index")


def _load(tmp_path_factory, tie):
    cfg = tiny_config(tie_word_embeddings=tie)
    hf = build_hf_model(cfg, seed=3 if tie else 0)
    d = str(tmp_path_factory.mktemp("hf_tied" if tie else "hf"))
    hf.save_pretrained(d)
    cfg2, (graphdef, state) = load_hf_checkpoint(d, return_state=True)
    assert cfg2 == cfg
    return cfg, hf, graphdef, state


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return _load(tmp_path_factory, False)


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return _load(tmp_path_factory, True)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, batch):
    m = nnx.merge(graphdef, state)
    vis = {k: batch[k] for k in VISION_KEYS} if "visual_index" in batch else None
    return m.lm_logits(m(batch["input_ids"], batch["positions"], batch["attention_mask"], vis))


def _ours(graphdef, state, inp):
    batch = {k: jnp.asarray(v) for k, v in inp.items() if k != "rope_deltas"}
    return np.asarray(_logits(graphdef, state, batch))


def _compare(setup, rows, seed=0):
    cfg, hf, graphdef, state = setup
    ids, mask, items = make_batch(cfg, np.random.default_rng(seed), rows)
    inp = build_model_inputs(ids, mask, config=cfg, **items)
    ref = hf_forward_logits(hf, ids, mask, **items)
    ours = _ours(graphdef, state, inp)
    assert np.all(ours[..., cfg.vocab_size:] < -1e30), "padded vocabulary ids must get -inf-like logits"
    valid = mask.astype(bool)
    diff = np.abs(ours[..., : cfg.vocab_size] - ref)[valid].max()
    assert diff <= _tol(ref[valid]), diff
    return inp, ref


def test_one_image(untied):
    _compare(untied, [[5, ("img", (1, 6, 8)), 7]])


def test_left_padded_batch_three_images_and_video(untied):
    rows = [[4, ("img", (1, 4, 6)), 3, ("img", (1, 6, 2)), 5],
            [3, ("img", (1, 2, 8)), 2, ("vid", (2, 4, 4)), 4]]
    inp, _ = _compare(untied, rows, seed=1)
    assert inp["attention_mask"][1].min() == 0 or inp["attention_mask"][0].min() == 0  # really padded


def test_text_only(untied):
    _compare(untied, [[20], [13]], seed=2)


def test_tied_one_image(tied):
    cfg, hf, graphdef, state = tied
    assert "lm_head" not in nnx.to_pure_dict(state)
    _compare(tied, [[5, ("img", (1, 6, 8)), 7], [3, ("img", (1, 4, 4)), 9]], seed=4)


def test_rope_index_matches_hf(untied):
    cfg, hf, _, _ = untied
    rows = [[4, ("img", (1, 4, 6)), 3, ("img", (1, 6, 2)), 5], [3, ("img", (1, 2, 8)), 2, ("vid", (3, 4, 4)), 4]]
    ids, mask, items = make_batch(cfg, np.random.default_rng(5), rows)
    inp = build_model_inputs(ids, mask, config=cfg, **items)
    kw = hf_kwargs(hf, ids, mask, **items)
    pos, deltas = hf.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], kw["image_grid_thw"],
                                          kw["video_grid_thw"], kw["attention_mask"])
    np.testing.assert_array_equal(inp["positions"], pos.numpy())
    np.testing.assert_array_equal(inp["rope_deltas"], deltas.numpy().reshape(-1))


# ------------------------------------------------------------------ KV-cache decoding
N_NEW = 32


@functools.partial(jax.jit, static_argnums=(0, 3))
def _prefill(graphdef, state, batch, cache_len):
    m = nnx.merge(graphdef, state)
    vis = {k: batch[k] for k in VISION_KEYS} if "visual_index" in batch else None
    return m.prefill(batch["input_ids"], batch["positions"], batch["attention_mask"], vis, cache_len=cache_len)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _decode(graphdef, state, tokens, positions, cache):
    return nnx.merge(graphdef, state).decode_step(tokens, positions, cache)


def _greedy(graphdef, state, inp, n, *, use_delta=True):
    batch = {k: jnp.asarray(v) for k, v in inp.items() if k != "rope_deltas"}
    S = inp["input_ids"].shape[1]
    logits, cache = _prefill(graphdef, state, batch, S + n)
    toks, steps = [], [np.asarray(logits)]
    n_valid = inp["attention_mask"].sum(1).astype(np.int32)
    for k in range(n - 1):
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
        toks.append(np.asarray(tok))
        pos = None if use_delta else jnp.asarray(n_valid + k)  # negative control: positions without the rope delta
        logits, cache = _decode(graphdef, state, tok, pos, cache)
        steps.append(np.asarray(logits))
    toks.append(np.asarray(jnp.argmax(logits, -1)))
    return np.stack(toks, 1), np.stack(steps, 1)


@pytest.fixture(scope="module")
def decode_case(untied):
    cfg, hf, graphdef, state = untied
    rows = [[5, ("img", (1, 6, 8)), 7], [3, ("img", (1, 4, 4)), 2, ("img", (1, 2, 6)), 4]]
    ids, mask, items = make_batch(cfg, np.random.default_rng(7), rows)
    inp = build_model_inputs(ids, mask, config=cfg, **items)
    with torch.no_grad():
        out = hf.generate(**hf_kwargs(hf, ids, mask, **items), do_sample=False, max_new_tokens=N_NEW,
                          min_new_tokens=N_NEW, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    hf_tokens = out.sequences[:, ids.shape[1]:].numpy()
    hf_logits = torch.stack(out.logits, 1).float().numpy()
    return cfg, graphdef, state, inp, hf_tokens, hf_logits


def test_greedy_decode_matches_hf_generate(decode_case):
    cfg, graphdef, state, inp, hf_tokens, hf_logits = decode_case
    assert (inp["rope_deltas"] != 0).all()
    toks, logits = _greedy(graphdef, state, inp, N_NEW)
    np.testing.assert_array_equal(toks, hf_tokens)
    assert np.abs(logits[..., : cfg.vocab_size] - hf_logits).max() <= _tol(hf_logits)


def test_negative_control_without_rope_delta_fails(decode_case):
    cfg, graphdef, state, inp, hf_tokens, hf_logits = decode_case
    toks, logits = _greedy(graphdef, state, inp, N_NEW, use_delta=False)
    # the first token comes from prefill and agrees; every later step must be visibly off
    assert np.abs(logits[:, 1:, : cfg.vocab_size] - hf_logits[:, 1:]).max() > 100 * _tol(hf_logits)
