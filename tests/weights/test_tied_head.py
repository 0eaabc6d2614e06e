"""The output head of an HF directory whose config.json and safetensors disagree, against transformers 5.23
(`PreTrainedModel.tie_weights`): a tied config with a differing lm_head.weight loads untied with that head (one
warning line); with an equal one, or with only lm_head.weight, it stays tied; an untied config without
lm_head.weight is one error line. convert_hf, training (`train.build`), predict (`load_checkpoint`), export and
vocabulary expansion all see the same head."""

import importlib.util
import json
import logging
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from coordexp_jax.model.config import tiny_config
from coordexp_jax.model.hf_reference import build_hf_model
from coordexp_jax.weights.checkpoint import checkpoint_config, load_checkpoint
from coordexp_jax.weights.hf import load_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMB, HEAD = "model.language_model.embed_tokens.weight", "lm_head.weight"
VOCAB = 1645  # the project's small tokenizer, so the training path can use this checkpoint
IDS = np.array([[1, 5, 9, 200, 17, 3, 800, 42, 1600]])


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cli(name, argv, capsys):
    from coordexp_jax.weights.cli import run

    code = run(_tool(name).main, argv)
    return code, capsys.readouterr().err.strip()


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tied"))
    build_hf_model(tiny_config(tie_word_embeddings=True, vocab_size=VOCAB), seed=21).save_pretrained(d)
    assert HEAD not in load_file(os.path.join(d, "model.safetensors"))
    return d


def _variant(tied_dir, dst, kind):
    """A copy of the tied directory with its tensors / config edited: differ, equal, head_only, untied_no_head."""
    shutil.copytree(tied_dir, dst)
    p = os.path.join(dst, "model.safetensors")
    t = load_file(p)
    if kind == "differ":  # a fine-tuned head: logits move by O(1)
        t[HEAD] = t[EMB] + np.random.default_rng(0).standard_normal(t[EMB].shape).astype(np.float32) * 0.5
    elif kind == "equal":
        t[HEAD] = t[EMB].copy()
    elif kind == "head_only":
        t[HEAD] = t.pop(EMB)
    elif kind == "untied_no_head":
        c = json.load(open(os.path.join(dst, "config.json")))
        c["tie_word_embeddings"] = False
        json.dump(c, open(os.path.join(dst, "config.json"), "w"))
    save_file(t, p, metadata={"format": "pt"})
    return str(dst)


@pytest.fixture(scope="module", params=["differ", "equal", "head_only"])
def case(request, tied_dir, tmp_path_factory):
    from transformers import Qwen3VLForConditionalGeneration

    d = _variant(tied_dir, tmp_path_factory.mktemp(request.param) / "d", request.param)
    ref, info = Qwen3VLForConditionalGeneration.from_pretrained(d, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return request.param, d, ref.eval()


def _hf_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(IDS)).logits.numpy()


def _our_logits(model, V):
    S = IDS.shape[1]
    pos = jnp.asarray(np.broadcast_to(np.arange(S), (3, 1, S)))
    return np.asarray(model.lm_logits(model(jnp.asarray(IDS), pos, jnp.ones((1, S), jnp.int32))))[..., :V]


def _head(model):
    """Our output head in HF layout [V, H]."""
    if model.lm_head is None:
        return np.asarray(model.language_model.embed_tokens.embedding[...])[:VOCAB]
    return np.asarray(model.lm_head.kernel[...]).T[:VOCAB]


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("coordexp_jax")]


