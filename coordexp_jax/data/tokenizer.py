"""Tokenizers: the project's small offline tokenizer, loading from a local directory, and the frozen id table.

Real Qwen3-VL tokenizers come from a local HF directory (no hub access). For tests and the demo the project
builds its own small byte-level BPE tokenizer with the Qwen chat/vision special tokens, the `tags` protocol
tokens and the 1001 coordinate tokens, laid out as in the real expanded tokenizer: the wildcard `<|coord_*|>`
directly after the base vocabulary, then `<|coord_0|>`..`<|coord_999|>` contiguous
(`../shared/reference/coordexp_method.md` §1).

The coordinate and tag tokens are *plain* added tokens (`AddedToken(special=False, normalized=False)`, as Qwen's own
`<think>` / `<tool_call>`): they still tokenize as one id each, and `decode(ids, skip_special_tokens=True)` (vLLM's
default) keeps them. Tokenizers expanded by older versions registered them as special; `load_tokenizer` reads
those as plain (`unmark_special_files`), so decoding gives the same text either way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

from coordexp_jax.errors import CoordExpError

NUM_BINS = 1000
COORD_WILDCARD = "<|coord_*|>"

# Qwen special tokens that the chat format and the vision placeholders use (ids from the tokenizer, never hard-coded).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Special tokens of the `tags` protocol (coordexp_method.md §3).
TAG_TOKENS = ("<obj>", "</obj>", "<desc>", "</desc>", "<box>", "</box>")

# The token pair of sequential counting with regression heads (model/regression.py): the prompt ends with
# "<x> <y>" and the heads read the final hidden states there. Plain added tokens like the coordinate tokens.
REGRESSION_TOKENS = ("<x>", "<y>")

# Files of an HF tokenizer directory (what `load_tokenizer` reads).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja")

log = logging.getLogger(__name__)


class _NoTorchAdvice(logging.Filter):
    """Drops the line `transformers` logs when it is imported without PyTorch ("PyTorch was not found. Models won't
    be available ..."): the project uses transformers for tokenizers only (its models are JAX), so without torch
    the line is noise on every command. Any other transformers message passes; code that needs torch (the HF
    reference model in tests) fails on its own import when torch is absent."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "PyTorch was not found" not in record.getMessage()


# on the "transformers" logger itself (its import-time advice is logged there; a filter survives transformers
# resetting the logger's level), before any transformers import (coordexp_jax imports it via this module only)
if not any(isinstance(f, _NoTorchAdvice) for f in logging.getLogger("transformers").filters):
    logging.getLogger("transformers").addFilter(_NoTorchAdvice())

SMALL_TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "assets", "small_tokenizer")
# The small tokenizer plus `<x>`, `<y>` after its last id (every other id unchanged): the default tokenizer of
# train.kind 'counting_regression' (a separate directory, so that models trained on the small tokenizer keep
# matching its vocabulary size).
SMALL_XY_TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "assets", "small_tokenizer_xy")


def coord_token(k: int) -> str:
    """The text of coordinate token k (0 <= k < 1000)."""
    return f"<|coord_{k}|>"


def coord_tokens() -> list[str]:
    """All 1001 coordinate tokens in id order: the wildcard, then bins 0..999."""
    return [COORD_WILDCARD] + [coord_token(k) for k in range(NUM_BINS)]


