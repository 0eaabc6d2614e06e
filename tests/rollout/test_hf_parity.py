"""The sampler on the real Qwen3VL against transformers `generate` (tiny random model, float32, all parameters
perturbed): greedy tokens, per-row stop, model log-probs and coordinate expectations from HF's own step logits,
for a left-padded batch with images of different sizes (and batch/prompt bucketing on top)."""

import dataclasses
import os
import sys

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, softmax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "model"))
from _prompts import make_batch  # noqa: E402  (the model tests' prompt builder)

from coordexp_jax.data.tokenizer import TokenIds  # noqa: E402
from coordexp_jax.model.config import tiny_config  # noqa: E402
from coordexp_jax.model.hf_reference import build_hf_model, hf_kwargs  # noqa: E402
from coordexp_jax.model.inputs import build_model_inputs  # noqa: E402
from coordexp_jax.rollout.sampler import Sampler, SamplerConfig  # noqa: E402
from coordexp_jax.weights.hf import load_hf_checkpoint  # noqa: E402

N_NEW = 16
ROWS = [[5, ("img", (1, 6, 8)), 7], [3, ("img", (1, 4, 4)), 2, ("img", (1, 2, 6)), 4], [9, ("img", (1, 4, 6)), 1]]


def _token_ids(cfg, stop):
    # tiny vocabulary: bins 0..499 at ids 400..899 (so some emitted tokens are coordinates and some are not)
    return TokenIds(vocab_size=cfg.vocab_size, endoftext=0, im_start=1, im_end=stop, vision_start=cfg.vision_start_token_id,
                    vision_end=cfg.vision_end_token_id, image_pad=cfg.image_token_id, video_pad=cfg.video_token_id,
                    coord_wildcard=399, coord_start=400, num_bins=500)


def _hf_generate(hf, ids, mask, items, eos):
    kw = dict(do_sample=False, max_new_tokens=N_NEW, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    kw.update(dict(eos_token_id=eos) if eos is not None else dict(min_new_tokens=N_NEW, eos_token_id=None))
    with torch.no_grad():
        out = hf.generate(**hf_kwargs(hf, ids, mask, **items), **kw)
    return out.sequences[:, ids.shape[1]:].numpy(), torch.stack(out.logits, 1).float().numpy()


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    cfg = tiny_config()
    hf = build_hf_model(cfg, seed=0)
    d = str(tmp_path_factory.mktemp("hf_rollout"))
    hf.save_pretrained(d)
    _, model = load_hf_checkpoint(d)
    ids, mask, items = make_batch(cfg, np.random.default_rng(11), ROWS)
    inp = build_model_inputs(ids, mask, config=cfg, **items)
    free, _ = _hf_generate(hf, ids, mask, items, None)
    stop = int(free[0, 6])  # a token row 0 emits mid-way becomes the stop token: rows stop at different steps
    toks, logits = _hf_generate(hf, ids, mask, items, stop)
    return cfg, model, inp, stop, toks, logits


def test_greedy_matches_hf_generate(case):
    cfg, model, inp, stop, hf_toks, hf_logits = case
    assert (inp["rope_deltas"] != 0).all()
    tid = _token_ids(cfg, stop)
    out = Sampler(model, tid, SamplerConfig(max_new_tokens=N_NEW)).generate(inp)
    T = hf_toks.shape[1]
    np.testing.assert_array_equal(out.tokens[:, :T], hf_toks)  # HF pads finished rows with pad_token_id = 0 too
    assert np.all(out.tokens[:, T:] == 0)
    stopped = (hf_toks == stop).any(1)
    assert stopped.any() and not stopped.all() or T == N_NEW
    np.testing.assert_array_equal(out.finished, stopped)
    lengths = np.where(stopped, np.argmax(hf_toks == stop, 1) + 1, N_NEW)
    np.testing.assert_array_equal(out.lengths, lengths)
    # model log-probs and coordinate expectations from HF's own step logits
    for b in range(len(ROWS)):
        n = lengths[b]
        lg = hf_logits[b, :n].astype(np.float64)
        ref_lp = log_softmax(lg, -1)[np.arange(n), hf_toks[b, :n]]
        # our float32 logits match HF's to ~1e-6 of the largest |logit| (test_qwen3vl_parity); a log-prob moves by
        # <= 2 max |dlogit| and an expectation in [0, 1] by about as much: 2e-4 / 1e-4 of that scale (seen 7e-7)
        scale = max(1.0, np.abs(lg).max())
        np.testing.assert_allclose(out.logprobs[b, :n], ref_lp, atol=2e-4 * scale)
        p = softmax(lg[:, 400:900], -1)
        chat = np.where(tid.is_coord(hf_toks[b, :n]), p @ (np.arange(500) / 499), np.nan)
        np.testing.assert_allclose(out.coord_expectation[b, :n], chat, atol=1e-4 * scale)


def test_real_model_second_batch_in_same_buckets_does_not_recompile(case):
    cfg, model, inp, stop, hf_toks, _ = case
    s = Sampler(model, _token_ids(cfg, stop), SamplerConfig(max_new_tokens=4))
    s.generate(inp)
    n = s.compile_count()
    assert n == 2  # one prefill, one decode loop
    # a different batch: 4 rows instead of 3, 3 images instead of 4, other image sizes and prompt length; same
    # buckets (B 4, S 32, image slots 4)
    ids, mask, items = make_batch(cfg, np.random.default_rng(5), [[4, ("img", (1, 4, 4)), 3], [7], [5, 2],
                                                                  [2, ("img", (1, 2, 8)), 6, ("img", (1, 2, 2)), 1]])
    inp2 = build_model_inputs(ids, mask, config=cfg, patches_per_slot=inp["pixel_values"].shape[1], **items)
    assert inp2["input_ids"].shape[1] != inp["input_ids"].shape[1]
    out = s.generate(inp2)
    assert s.compile_count() == n and out.tokens.shape == (4, 4)