def test_load_matches_transformers(case, caplog):
    kind, d, ref = case
    file = load_file(os.path.join(d, "model.safetensors"))
    # what transformers did: the file's lm_head is the head; it is tied only when equal to the embedding (or alone)
    ref_head = ref.lm_head.weight.detach().numpy()
    np.testing.assert_array_equal(ref_head, file[HEAD])
    assert (ref.lm_head.weight.data_ptr() == ref.model.language_model.embed_tokens.weight.data_ptr()) == (kind != "differ")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        cfg, model = load_hf_checkpoint(d)
    warns = _warnings(caplog)
    assert cfg.tie_word_embeddings == (kind != "differ")
    if kind == "differ":
        assert len(warns) == 1 and "\n" not in warns[0].getMessage(), warns
        assert HEAD in warns[0].getMessage() and "tie_word_embeddings" in warns[0].getMessage()
    else:
        assert not warns, [w.getMessage() for w in warns]
    np.testing.assert_array_equal(_head(model), ref_head)
    np.testing.assert_array_equal(np.asarray(model.language_model.embed_tokens.embedding[...])[:VOCAB],
                                  ref.model.language_model.embed_tokens.weight.detach().numpy())
    want = _hf_logits(ref)
    # float32 on both sides, H=64: accumulation-order differences are ~1e-7 relative (measured 4e-7 of max |logit|
    # ~15); a wrong head moves logits by O(1). 1e-5 of the largest logit holds on any x86 CPU (AVX2 or AVX-512).
    np.testing.assert_allclose(_our_logits(model, VOCAB), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_convert_predict_train_export_agree(case, tmp_path, capsys):
    from flax import nnx
    from transformers import Qwen3VLForConditionalGeneration

    from coordexp_jax.train import build, config as C

    kind, d, ref = case
    cfg, (_, state) = load_hf_checkpoint(d, return_state=True)
    want = nnx.to_pure_dict(state)
    assert checkpoint_config(d) == cfg
    # convert_hf, then load as evaluation / predict do
    ours = str(tmp_path / "ours")
    assert _cli("convert_hf", ["--hf_dir", d, "--out", ours], capsys)[0] == 0
    for src in (ours, d):  # predict.py: load_checkpoint(--checkpoint, dtype), ours or the HF dir
        cfg2, (_, st2) = load_checkpoint(src, jnp.float32, return_state=True)
        assert cfg2 == cfg and checkpoint_config(src) == cfg
        got = nnx.to_pure_dict(st2)
        assert sorted(got) == sorted(want) and ("lm_head" in got) == (kind == "differ")
        for a, b in zip(*(sorted(nnx.traversals.flatten_mapping(x).items()) for x in (got, want))):
            assert a[0] == b[0]
            np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]), err_msg=str(a[0]))
    # training: the model config and the model built from model.checkpoint
    tcfg = C.base_config()
    tcfg.model.checkpoint = d
    tcfg = C.validate(tcfg)
    ids = build.token_ids(tcfg)
    mc = build.model_config(tcfg, ids)
    assert mc == cfg
    model = build.make_model_fn(tcfg, mc, ids)[0]()
    np.testing.assert_array_equal(_head(model), ref.lm_head.weight.detach().numpy())
    # export: transformers reads it without a warning-worthy mismatch and computes the same logits
    out = str(tmp_path / "export")
    assert _cli("export_hf", ["--checkpoint", ours, "--out", out], capsys)[0] == 0
    re, info = Qwen3VLForConditionalGeneration.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert bool(re.config.tie_word_embeddings) == (kind != "differ")
    assert (HEAD in load_file(os.path.join(out, "model.safetensors"))) == (kind == "differ")
    np.testing.assert_array_equal(_hf_logits(re.eval()), _hf_logits(ref))


def test_expand_keeps_the_resolved_head(case, tmp_path):
    from transformers import Qwen3VLForConditionalGeneration

    from coordexp_jax.weights.vocab import expand_hf_dir

    kind, d, ref = case
    src = str(tmp_path / "src")
    shutil.copytree(d, src)
    n_base = _write_base_tokenizer(src)
    dst = str(tmp_path / "dst")
    info = expand_hf_dir(src, dst)
    assert info["n_base"] == n_base and info["new_vocab"] == VOCAB  # the spare rows are reused, no growth
    t = load_file(os.path.join(dst, "model.safetensors"))
    assert (HEAD in t) == (kind != "equal") and (EMB in t) == (kind != "head_only")
    assert json.load(open(os.path.join(dst, "config.json")))["tie_word_embeddings"] == (kind != "differ")
    a = load_file(os.path.join(src, "model.safetensors"))
    for k in t:  # every grown tensor: base rows kept, the added ids' rows = the mean of the base rows (init="mean")
        if k in (EMB, HEAD):
            np.testing.assert_array_equal(t[k][:n_base], a[k][:n_base])
            new = t[k][n_base:n_base + 1001]
            # the float64 mean (the reduction grow_rows uses) rounded once to float32: within half an ulp
            np.testing.assert_allclose(new, np.broadcast_to(a[k][:n_base].astype(np.float64).mean(0), new.shape),
                                       rtol=np.finfo(np.float32).eps, atol=0)
    re, li = Qwen3VLForConditionalGeneration.from_pretrained(dst, output_loading_info=True, attn_implementation="eager")
    assert not li["missing_keys"] and not li["unexpected_keys"] and not li["mismatched_keys"], li
    x = torch.from_numpy(IDS[:, IDS[0] < n_base])
    with torch.no_grad():
        before, after = ref(input_ids=x).logits.numpy(), re.eval()(input_ids=x).logits.numpy()
    # same float32 weights for the old rows, same shapes (the spare rows were reused), same torch code: equal up to
    # matmul blocking, a few ulps of the largest logit on any x86 CPU (AVX2 or AVX-512)
    np.testing.assert_allclose(after[..., :n_base], before[..., :n_base], rtol=0, atol=1e-6 * np.abs(before).max())
    cfg, model = load_hf_checkpoint(dst)
    assert cfg.tie_word_embeddings == (kind != "differ")
    np.testing.assert_array_equal(_head(model), re.lm_head.weight.detach().numpy())


def _write_base_tokenizer(out_dir):
    """A small byte-level BPE tokenizer with the Qwen specials and no coordinate tokens. Returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from coordexp_jax.data.tokenizer import QWEN_SPECIAL_TOKENS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a red circle left of a blue square"] * 4, trainer=trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(QWEN_SPECIAL_TOKENS))
    fast.save_pretrained(out_dir)
    return len(fast)


def test_untied_config_without_head_is_one_error_line(tied_dir, tmp_path, capsys):
    d = _variant(tied_dir, tmp_path / "src", "untied_no_head")
    out = tmp_path / "out"
    code, err = _cli("convert_hf", ["--hf_dir", d, "--out", str(out)], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert HEAD in err and "tie_word_embeddings" in err and not out.exists()