# Tokens the project adds that must survive `decode(..., skip_special_tokens=True)`: coordinates and tags.
PLAIN_TOKENS = tuple(coord_tokens()) + TAG_TOKENS


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """Ids of every special token the project uses, looked up once from a tokenizer.

    `coord_start` is the id of `<|coord_0|>`; bin k has id `coord_start + k` (contiguous by construction and
    checked in `token_ids_from_tokenizer`), so coordinate logits are the static slice
    `logits[..., coord_start:coord_start + 1000]`. A tokenizer without coordinate tokens (a released, unexpanded
    one, read with `require_coords=False`) has `coord_start = coord_wildcard = -1`: `has_coords` is False, no id
    is a coordinate (`is_coord` all False, `coord_end == coord_start`, so `[coord_start, coord_end)` is empty)
    and `coord_id` raises.
    """

    vocab_size: int
    endoftext: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    coord_wildcard: int
    coord_start: int
    num_bins: int = NUM_BINS
    # `tags` protocol tokens; -1 where the tokenizer lacks them (then the tags protocol is unavailable).
    obj_open: int = -1
    obj_close: int = -1
    desc_open: int = -1
    desc_close: int = -1
    box_open: int = -1
    box_close: int = -1
    # `<x>` / `<y>` of sequential counting (REGRESSION_TOKENS); -1 where the tokenizer lacks them.
    x_token: int = -1
    y_token: int = -1

    @property
    def has_regression(self) -> bool:
        """Whether the tokenizer has the `<x>` / `<y>` pair of the regression heads."""
        return self.x_token >= 0 and self.y_token >= 0

    @property
    def pad(self) -> int:
        return self.endoftext

    @property
    def eos(self) -> int:
        """End of an assistant turn (the stop token of rollouts)."""
        return self.im_end

    @property
    def has_coords(self) -> bool:
        """Whether the tokenizer has the coordinate tokens (False: `coord_start == -1`)."""
        return self.coord_start >= 0

    @property
    def coord_end(self) -> int:
        """One past the id of `<|coord_999|>` (`coord_start` when there are no coordinate tokens: empty range)."""
        return self.coord_start + self.num_bins if self.has_coords else self.coord_start

    def coord_id(self, k):
        """Token id of bin k (int or array). Raises ValueError on a tokenizer without coordinate tokens."""
        if not self.has_coords:
            raise ValueError("the tokenizer has no coordinate tokens <|coord_0|>..<|coord_999|> (coord_start -1)")
        return self.coord_start + k

    def is_coord(self, ids):
        """True where ids are bin tokens `<|coord_0|>`..`<|coord_999|>` (the wildcard is not a bin); all False
        without coordinate tokens."""
        ids = np.asarray(ids)
        return (ids >= self.coord_start) & (ids < self.coord_end)

    def bin_of(self, ids):
        """Bin index of coordinate token ids (undefined for other ids)."""
        return np.asarray(ids) - self.coord_start

    @property
    def has_tags(self) -> bool:
        return min(self.obj_open, self.obj_close, self.desc_open, self.desc_close, self.box_open, self.box_close) >= 0


class TokenizerError(CoordExpError, ValueError):
    """A tokenizer that lacks what the configuration needs (a Qwen special token, the coordinate tokens of a
    coordinate-token protocol); the one-line message names the tokenizer's directory."""


def _vocab_id(tokenizer, token: str, *, required: bool = True) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is None or (unk is not None and tid == unk and token != tokenizer.unk_token):
        if required:
            raise TokenizerError(f"tokenizer {_name(tokenizer)} has no token {token!r}")
        return -1
    return int(tid)


def _name(tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or "(in memory)")


def token_ids_from_tokenizer(tokenizer, *, require_coords: bool = True, name: str | None = None) -> TokenIds:
    """Looks up every special id of `tokenizer`.

    `require_coords=False` (a protocol that writes coordinates as text, e.g. `qwen_text`) accepts a tokenizer
    without ANY coordinate token (a released, unexpanded one): `coord_start = coord_wildcard = -1`.
    Raises TokenizerError (one line naming `name`, default the tokenizer's `name_or_path`) when a Qwen special
    token is missing, when the coordinate tokens are required but absent, when only some of them are present, or
    when their ids are not one contiguous range.
    """
    where = name or _name(tokenizer)
    ids = {k: _vocab_id(tokenizer, t) for k, t in (
        ("endoftext", "<|endoftext|>"), ("im_start", "<|im_start|>"), ("im_end", "<|im_end|>"),
        ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>"),
        ("image_pad", "<|image_pad|>"), ("video_pad", "<|video_pad|>"))}
    wildcard = _vocab_id(tokenizer, COORD_WILDCARD, required=False)
    bins = np.array([_vocab_id(tokenizer, coord_token(k), required=False) for k in range(NUM_BINS)])
    tags = {k: _vocab_id(tokenizer, t, required=False) for k, t in zip(
        ("obj_open", "obj_close", "desc_open", "desc_close", "box_open", "box_close"), TAG_TOKENS)}
    tags.update({k: _vocab_id(tokenizer, t, required=False) for k, t in zip(("x_token", "y_token"), REGRESSION_TOKENS)})
    if wildcard < 0 and np.all(bins < 0):
        if require_coords:
            raise TokenizerError(
                f"tokenizer {where} has no coordinate tokens {COORD_WILDCARD}, <|coord_0|>..<|coord_999|>: the "
                f"coordjson/tags protocols need them (expand it with tools/expand_coord_vocab.py, or use "
                f"protocol 'qwen_text', which writes coordinates as text)")
        return TokenIds(vocab_size=len(tokenizer), coord_wildcard=-1, coord_start=-1, **ids, **tags)
    missing = [coord_token(k) for k in range(NUM_BINS) if bins[k] < 0] + ([COORD_WILDCARD] if wildcard < 0 else [])
    if missing:
        raise TokenizerError(f"tokenizer {where} has only some coordinate tokens: {len(missing)} missing, e.g. "
                             f"{missing[0]!r}")
    if not np.array_equal(bins, bins[0] + np.arange(NUM_BINS)):
        raise TokenizerError(f"tokenizer {where}: coordinate tokens <|coord_0|>..<|coord_999|> do not form one "
                             f"contiguous id range")
    return TokenIds(vocab_size=len(tokenizer), coord_wildcard=wildcard, coord_start=int(bins[0]), **ids, **tags)


