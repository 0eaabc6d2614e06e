import json
import os
import shutil

import numpy as np
import pytest

from coordexp_jax.data import tokenizer as T


def _flags(tok):
    """content -> (id, special) of every added token."""
    return {a.content: (i, a.special) for i, a in tok.added_tokens_decoder.items()}


def test_shipped_small_tokenizer_equals_builder(tmp_path):
    built = T.build_small_tokenizer(str(tmp_path))
    shipped = T.small_tokenizer()
    assert built.get_vocab() == shipped.get_vocab()
    assert T.token_ids_from_tokenizer(built) == T.token_ids_from_tokenizer(shipped)
    assert _flags(built) == _flags(shipped)
    # the shipped files themselves (not only what load_tokenizer makes of them) register coords and tags as plain
    with open(os.path.join(T.SMALL_TOKENIZER_DIR, "tokenizer.json")) as f:
        special = {a["content"] for a in json.load(f)["added_tokens"] if a["special"]}
    assert special == set(T.QWEN_SPECIAL_TOKENS)


def test_coord_tokens_contiguous_and_single_tokens():
    tok = T.small_tokenizer()
    ids = T.token_ids_from_tokenizer(tok)
    assert ids.coord_wildcard == ids.coord_start - 1
    assert ids.coord_end == ids.vocab_size == len(tok)
    for k in (0, 1, 517, 999):
        assert T.encode_text(tok, T.coord_token(k)) == [ids.coord_id(k)]
    assert ids.is_coord([ids.coord_start, ids.coord_end - 1]).all()
    assert not ids.is_coord([ids.coord_wildcard, ids.coord_end, ids.im_end]).any()
    np.testing.assert_array_equal(ids.bin_of([ids.coord_id(3), ids.coord_id(999)]), [3, 999])
    assert ids.has_tags


def test_round_trip_text_with_specials():
    tok = T.small_tokenizer()
    s = ('<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Detect all objects.<|im_end|>\n'
         '<|im_start|>assistant\n{"objects": [{"desc": "red circle", "bbox_2d": [<|coord_110|>, <|coord_310|>, '
         '<|coord_410|>, <|coord_999|>]}]}<|im_end|>')
    assert T.decode_ids(tok, T.encode_text(tok, s)) == s


def test_missing_token_is_named():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")),
                                   unk_token="[UNK]")
    with pytest.raises(ValueError, match="<\\|endoftext\\|>"):
        T.token_ids_from_tokenizer(bare)


def test_load_tokenizer_bad_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        T.load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        T.load_tokenizer(str(tmp_path))


# --------------------------------------------------------- coordinate / tag tokens survive skip_special_tokens
ANSWER = ('{"objects": [{"desc": "red circle", "bbox_2d": [<|coord_0|>, <|coord_310|>, <|coord_410|>, <|coord_999|>]}]}'
          '<obj><desc>blue square</desc><box><|coord_1|><|coord_2|><|coord_3|><|coord_998|></box></obj><|coord_*|>')
PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Detect all objects.<|im_end|>\n<|im_start|>assistant\n"


def _old_style_dir(out_dir):
    """The small tokenizer as older versions expanded tokenizers: coordinates and tags added as special tokens."""
    from transformers import PreTrainedTokenizerFast

    old = PreTrainedTokenizerFast(tokenizer_object=_strip_added(T.small_tokenizer()), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=list(T.QWEN_SPECIAL_TOKENS),
                                  clean_up_tokenization_spaces=False)
    old.add_special_tokens({"additional_special_tokens": list(T.TAG_TOKENS) + T.coord_tokens()},
                           replace_extra_special_tokens=False)
    old.save_pretrained(out_dir)
    return old


def _strip_added(tok):
    """The backend tokenizer of `tok` without its added tokens (the BPE base only)."""
    from tokenizers import Tokenizer

    d = json.loads(tok.backend_tokenizer.to_str())
    d["added_tokens"] = []
    return Tokenizer.from_str(json.dumps(d))


def test_coords_and_tags_survive_skip_special_tokens():
    tok = T.small_tokenizer()
    ids = T.encode_text(tok, PROMPT + ANSWER)
    tid = T.token_ids_from_tokenizer(tok)
    assert tid.is_coord(ids).sum() == 8 and ids.count(tid.coord_wildcard) == 1  # one id per coordinate token
    assert tok.decode(ids, skip_special_tokens=False) == PROMPT + ANSWER
    # skip_special_tokens drops the chat/vision specials only
    assert tok.decode(ids, skip_special_tokens=True) == "user\nDetect all objects.\nassistant\n" + ANSWER
    assert not set(T.PLAIN_TOKENS) & set(tok.all_special_tokens)


def test_old_style_expansion_reads_the_same(tmp_path):
    old_dir = tmp_path / "old"
    old = _old_style_dir(str(old_dir))
    assert set(T.PLAIN_TOKENS) <= set(old.all_special_tokens)  # really the old layout
    assert old.decode(T.encode_text(old, ANSWER), skip_special_tokens=True) != ANSWER
    before = {f: (old_dir / f).read_bytes() for f in os.listdir(old_dir)}
    tok = T.load_tokenizer(str(old_dir))
    assert {f: (old_dir / f).read_bytes() for f in os.listdir(old_dir)} == before  # read, never rewritten
    new = T.small_tokenizer()
    assert tok.get_vocab() == new.get_vocab() and _flags(tok) == _flags(new)
    assert T.token_ids_from_tokenizer(tok) == T.token_ids_from_tokenizer(new)
    ids = T.encode_text(tok, PROMPT + ANSWER)
    assert ids == T.encode_text(new, PROMPT + ANSWER)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == new.decode(ids, skip_special_tokens=skip)
    assert T.decode_ids(tok, ids) == PROMPT + ANSWER
    assert tok.decode(ids, skip_special_tokens=True) == "user\nDetect all objects.\nassistant\n" + ANSWER
    # the file rewrite alone gives the new layout (what export_hf applies to copied tokenizer files)
    fixed = tmp_path / "fixed"
    shutil.copytree(old_dir, fixed)
    assert T.unmark_special_files(str(fixed)) == 2 * len(T.PLAIN_TOKENS)  # tokenizer.json + the special-token list
    assert T.unmark_special_files(str(fixed)) == 0
    from transformers import AutoTokenizer
    assert _flags(AutoTokenizer.from_pretrained(str(fixed))) == _flags(new)
