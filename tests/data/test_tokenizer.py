import numpy as np
import pytest

from coordexp_jax.data import tokenizer as T


def test_shipped_small_tokenizer_equals_builder(tmp_path):
    built = T.build_small_tokenizer(str(tmp_path))
    shipped = T.small_tokenizer()
    assert built.get_vocab() == shipped.get_vocab()
    assert T.token_ids_from_tokenizer(built) == T.token_ids_from_tokenizer(shipped)


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