def load_tokenizer(path: str):
    """Loads a tokenizer from a local directory (HF layout). Never touches the network.

    Coordinate/tag tokens registered as special (older expansions) are read as plain added tokens: the files are
    copied to a temporary directory, rewritten with `unmark_special_files` and loaded from there (same ids).
    Raises FileNotFoundError naming the directory.
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json / vocab.json) in {path}")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    marked = set(tok.all_special_tokens) & set(PLAIN_TOKENS)
    if not marked:
        return tok
    with tempfile.TemporaryDirectory(prefix="coordexp_tok_") as tmp:
        for fn in TOKENIZER_FILES + ("config.json",):
            if os.path.isfile(os.path.join(path, fn)):
                shutil.copy2(os.path.join(path, fn), os.path.join(tmp, fn))
        unmark_special_files(tmp)
        tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    tok.name_or_path = path  # errors name the user's directory, not the temporary copy
    log.info("%s: %d coordinate/tag tokens are registered as special (older expansion); read as plain added tokens",
             path, len(marked))
    return tok


def plain_token(content: str):
    """`AddedToken` of a coordinate/tag token: one id in any text, not special (kept by skip_special_tokens)."""
    from tokenizers import AddedToken

    return AddedToken(content, special=False, normalized=False, single_word=False, lstrip=False, rstrip=False)


def add_coord_tokens(tokenizer, *, with_tags: bool = False, with_regression: bool = False) -> int:
    """Adds the wildcard and the 1000 bin tokens (and optionally the tag tokens, then the `<x>` `<y>` pair of the
    regression heads) as plain added tokens (`plain_token`), in `coord_tokens()` order then `TAG_TOKENS` then
    `REGRESSION_TOKENS`, so the ids are contiguous.

    Returns the number of tokens added. Tokens already present are not added twice.
    """
    vocab = tokenizer.get_vocab()  # once: it is a fresh dict of the whole vocabulary per call
    want = coord_tokens() + (list(TAG_TOKENS) if with_tags else []) + (list(REGRESSION_TOKENS) if with_regression
                                                                        else [])
    new = [t for t in want if t not in vocab]
    return tokenizer.add_tokens([plain_token(t) for t in new]) if new else 0


def add_regression_tokens(tokenizer) -> int:
    """Adds `<x>` and `<y>` (plain added tokens, in that order, after the last id) where missing; returns how many
    were added."""
    vocab = tokenizer.get_vocab()
    new = [t for t in REGRESSION_TOKENS if t not in vocab]
    return tokenizer.add_tokens([plain_token(t) for t in new]) if new else 0


def unmark_special_files(tok_dir: str) -> int:
    """Rewrites the tokenizer files in `tok_dir` in place so that the coordinate and tag tokens are plain added
    tokens (`special: false`, `normalized: false` in tokenizer.json `added_tokens` and tokenizer_config.json
    `added_tokens_decoder`; dropped from the additional/extra special token lists). Ids and every other token are
    unchanged. Returns how many entries changed (0: nothing to do, no file written)."""
    plain = set(PLAIN_TOKENS)

    def content(x):
        return x.get("content") if isinstance(x, dict) else x

    def drop(lst):
        return [x for x in lst if content(x) not in plain]

    changed = 0
    for fn in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        p = os.path.join(tok_dir, fn)
        if not os.path.isfile(p):
            continue
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
        n = 0
        entries = d.get("added_tokens", []) if fn == "tokenizer.json" else list(d.get("added_tokens_decoder", {}).values())
        for a in entries:
            if a.get("content") in plain and (a.get("special") or a.get("normalized")):
                a["special"] = a["normalized"] = False
                n += 1
        for key in ("additional_special_tokens", "extra_special_tokens"):
            v = d.get(key)
            if isinstance(v, list) and len(drop(v)) != len(v):
                n += len(v) - len(drop(v))
                d[key] = drop(v)
            elif isinstance(v, dict) and any(content(x) in plain for x in v.values()):
                n += sum(content(x) in plain for x in v.values())
                d[key] = {k: x for k, x in v.items() if content(x) not in plain}
        if n:
            with open(p, "w", encoding="utf-8") as f:
                json.dump(d, f, indent=2, ensure_ascii=False)
            changed += n
    return changed


def _default_corpus() -> list[str]:
    """Text the small tokenizer is trained on: the words of prompts, referring phrases and the JSON protocol."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "magenta", "gray", "brown"]
    shapes = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "ellipse", "rectangle"]
    sizes = ["small", "large", "big", "tiny", "medium"]
    rel = ["left", "right", "top", "bottom", "leftmost", "rightmost", "topmost", "lowest", "largest", "smallest"]
    lines = []
    for c in colours:
        for s in shapes:
            lines.append(f'{{"objects": [{{"desc": "{c} {s}", "bbox_2d": [')
            for z in sizes:
                lines.append(f"the {z} {c} {s}")
            for r in rel:
                lines.append(f"the {r} {c} {s}")
    lines += [
        "system\nYou are a helpful assistant.",
        "user\nDetect all objects in the image. Answer in JSON.",
        "Locate every object in the image and output its bounding box.",
        "Find the object described by the phrase and give its bounding box: ",
        "Count the objects of this category in the image: ",
        "How many are there? Point to each one.",
        "assistant\n",
        '{"objects": []}',
        '{"count": 0123456789, "points": [',
        "person cat dog car bus bicycle chair table bottle cup bird horse sheep cow",
        "the man on the left holding a cup, a woman riding a bike, people, objects, image, photo",
        "0 1 2 3 4 5 6 7 8 9 10 100 1000 , . : ; ! ? ' \" ( ) [ ] { } - _ / \\ + = * & % $ # @",
    ]
    return lines


