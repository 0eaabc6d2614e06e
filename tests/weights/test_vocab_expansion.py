"""Coord-vocab expansion of an HF directory and in memory (coordexp_method.md §1); the text an expanded and
exported checkpoint decodes to with plain transformers."""

import importlib.util
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from coordexp_jax.data.tokenizer import QWEN_SPECIAL_TOKENS, TAG_TOKENS, coord_token, coord_tokens, load_tokenizer
from coordexp_jax.model.config import tiny_config
from coordexp_jax.model.hf_reference import build_hf_model
from coordexp_jax.weights.hf import load_hf_checkpoint
from coordexp_jax.weights.vocab import expand_hf_dir, expand_vocab_state

EMB = "model.language_model.embed_tokens.weight"


def _base_tokenizer(out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a red circle left of a blue square"] * 4, trainer=trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(QWEN_SPECIAL_TOKENS))
    fast.save_pretrained(out_dir)
    return len(fast)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def src(request, tmp_path_factory):
    cfg = tiny_config(tie_word_embeddings=request.param)
    model = build_hf_model(cfg, seed=5)
    d = str(tmp_path_factory.mktemp("vsrc"))
    model.save_pretrained(d)
    n_base = _base_tokenizer(d)
    return cfg, model, d, n_base


@pytest.mark.parametrize("init", ["mean", "normal"])
def test_expand_hf_dir(src, tmp_path, init):
    from transformers import Qwen3VLForConditionalGeneration

    cfg, model, d, n_base = src
    dst = str(tmp_path / "dst")
    info = expand_hf_dir(d, dst, init=init, seed=1)
    tok = load_tokenizer(dst)
    ids = np.array([tok.convert_tokens_to_ids(coord_token(k)) for k in range(1000)])
    np.testing.assert_array_equal(ids, ids[0] + np.arange(1000))  # one contiguous range
    assert ids[0] == n_base + 1 == info["coord_start"] and tok.convert_tokens_to_ids("<|coord_*|>") == n_base
    a, b = load_file(os.path.join(d, "model.safetensors")), load_file(os.path.join(dst, "model.safetensors"))
    assert info["new_vocab"] == n_base + 1001 and b[EMB].shape == (n_base + 1001, cfg.text.hidden_size)
    heads = [EMB] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    for k in a:
        if k not in heads:
            assert a[k].tobytes() == b[k].tobytes(), k  # untouched tensors are bitwise equal
    for k in heads:
        assert b[k][:n_base].tobytes() == a[k][:n_base].tobytes()  # old rows unchanged
        new = b[k][n_base:]
        if init == "mean":
            # the float64 mean (numpy, the same reduction as grow_rows) rounded once to the stored dtype: half an ulp
            mean = a[k][:n_base].astype(np.float64).mean(0)
            np.testing.assert_allclose(new, np.broadcast_to(mean, new.shape), rtol=np.finfo(new.dtype).eps, atol=0)
        else:  # statistical: >= 1001 x hidden draws of N(0, 0.02), sample std / mean far inside 10% of 0.02
            assert abs(new.std() - 0.02) < 0.002 and abs(new.mean()) < 0.002
    # transformers loads it; logits of old tokens on an old-token prompt are unchanged
    re = Qwen3VLForConditionalGeneration.from_pretrained(dst, attn_implementation="eager").eval()
    x = torch.tensor([[1, 7, 30, 2, 99, n_base - 1]])
    with torch.no_grad():
        before, after = model(input_ids=x).logits.numpy(), re(input_ids=x).logits.numpy()
    # the same float32 torch model with more rows (a wider lm_head matmul may block differently): a few ulps of
    # the largest logit (seen: bit-equal)
    np.testing.assert_allclose(after[..., :n_base], before[..., :n_base], rtol=0,
                               atol=1e-6 * np.abs(before[..., :n_base]).max())


def test_in_memory_matches_hf_dir(src, tmp_path):
    cfg, _, d, n_base = src
    dst = str(tmp_path / "dst")
    info = expand_hf_dir(d, dst, init="mean")
    cfg0, (_, state) = load_hf_checkpoint(d, return_state=True)
    pure, cfg1 = expand_vocab_state(state, cfg0, info["new_vocab"], range(n_base, info["new_vocab"]), n_base=n_base)
    cfg2, (_, state2) = load_hf_checkpoint(dst, return_state=True)
    assert cfg1 == cfg2 and cfg1.padded_vocab_size % 256 == 0
    from flax import nnx
    ref = nnx.to_pure_dict(state2)
    np.testing.assert_array_equal(np.asarray(pure["language_model"]["embed_tokens"]["embedding"]),
                                  np.asarray(ref["language_model"]["embed_tokens"]["embedding"]))
    if not cfg.tie_word_embeddings:
        np.testing.assert_array_equal(np.asarray(pure["lm_head"]["kernel"]), np.asarray(ref["lm_head"]["kernel"]))


# ------------------------------------------------------------ what an exported checkpoint decodes to
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COORDJSON = '{"objects": [{"desc": "red circle", "bbox_2d": [<|coord_0|>, <|coord_310|>, <|coord_410|>, <|coord_999|>]}]}'
TAGS = "<obj><desc>blue square</desc><box><|coord_1|><|coord_2|><|coord_3|><|coord_998|></box></obj>"


def _cli(name, argv):
    from coordexp_jax.weights.cli import run

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert run(mod.main, argv) == 0


@pytest.mark.parametrize("layout", ["coords", "coords+tags", "old_special"])
def test_exported_checkpoint_decodes_coordinates(src, tmp_path, layout):
    """expand_coord_vocab + export_hf, then transformers' own tokenizer: coordinate (and tag) tokens are one id
    each and survive decode with skip_special_tokens=True (vLLM's default) and False. `old_special`: a directory
    expanded by older versions (coordinates registered as special) exported with --tokenizer_dir."""
    from transformers import AutoTokenizer

    _, _, d, n_base = src
    exp, out = str(tmp_path / "expanded"), str(tmp_path / "export")
    _cli("expand_coord_vocab", ["--src", d, "--dst", exp] + (["--with_tags"] if layout == "coords+tags" else []))
    if layout == "old_special":
        old = AutoTokenizer.from_pretrained(d)
        old.add_special_tokens({"additional_special_tokens": coord_tokens()}, replace_extra_special_tokens=False)
        for f in os.listdir(exp):
            if f.startswith(("tokenizer", "special_tokens_map", "added_tokens")):
                os.remove(os.path.join(exp, f))
        old.save_pretrained(exp)
        old_ids = old.encode(COORDJSON, add_special_tokens=False)
        assert old.decode(old_ids, skip_special_tokens=True) != COORDJSON  # the fault this layout had
    _cli("export_hf", ["--checkpoint", exp, "--out", out, "--tokenizer_dir", exp])
    tok = AutoTokenizer.from_pretrained(out)
    text = COORDJSON + (TAGS if layout == "coords+tags" else "")
    ids = tok.encode(text, add_special_tokens=False)
    coord = [i for i in ids if n_base + 1 <= i < n_base + 1001]
    assert [tok.convert_ids_to_tokens(i) for i in coord] == [coord_token(k) for k in (0, 310, 410, 999)] + (
        [coord_token(k) for k in (1, 2, 3, 998)] if layout == "coords+tags" else [])
    if layout == "coords+tags":
        assert all(tok.convert_tokens_to_ids(t) in ids for t in TAG_TOKENS)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == text, skip
    # chat specials still go with skip_special_tokens=True
    wrapped = tok.encode("<|im_start|>" + text + "<|im_end|>", add_special_tokens=False)
    assert tok.decode(wrapped, skip_special_tokens=True) == text
