"""The batch-1 decode path of the tied LM head (`layers.row_logits`, used by `Qwen3VL.lm_logits` for one row on
CPU): against a float64 numpy product, and a batch-1 greedy rollout of a tied tiny model against transformers."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.special import log_softmax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "model"))
from _prompts import make_batch  # noqa: E402  (the model tests' prompt builder)

from coordexp_jax.data.tokenizer import TokenIds  # noqa: E402
from coordexp_jax.model.config import tiny_config  # noqa: E402
from coordexp_jax.model.hf_reference import build_hf_model, hf_kwargs  # noqa: E402
from coordexp_jax.model.inputs import build_model_inputs  # noqa: E402
from coordexp_jax.model.layers import row_logits  # noqa: E402
from coordexp_jax.rollout.sampler import Sampler, SamplerConfig  # noqa: E402
from coordexp_jax.weights.hf import load_hf_checkpoint  # noqa: E402

N_NEW = 12


@pytest.mark.parametrize("V,lead", [(1000, (1,)), (1000, (1, 1)), (999, (1,))])  # 999: the plain-einsum fallback
def test_row_logits_matches_float64_product(V, lead):
    H = 64
    rng = np.random.default_rng(V)
    h = rng.standard_normal(lead + (H,)).astype(np.float32)
    w = rng.standard_normal((V, H)).astype(np.float32)
    got = np.asarray(jax.jit(row_logits)(jnp.asarray(h), jnp.asarray(w)))
    assert got.shape == lead + (V,)
    ref = h.astype(np.float64) @ w.astype(np.float64).T
    # a float32 sum of H products is off by at most ~H * 2^-24 of sum |h_i w_vi| (any order, any x86 SIMD width);
    # 4x that bound per entry
    bound = 4 * H * 2.0 ** -24 * (np.abs(h).astype(np.float64) @ np.abs(w).astype(np.float64).T)
    assert np.all(np.abs(got - ref) <= bound)


def test_batch1_greedy_rollout_of_tied_model_matches_hf_generate(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    hf = build_hf_model(cfg, seed=3)
    hf.save_pretrained(str(tmp_path))
    _, model = load_hf_checkpoint(str(tmp_path))
    ids, mask, items = make_batch(cfg, np.random.default_rng(5), [[4, ("img", (1, 4, 6)), 3]])
    inp = build_model_inputs(ids, mask, config=cfg, **items)
    with torch.no_grad():
        out = hf.generate(**hf_kwargs(hf, ids, mask, **items), do_sample=False, max_new_tokens=N_NEW,
                          min_new_tokens=N_NEW, eos_token_id=None, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True)
    hf_toks = out.sequences[:, ids.shape[1]:].numpy()
    hf_logits = torch.stack(out.logits, 1).float().numpy()[0].astype(np.float64)
    tid = TokenIds(vocab_size=cfg.vocab_size, endoftext=0, im_start=1, im_end=-1,
                   vision_start=cfg.vision_start_token_id, vision_end=cfg.vision_end_token_id,
                   image_pad=cfg.image_token_id, video_pad=cfg.video_token_id, coord_wildcard=399, coord_start=400,
                   num_bins=500)
    got = Sampler(model, tid, SamplerConfig(max_new_tokens=N_NEW)).generate(inp)
    np.testing.assert_array_equal(got.tokens, hf_toks)
    # float32 logits agree with HF's to ~1e-6 of the largest |logit| (test_qwen3vl_parity); a log-prob moves by at
    # most twice that: 2e-4 of the scale leaves a wide margin
    ref_lp = log_softmax(hf_logits, -1)[np.arange(N_NEW), hf_toks[0]]
    np.testing.assert_allclose(got.logprobs[0], ref_lp, atol=2e-4 * max(1.0, np.abs(hf_logits).max()))