def build_small_tokenizer(out_dir: str | None = None, *, corpus: Iterable[str] | None = None, base_vocab_size: int = 640,
                          with_coords: bool = True, with_regression: bool = False):
    """Builds the project's small byte-level BPE tokenizer (deterministic) and returns it as a
    `transformers.PreTrainedTokenizerFast`; saves it to `out_dir` when given.

    Layout: byte-level BPE base tokens, then the Qwen specials, the tag tokens, `<|coord_*|>` and
    `<|coord_0|>`..`<|coord_999|>` (contiguous); tags and coordinates are plain added tokens (`plain_token`).
    `with_coords=False` leaves out the tag and coordinate tokens (the layout of a released, unexpanded
    tokenizer: only the Qwen specials after the base vocabulary). `with_regression=True` appends `<x>`, `<y>`
    (`SMALL_XY_TOKENIZER_DIR` is this build).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[])
    tok.train_from_iterator(list(corpus if corpus is not None else _default_corpus()), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS), clean_up_tokenization_spaces=False)
    if with_coords:
        fast.add_tokens([plain_token(t) for t in TAG_TOKENS + tuple(coord_tokens())])
    if with_regression:
        add_regression_tokens(fast)
    token_ids_from_tokenizer(fast, require_coords=with_coords)  # validates the layout
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        fast.save_pretrained(out_dir)
    return fast


def small_tokenizer():
    """The project's small tokenizer as shipped in `coordexp_jax/data/assets/small_tokenizer`."""
    return load_tokenizer(SMALL_TOKENIZER_DIR)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of plain text with no BOS/EOS added. Special-token strings inside `text` map to their ids."""
    return list(tokenizer.encode(text, add_special_tokens=False))


def decode_ids(tokenizer, ids: Sequence[int]) -> str:
    """Text of token ids, special tokens kept verbatim."""
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
