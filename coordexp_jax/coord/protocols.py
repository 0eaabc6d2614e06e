"""Answer protocols: serialise object lists to token ids and parse token ids back (coordexp_method.md §3).

Three protocols, all on token ids:

- `coordjson` (default), one line, desc first:
  `{"objects": [{"desc": "black cat", "bbox_2d": [<|coord_110|>, <|coord_310|>, <|coord_410|>, <|coord_705|>]}]}`
  The desc is a JSON string (escaped with `json.dumps`); the coordinate tokens are bare. No objects:
  `{"objects": []}`.
- `tags`: `<obj><desc>black cat</desc><box>` + 4 coordinate tokens + `</box></obj>`, repeated; no objects: empty.
- `qwen_text`: Qwen3-VL's own grounding answer, coordinates as text on its 0..1000 grid (`codec` qwen1000,
  c = q / 1000), so a released, unexpanded checkpoint can be trained and evaluated:
  `[{"bbox_2d": [110, 310, 411, 706], "label": "black cat"}]` (one line; no objects: `[]`). It needs no added
  token. Its ids are the tokenizer's own encoding of the whole text (what the model reads and writes), and each
  coordinate's position is the token carrying the number's first digit. The parser also accepts the answer inside
  a ```` ```json ```` fence, a bare object `{"bbox_2d": [...], "label": ...}` or several separated by commas, and
  either key order; a coordinate must be an integer 0..1000 (else `bad_coord`).

`serialize` returns the ANSWER BODY only: the ids above, WITHOUT the trailing `<|im_end|>` (the prompt builder
appends the end of turn and supervises it). The ids are the concatenation of the tokenizer's encodings of the
constant text pieces and of each desc (cached), with the coordinate ids spliced in directly; `decode_ids(ids)`
gives exactly the protocol text above.

`parse` works on token ids (a rollout, possibly with `<|im_end|>` and padding after it), never raises on any
input, never evaluates text (descs are decoded by `json.loads` of one string literal only), returns every
well-formed object with the positions of its 4 coordinate tokens, and counts what it dropped and why. Every
protocol gives the same `ParseResult`: `ParsedObject.bins` are always bins 0..999 (for `qwen_text` the nearest
bins of q / 1000) and `ParsedObject.box` / `ParseResult.boxes()` the exact normalised box as written.

Grounding answers are coordjson/tags object lists whose desc is the referring phrase (`serialize_grounding`).
Counting answers (coordjson only): `{"count": 3, "points": [[<|coord_x|>, <|coord_y|>], ...]}`
(`serialize_count`, `parse_count`).
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import json
import re
import weakref
from collections.abc import Sequence

import numpy as np

from coordexp_jax.coord import codec
from coordexp_jax.data.tokenizer import decode_ids, encode_text

PROTOCOLS = ("coordjson", "tags", "qwen_text")
COORD_TOKEN_PROTOCOLS = ("coordjson", "tags")  # answers whose coordinates are the <|coord_k|> bin tokens
ORDERS = ("sorted", "random", "given")

# Reasons an object (or a stretch of output) is dropped by `parse`.
REASONS = (
    "truncated",  # the output ended inside an object
    "bad_prefix",  # coordjson: the answer does not start with {"objects": [ (qwen_text: with [ or {)
    "bad_coord",  # a non-bin token (wildcard, text, number) where a coordinate token belongs; qwen_text: not an
    # integer 0..1000
    "wrong_coord_count",  # not exactly 4 coordinate tokens in a box
    "bad_desc",  # desc (qwen_text: label) missing, not a string, an invalid string literal, or with special tokens
    "missing_box",  # object without bbox_2d / <box>
    "duplicate_key",  # the same key twice in one object
    "unknown_key",  # coordjson: a key other than desc / bbox_2d (qwen_text: label / bbox_2d)
    "syntax",  # anything else that breaks the object
    "stray",  # tokens outside any object (between objects, or after the answer closed)
)


@dataclasses.dataclass(frozen=True)
class AnswerObject:
    """One object of an answer: a desc and a box, given either normalised (`box`, x1 y1 x2 y2 in [0, 1]) or as
    `bins` (4 ints in 0..999). Exactly one of the two."""

    desc: str
    box: tuple[float, float, float, float] | None = None
    bins: tuple[int, int, int, int] | None = None

    def to_bins(self, mode: str = "continuous") -> np.ndarray:
        if (self.box is None) == (self.bins is None):
            raise ValueError(f"AnswerObject {self.desc!r}: give exactly one of box= or bins=")
        if self.bins is not None:
            b = np.asarray(self.bins, np.int64)
            if b.shape != (4,) or b.min() < 0 or b.max() > codec.MAX_BIN:
                raise ValueError(f"AnswerObject {self.desc!r}: bins must be 4 ints in 0..999, got {self.bins}")
            return b.astype(np.int32)
        b = np.asarray(self.box, np.float64)
        if b.shape != (4,) or not np.all(np.isfinite(b)):
            raise ValueError(f"AnswerObject {self.desc!r}: box must be 4 finite numbers, got {self.box}")
        return codec.box_to_bins(b, mode)


def uses_coord_tokens(protocol: str) -> bool:
    """Whether the protocol writes coordinates as `<|coord_k|>` bin tokens (coordjson, tags), so coordinate
    losses, expectation decoding and box slots apply; `qwen_text` writes them as text."""
    return protocol in COORD_TOKEN_PROTOCOLS


@dataclasses.dataclass
class Serialized:
    """`ids`: the answer body (no `<|im_end|>`); `coord_positions [M,4]`: index into `ids` of each coordinate
    token (qwen_text: of the token carrying the number's first digit); `bins [M,4]` (bins 0..999; qwen_text: the
    nearest bins of q / 1000); `order [M]`: index into the input list of each emitted object; `descs`: in emitted
    order; `spans [M,2]`: [start, end) of each emitted object's tokens in `ids` (separators between objects
    excluded; qwen_text: tokens that carry any of the object's characters); `boxes [M,4]`: the normalised boxes as
    written (k / 999, or q / 1000 for qwen_text)."""

    ids: list[int]
    coord_positions: np.ndarray
    bins: np.ndarray
    order: np.ndarray
    descs: list[str]
    spans: np.ndarray | None = None
    boxes: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class ParsedObject:
    """`bins [4]` int32 in 0..999; `positions [4]` int32, indices into the parsed ids of the 4 coordinates;
    `norm [4]` float64, the exact normalised box when the protocol's grid is not the bins' (qwen_text: q / 1000),
    else None."""

    desc: str
    bins: np.ndarray  # [4] int32
    positions: np.ndarray  # [4] int32, indices into the parsed ids
    norm: np.ndarray | None = None

    @property
    def box(self) -> np.ndarray:
        """Normalised box as written: k / 999, or `norm` (q / 1000 for qwen_text)."""
        return codec.bins_to_box(self.bins) if self.norm is None else self.norm

    def __eq__(self, other):
        return (isinstance(other, ParsedObject) and self.desc == other.desc
                and np.array_equal(self.bins, other.bins) and np.array_equal(self.positions, other.positions)
                and (self.norm is None) == (other.norm is None)
                and (self.norm is None or np.array_equal(self.norm, other.norm)))


@dataclasses.dataclass
class ParseResult:
    """`objects`: every well-formed object in output order; `dropped`: reason -> count (see `REASONS`);
    `closed`: the answer's structure was completed (coordjson: the final `]}` seen; tags: not inside an object
    at the end); `end`: index of the first `<|im_end|>` / `<|endoftext|>` in the ids (or `len(ids)`);
    `has_eos`: whether such a token was found."""

    objects: list[ParsedObject]
    dropped: dict[str, int]
    closed: bool
    end: int
    has_eos: bool

    @property
    def num_dropped(self) -> int:
        return int(sum(self.dropped.values()))

    def bins(self) -> np.ndarray:
        return np.array([o.bins for o in self.objects], np.int32).reshape(-1, 4)

    def boxes(self) -> np.ndarray:
        """`[M, 4]` float64 normalised boxes as written (`ParsedObject.box`: exact for every protocol)."""
        return np.array([o.box for o in self.objects], np.float64).reshape(-1, 4)

    def positions(self) -> np.ndarray:
        return np.array([o.positions for o in self.objects], np.int32).reshape(-1, 4)

    def descs(self) -> list[str]:
        return [o.desc for o in self.objects]


# ------------------------------------------------------------------------------------------- cached pieces
class _Pieces:
    """Encoded constant pieces and a desc cache for one tokenizer."""

    DESC_CACHE = 65536

    def __init__(self, tokenizer, token_ids):
        enc = lambda s: tuple(encode_text(tokenizer, s))  # noqa: E731
        self.tokenizer = tokenizer
        self.json_open = enc('{"objects": [')
        self.json_close = enc("]}")
        self.obj_head = enc('{"desc": "')
        self.desc_tail = enc('", "bbox_2d": [')
        self.comma = enc(", ")
        self.obj_close = enc("]}")
        self.count_head = enc('{"count": ')
        self.points_head = enc(', "points": [')
        self.point_open = enc("[")
        self.point_close = enc("]")
        self._desc: collections.OrderedDict = collections.OrderedDict()
        added = sorted(tokenizer.get_added_vocab(), key=len, reverse=True)
        self.special_re = re.compile("|".join(re.escape(t) for t in added)) if added else None

    def text(self, s: str) -> tuple[int, ...]:
        hit = self._desc.get(s)
        if hit is None:
            hit = tuple(encode_text(self.tokenizer, s))
            self._desc[s] = hit
            if len(self._desc) > self.DESC_CACHE:
                self._desc.popitem(last=False)
        return hit

    def check_desc(self, desc) -> None:
        if not isinstance(desc, str):
            raise ValueError(f"object desc must be a str, got {type(desc).__name__}: {desc!r}")
        if self.special_re is not None and "<" in desc:
            m = self.special_re.search(desc)
            if m:
                raise ValueError(f"object desc {desc!r} contains the special token {m.group(0)!r}")


_PIECES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _pieces(tokenizer, token_ids) -> _Pieces:
    try:
        p = _PIECES.get(tokenizer)
        if p is None:
            p = _PIECES[tokenizer] = _Pieces(tokenizer, token_ids)
        return p
    except TypeError:  # not weak-referenceable: no cache
        return _Pieces(tokenizer, token_ids)


# -------------------------------------------------------------------------------------------- serialise
def object_order(bins: np.ndarray, order: str = "sorted", seed: int | None = None) -> np.ndarray:
    """Emission order of objects with `bins [M,4]`: `sorted` by (y1, x1) (ties: x2, y2, input index), `random`
    (a permutation from `seed`, required), `given`."""
    m = len(bins)
    if order == "given":
        return np.arange(m)
    if order == "sorted":
        b = np.asarray(bins).reshape(m, 4)
        return np.lexsort((np.arange(m), b[:, 3], b[:, 2], b[:, 0], b[:, 1])) if m else np.arange(0)
    if order == "random":
        if seed is None:
            raise ValueError("order='random' needs a seed (e.g. hash of (epoch, sample id)) to be deterministic")
        return np.random.default_rng(seed).permutation(m)
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def _check_protocol(protocol: str, token_ids) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "tags" and not token_ids.has_tags:
        raise ValueError("protocol 'tags' needs the tag tokens <obj> </obj> <desc> </desc> <box> </box> in the tokenizer")
    if uses_coord_tokens(protocol) and token_ids.coord_start < 0:
        raise ValueError(f"protocol {protocol!r} needs the coordinate tokens, which the tokenizer lacks (coord_start -1)")


def serialize(objects: Sequence[AnswerObject], tokenizer, token_ids, protocol: str = "coordjson",
              order: str = "sorted", seed: int | None = None, mode: str = "continuous") -> Serialized:
    """Object list -> answer-body token ids (no `<|im_end|>`) with the positions of every coordinate token.

    Boxes given as normalised floats are quantised with `codec.box_to_bins(box, mode)`. Raises ValueError naming
    the object on a bad box/bins or a desc containing special-token text.
    """
    _check_protocol(protocol, token_ids)
    p = _pieces(tokenizer, token_ids)
    if protocol == "qwen_text":
        return _serialize_qwen_text(objects, p, order, seed)
    m = len(objects)
    bins = np.zeros((m, 4), np.int32)
    for i, o in enumerate(objects):
        p.check_desc(o.desc)
        bins[i] = o.to_bins(mode)
    perm = object_order(bins, order, seed)
    cs = int(token_ids.coord_start)
    pos = np.zeros((m, 4), np.int32)
    spans = np.zeros((m, 2), np.int32)
    ids: list[int] = []
    if protocol == "coordjson":
        ids += p.json_open
        for n, idx in enumerate(perm):
            if n:
                ids += p.comma
            spans[n, 0] = len(ids)
            ids += p.obj_head
            ids += p.text(json.dumps(objects[idx].desc, ensure_ascii=False)[1:-1])
            ids += p.desc_tail
            for j in range(4):
                if j:
                    ids += p.comma
                pos[n, j] = len(ids)
                ids.append(cs + int(bins[idx, j]))
            ids += p.obj_close
            spans[n, 1] = len(ids)
        ids += p.json_close
    else:
        t = token_ids
        for n, idx in enumerate(perm):
            spans[n, 0] = len(ids)
            ids += (t.obj_open, t.desc_open)
            ids += p.text(objects[idx].desc)
            ids += (t.desc_close, t.box_open)
            for j in range(4):
                pos[n, j] = len(ids)
                ids.append(cs + int(bins[idx, j]))
            ids += (t.box_close, t.obj_close)
            spans[n, 1] = len(ids)
    return Serialized(ids=ids, coord_positions=pos, bins=bins[perm], order=np.asarray(perm, np.int64),
                      descs=[objects[i].desc for i in perm], spans=spans, boxes=codec.bins_to_box(bins[perm]))


def _qwen_values(o: AnswerObject, mode: str = "continuous") -> np.ndarray:
    """An object's 4 coordinates on the qwen1000 grid: a box rounded (q = round(1000 c)), bins via k / 999."""
    bins = o.to_bins(mode)  # validates (exactly one of box / bins, finite, in range)
    c = codec.bins_to_norm(bins) if o.bins is not None else np.asarray(o.box, np.float64)
    return codec.norm_to_qwen1000(c)


def _serialize_qwen_text(objects: Sequence[AnswerObject], p: _Pieces, order: str, seed: int | None) -> Serialized:
    """`[{"bbox_2d": [q, q, q, q], "label": "..."}, ...]` encoded as one text (the tokenizer's own tokens)."""
    m = len(objects)
    q = np.zeros((m, 4), np.int32)
    for i, o in enumerate(objects):
        p.check_desc(o.desc)
        q[i] = _qwen_values(o)
    perm = object_order(q, order, seed)
    # The tokenizer's normaliser (Qwen: NFC) is applied to the labels up front, so the text decodes as written.
    norm_fn = getattr(getattr(getattr(p.tokenizer, "backend_tokenizer", None), "normalizer", None), "normalize_str",
                      None)
    labels = [norm_fn(objects[i].desc) if norm_fn is not None else objects[i].desc for i in perm]
    text, starts, spans_c = "[", [], []
    for n, idx in enumerate(perm):
        if n:
            text += ", "
        begin = len(text)
        text += '{"bbox_2d": ['
        for j in range(4):
            if j:
                text += ", "
            starts.append(len(text))
            text += str(int(q[idx, j]))
        text += '], "label": ' + json.dumps(labels[n], ensure_ascii=False) + "}"
        spans_c.append((begin, len(text) - 1))
    text += "]"
    ids = encode_text(p.tokenizer, text)
    decoded, owner = _decode_with_owner(p.tokenizer, ids)
    if decoded != text:
        raise ValueError(f"the tokenizer does not give back the qwen_text answer: {text[:80]!r} -> {decoded[:80]!r}")
    pos = np.asarray([owner[c] for c in starts], np.int32).reshape(m, 4)
    spans = np.asarray([(owner[a], owner[b] + 1) for a, b in spans_c], np.int32).reshape(m, 2)
    norm = codec.qwen1000_to_norm(q[perm]).reshape(m, 4)
    return Serialized(ids=ids, coord_positions=pos, bins=codec.norm_to_bins(norm).reshape(m, 4),
                      order=np.asarray(perm, np.int64), descs=labels, spans=spans, boxes=norm)


def serialize_grounding(phrase: str, boxes, tokenizer, token_ids, protocol: str = "coordjson",
                        mode: str = "continuous", order: str = "sorted") -> Serialized:
    """Grounding answer: one or several normalised boxes `[N,4]` for a referring phrase, written as objects whose
    desc is the phrase (parse with `parse`)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return serialize([AnswerObject(phrase, tuple(b)) for b in boxes], tokenizer, token_ids, protocol, order, mode=mode)


def serialize_count(points, tokenizer, token_ids, mode: str = "continuous") -> Serialized:
    """Counting answer (coordjson only): `{"count": N, "points": [[<x>, <y>], ...]}` from normalised points
    `[N,2]`, emitted sorted by (y, x). `coord_positions` and `bins` are `[N,2]`."""
    p = _pieces(tokenizer, token_ids)
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"counting points must be finite, got {pts.tolist()}")
    bins = codec.norm_to_bins(pts)
    perm = np.lexsort((np.arange(len(bins)), bins[:, 0], bins[:, 1])) if len(bins) else np.arange(0)
    cs = int(token_ids.coord_start)
    ids = list(p.count_head) + list(p.text(str(len(pts)))) + list(p.points_head)
    pos = np.zeros((len(pts), 2), np.int32)
    for n, idx in enumerate(perm):
        if n:
            ids += p.comma
        ids += p.point_open
        pos[n, 0] = len(ids)
        ids.append(cs + int(bins[idx, 0]))
        ids += p.comma
        pos[n, 1] = len(ids)
        ids.append(cs + int(bins[idx, 1]))
        ids += p.point_close
    ids += p.json_close
    return Serialized(ids=ids, coord_positions=pos, bins=bins[perm], order=np.asarray(perm, np.int64),
                      descs=[])


# ------------------------------------------------------------------------------------------------- parse
# Units of a token stream: a str (one decoded character of ordinary text), or a tuple:
# ("C", bin, pos) a coordinate token, ("S", id, pos) any other special token.


_BYTE_DECODER: dict | None = None


def _byte_decoder() -> dict:
    """Byte-level BPE's printable stand-in character -> byte (GPT-2's table, as `transformers` builds it)."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        _BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}
    return _BYTE_DECODER


def _decode_with_owner(tokenizer, run: Sequence[int]) -> tuple[str, list[int]]:
    """`decode_ids(run)` and, per decoded character, the index in `run` of the token that completes it.

    Byte-level BPE tokens (Qwen's, the small tokenizer's) are mapped to their bytes and decoded incrementally;
    any other tokenizer (or a mismatch with `decode_ids`) falls back to decoding growing prefixes."""
    text = decode_ids(tokenizer, run)
    try:
        table = _byte_decoder()
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        owner: list[int] = []
        pieces: list[str] = []
        for i, tok in enumerate(tokenizer.convert_ids_to_tokens([int(t) for t in run])):
            pieces.append(dec.decode(bytes(table[ch] for ch in tok)))
            owner += [i] * len(pieces[-1])
        pieces.append(dec.decode(b"", final=True))
        owner += [len(run) - 1] * len(pieces[-1])
        if "".join(pieces) == text:
            return text, owner
    except (ImportError, KeyError, TypeError, ValueError):
        pass
    owner, done = [], 0
    for i in range(len(run)):
        n = len(decode_ids(tokenizer, run[:i + 1]))
        owner += [i] * max(0, n - done)
        done = max(done, n)
    owner = (owner + [len(run) - 1] * len(text))[:len(text)]
    return text, owner


def _units(ids: Sequence[int], tokenizer, token_ids, specials: frozenset, char_pos: list | None = None) -> list:
    """Units of `ids`; with `char_pos`, also appends per unit the index into `ids` of its token."""
    out: list = []
    run: list[int] = []
    run_pos: list[int] = []
    cs, ce = token_ids.coord_start, token_ids.coord_end

    def flush():
        if run:
            if char_pos is None:
                out.extend(decode_ids(tokenizer, run))
            else:
                text, owner = _decode_with_owner(tokenizer, run)
                out.extend(text)
                char_pos.extend(run_pos[o] for o in owner)
            run.clear()
            run_pos.clear()

    for pos, t in enumerate(ids):
        if 0 <= cs <= t < ce:  # a tokenizer without coordinate tokens has coord_start < 0
            flush()
            out.append(("C", t - cs, pos))
        elif t in specials:
            flush()
            out.append(("S", t, pos))
        else:
            run.append(t)
            run_pos.append(pos)
            continue
        if char_pos is not None:
            char_pos.append(pos)
    flush()
    return out


def _special_ids(tokenizer, token_ids) -> frozenset:
    p = _pieces(tokenizer, token_ids)
    sp = getattr(p, "_special_ids", None)
    if sp is None:
        sp = frozenset(int(i) for i in tokenizer.get_added_vocab().values())
        p._special_ids = sp
    return sp


def _clean_ids(ids, token_ids) -> tuple[list[int], int, bool]:
    """ints only; cut at the first end-of-turn / end-of-text."""
    try:
        arr = [int(t) for t in np.asarray(ids).reshape(-1)]
    except (TypeError, ValueError):
        return [], 0, False
    for i, t in enumerate(arr):
        if t == token_ids.im_end or t == token_ids.endoftext:
            return arr[:i], i, True
    return arr, len(arr), False


_WS = " \t\n\r"
_DIGITS = "0123456789"  # ASCII only (str.isdigit accepts '¹', which int() rejects)


class _Lexer:
    """JSON-ish lexemes over units: ("{",) ("}",) ("[",) ("]",) (":",) (",",) ("str", value|None)
    ("num", int, pos) ("coord", bin, pos) ("special", id, pos) ("junk", text) and ("eof",). A number's pos is the
    token of its first digit when `char_pos` (per unit, from `_units`) is given, else -1."""

    def __init__(self, units, char_pos: Sequence[int] | None = None):
        self.u = units
        self.cp = char_pos
        self.i = 0
        self.buf: list = []
        self.depth = 0  # bracket depth of the popped lexemes

    def _next(self):
        u, n = self.u, len(self.u)
        while self.i < n and isinstance(u[self.i], str) and u[self.i] in _WS:
            self.i += 1
        if self.i >= n:
            return ("eof",)
        x = u[self.i]
        if isinstance(x, tuple):
            self.i += 1
            return ("coord", x[1], x[2]) if x[0] == "C" else ("special", x[1], x[2])
        if x in "{}[]:,":
            self.i += 1
            return (x,)
        if x == '"':
            j = self.i + 1
            raw = []
            ok = True
            while j < n:
                y = u[j]
                if isinstance(y, tuple):
                    ok = False  # a special/coord token inside a string literal
                    raw.append("\x00")
                elif y == "\\":
                    raw.append(y)
                    if j + 1 < n and isinstance(u[j + 1], str):
                        raw.append(u[j + 1])
                        j += 1
                elif y == '"':
                    break
                else:
                    raw.append(y)
                j += 1
            if j >= n:
                self.i = n
                return ("unterminated",)
            self.i = j + 1
            if not ok:
                return ("str", None)
            try:
                return ("str", json.loads('"' + "".join(raw) + '"', strict=False))
            except (ValueError, RecursionError):
                return ("str", None)
        if x in _DIGITS:
            j = self.i
            while j < n and isinstance(u[j], str) and u[j] in _DIGITS:
                j += 1
            txt = "".join(u[self.i:j])
            pos = self.cp[self.i] if self.cp is not None else -1
            self.i = j
            return ("num", int(txt), pos) if len(txt) <= 9 else ("junk", txt)
        j = self.i
        while j < n and isinstance(u[j], str) and u[j] not in '{}[]:,"' and u[j] not in _WS:
            j += 1
        txt = "".join(u[self.i:max(j, self.i + 1)])
        self.i = max(j, self.i + 1)
        return ("junk", txt)

    def peek(self, k: int = 0):
        while len(self.buf) <= k:
            self.buf.append(self._next())
        return self.buf[k]

    def pop(self):
        x = self.peek()
        self.buf.pop(0)
        if x[0] in ("{", "["):
            self.depth += 1
        elif x[0] in ("}", "]"):
            self.depth -= 1
        return x


class _Fail(Exception):
    """A broken object; `done`: its closing brace was consumed (no resync needed)."""

    def __init__(self, reason, done: bool = False):
        self.reason = reason
        self.done = done


def _expect(lx: _Lexer, kind: str):
    t = lx.peek()
    if t[0] == kind:
        return lx.pop()
    raise _Fail("truncated" if t[0] in ("eof", "unterminated") else "syntax")


def _is_obj_start(lx: _Lexer) -> bool:
    return lx.peek()[0] == "{" and lx.peek(1)[0] == "str" and lx.peek(2)[0] == ":"


_OBJECT_KEYS = ("desc", "bbox_2d")


def _skip_value(lx: _Lexer) -> bool:
    """Skips one JSON-ish value: a scalar lexeme, or a bracketed structure whose brackets match by type (strings,
    numbers, words and coordinate tokens inside). True when skipped cleanly; False (stopped at the offending
    lexeme) at a mismatched closer, a special token or a missing value; `_Fail("truncated")` at the end."""
    t = lx.peek()
    if t[0] in ("eof", "unterminated"):
        raise _Fail("truncated")
    if t[0] not in ("{", "["):
        if t[0] in ("str", "num", "junk", "coord"):
            lx.pop()
            return True
        return False
    closers: list[str] = []
    while True:
        t = lx.peek()
        if t[0] in ("eof", "unterminated"):
            raise _Fail("truncated")
        if t[0] in ("{", "["):
            closers.append("}" if t[0] == "{" else "]")
        elif t[0] in ("}", "]"):
            if t[0] != closers[-1]:
                return False
            closers.pop()
        elif t[0] == "special":
            return False
        lx.pop()
        if not closers:
            return True


def _is_unknown_nested(lx: _Lexer, keys: Sequence[str] = _OBJECT_KEYS) -> bool:
    """At `"key": {` or `"key": [` with a key not in `keys`."""
    t = lx.peek()
    return (t[0] == "str" and t[1] not in keys and lx.peek(1)[0] == ":"
            and lx.peek(2)[0] in ("{", "["))


def _resync(lx: _Lexer, depth: float, skip_unknown: bool = True, keys: Sequence[str] = _OBJECT_KEYS) -> None:
    """Skip to the end of the broken object (bracket depth back to `depth`) or to the next object start.

    With `skip_unknown`, the value of an unknown key (`"parts": [{...}]`) is skipped whole when its brackets
    match, so objects nested in it are not taken for objects of the answer."""
    while True:
        t = lx.peek()
        if t[0] in ("eof", "unterminated") or _is_obj_start(lx):
            return
        if skip_unknown and _is_unknown_nested(lx, keys):
            lx.pop()
            lx.pop()
            try:
                _skip_value(lx)
            except _Fail:
                return
            if lx.depth <= depth:
                return
            continue
        lx.pop()
        if lx.depth <= depth:
            return


def _value_list(lx: _Lexer, n: int, kind: str, top: int | None = None) -> tuple[list[int], list[int]]:
    """`[v, v, ..., v]` with exactly n values of token kind `kind` -> (values, positions): coordinate tokens
    (`kind='coord'`, values = bins) or integers written as text (`kind='num'`, each in 0..top). A token of the
    other value kind, a string or a special token is a bad coordinate; a non-integer number after a text value
    (`12.5`, `1e3`) too."""
    _expect(lx, "[")
    vals, pos = [], []
    while True:
        t = lx.peek()
        if t[0] == kind:
            lx.pop()
            if top is not None and t[1] > top:
                raise _Fail("bad_coord")
            vals.append(t[1])
            pos.append(t[2])
        elif t[0] in ("eof", "unterminated"):
            raise _Fail("truncated")
        elif t[0] in ("num", "coord", "special", "str", "junk"):
            raise _Fail("bad_coord")
        else:
            raise _Fail("syntax")
        t = lx.peek()
        if t[0] == ",":
            lx.pop()
            continue
        if t[0] == "]":
            lx.pop()
            break
        if kind == "num" and t[0] == "junk":
            raise _Fail("bad_coord")
        raise _Fail("truncated" if t[0] in ("eof", "unterminated") else "syntax")
    if len(vals) != n:
        raise _Fail("wrong_coord_count")
    return vals, pos


@dataclasses.dataclass(frozen=True)
class _Dialect:
    """A JSON object protocol: its desc key and how its `bbox_2d` is read -> (bins, positions, norm or None)."""

    desc_key: str
    read_box: object

    @property
    def keys(self) -> tuple[str, str]:
        return (self.desc_key, "bbox_2d")


def _read_coord_box(lx: _Lexer):
    bins, pos = _value_list(lx, 4, "coord")
    return bins, pos, None


def _read_qwen_box(lx: _Lexer):
    q, pos = _value_list(lx, 4, "num", codec.QWEN_SCALE)
    norm = codec.qwen1000_to_norm(np.asarray(q, np.int64))
    return codec.norm_to_bins(norm), pos, norm


_COORDJSON = _Dialect("desc", _read_coord_box)
_QWEN_TEXT = _Dialect("label", _read_qwen_box)


def _json_object(lx: _Lexer, dialect: _Dialect = _COORDJSON) -> ParsedObject:
    """One `{"desc": ..., "bbox_2d": [...]}` object (qwen_text: `label`, and integers 0..1000). An unknown key drops the object (`unknown_key`, the first
    problem found in it) but its value, nested lists and objects included, is skipped whole so the object's end
    is found and the objects after it are kept."""
    _expect(lx, "{")
    desc, box = None, None
    seen = set()
    unknown = False
    try:
        while True:
            t = lx.peek()
            if t[0] == "}":
                lx.pop()
                break
            key = _expect(lx, "str")[1]
            _expect(lx, ":")
            if key in seen:
                _skip_value(lx)
                raise _Fail("duplicate_key")
            seen.add(key)
            if key == dialect.desc_key:
                v = lx.peek()
                if v[0] in ("eof", "unterminated"):
                    raise _Fail("truncated")
                lx.pop()
                if v[0] != "str" or v[1] is None:
                    raise _Fail("bad_desc")
                desc = v[1]
            elif key == "bbox_2d":
                box = dialect.read_box(lx)
            else:
                unknown = True
                if not _skip_value(lx):
                    raise _Fail("unknown_key")
            t = lx.peek()
            if t[0] == ",":
                lx.pop()
            elif t[0] != "}":
                raise _Fail("truncated" if t[0] in ("eof", "unterminated") else "syntax")
    except _Fail as f:
        if unknown and f.reason != "truncated":
            raise _Fail("unknown_key") from None
        raise
    if unknown:
        raise _Fail("unknown_key", done=True)
    if desc is None:
        raise _Fail("bad_desc", done=True)
    if box is None:
        raise _Fail("missing_box", done=True)
    norm = None if box[2] is None else np.asarray(box[2], np.float64)
    return ParsedObject(desc, np.asarray(box[0], np.int32), np.asarray(box[1], np.int32), norm)


def _parse_coordjson(units) -> tuple[list[ParsedObject], collections.Counter, bool]:
    lx = _Lexer(units)
    dropped: collections.Counter = collections.Counter()
    objs: list[ParsedObject] = []
    try:
        _expect(lx, "{")
        if _expect(lx, "str")[1] != "objects":
            raise _Fail("bad_prefix")
        _expect(lx, ":")
        _expect(lx, "[")
    except _Fail as f:
        if lx.peek()[0] in ("eof", "unterminated") and f.reason == "truncated":
            return objs, collections.Counter({"truncated": 1}) if units else dropped, False
        dropped["bad_prefix"] += 1
        _resync(lx, -float("inf"), skip_unknown=False)  # find the first object anywhere
    closed = False
    while True:
        t = lx.peek()
        if t[0] in ("eof", "unterminated"):
            break
        if t[0] == "]":
            lx.pop()
            if lx.peek()[0] == "}":
                lx.pop()
                closed = True
                break
            dropped["syntax"] += 1
            continue
        if t[0] == ",":
            lx.pop()
            continue
        if t[0] != "{":
            dropped["stray"] += 1
            while lx.peek()[0] not in ("{", "]", "eof", "unterminated"):
                lx.pop()
            continue
        d0 = lx.depth
        try:
            objs.append(_json_object(lx))
        except _Fail as f:
            dropped[f.reason] += 1
            if not f.done:
                _resync(lx, d0)
    if closed:
        extra = 0
        while lx.peek()[0] not in ("eof",):
            lx.pop()
            extra += 1
        if extra:
            dropped["stray"] += 1
    return objs, dropped, closed


def _is_fence(t) -> bool:
    return t[0] == "junk" and t[1].startswith("```")


def _parse_qwen_text(units, char_pos) -> tuple[list[ParsedObject], collections.Counter, bool]:
    """`[obj, ...]`, optionally inside a ```` ```json ```` fence; a bare object (or several, comma-separated) is
    accepted too. Anything before the answer is `bad_prefix` (objects are still found), after it `stray`."""
    lx = _Lexer(units, char_pos)
    dropped: collections.Counter = collections.Counter()
    objs: list[ParsedObject] = []
    if _is_fence(lx.peek()):
        lx.pop()
    t = lx.peek()
    if t[0] in ("eof", "unterminated"):
        return objs, collections.Counter({"truncated": 1}) if units else dropped, False
    bare = t[0] == "{"
    if t[0] == "[":
        lx.pop()
    elif not bare:
        dropped["bad_prefix"] += 1
        _resync(lx, -float("inf"), skip_unknown=False)  # find the first object anywhere
    closed = fence = False
    while True:
        t = lx.peek()
        if t[0] in ("eof", "unterminated") or _is_fence(t):
            fence = _is_fence(t)
            if fence:
                lx.pop()
            closed = bare and not dropped["truncated"]
            break
        if t[0] == "]" and not bare:
            lx.pop()
            closed = True
            break
        if t[0] == ",":
            lx.pop()
            continue
        if t[0] != "{":
            dropped["stray"] += 1
            lx.pop()  # at least one lexeme (a bare answer's "]" is stray too)
            while lx.peek()[0] not in ("{", "]", "eof", "unterminated") and not _is_fence(lx.peek()):
                lx.pop()
            continue
        d0 = lx.depth
        try:
            objs.append(_json_object(lx, _QWEN_TEXT))
        except _Fail as f:
            dropped[f.reason] += 1
            if not f.done:
                _resync(lx, d0, keys=_QWEN_TEXT.keys)
    if closed and not fence and _is_fence(lx.peek()):
        lx.pop()  # the closing fence
    if closed and lx.peek()[0] != "eof":
        dropped["stray"] += 1
    return objs, dropped, closed


def _parse_tags(units, token_ids, tokenizer) -> tuple[list[ParsedObject], collections.Counter, bool]:
    t = token_ids
    dropped: collections.Counter = collections.Counter()
    objs: list[ParsedObject] = []
    n = len(units)
    i = 0

    def is_tok(u, tid):
        return isinstance(u, tuple) and u[0] == "S" and u[1] == tid

    def skip_ws(j):
        while j < n and isinstance(units[j], str) and units[j] in _WS:
            j += 1
        return j

    closed = True
    while True:
        i = skip_ws(i)
        if i >= n:
            break
        if not is_tok(units[i], t.obj_open):
            dropped["stray"] += 1
            while i < n and not is_tok(units[i], t.obj_open):
                i += 1
            continue
        # one object
        j = skip_ws(i + 1)
        reason = None
        try:
            if j >= n:
                raise _Fail("truncated")
            if not is_tok(units[j], t.desc_open):
                raise _Fail("bad_desc")
            j += 1
            chars = []
            while j < n and isinstance(units[j], str):
                chars.append(units[j])
                j += 1
            if j >= n:
                raise _Fail("truncated")
            if not is_tok(units[j], t.desc_close):
                raise _Fail("bad_desc")
            desc = "".join(chars)
            j = skip_ws(j + 1)
            if j >= n:
                raise _Fail("truncated")
            if not is_tok(units[j], t.box_open):
                raise _Fail("missing_box")
            j = skip_ws(j + 1)
            bins, pos = [], []
            while j < n and not is_tok(units[j], t.box_close):
                u = units[j]
                if isinstance(u, tuple) and u[0] == "C":
                    bins.append(u[1])
                    pos.append(u[2])
                elif isinstance(u, str) and u in _WS:
                    pass
                elif is_tok(u, t.obj_open) or is_tok(u, t.obj_close):
                    raise _Fail("syntax")
                else:
                    raise _Fail("bad_coord")
                j += 1
            if j >= n:
                raise _Fail("truncated")
            if len(bins) != 4:
                raise _Fail("wrong_coord_count")
            j = skip_ws(j + 1)
            if j >= n:
                raise _Fail("truncated")
            if not is_tok(units[j], t.obj_close):
                raise _Fail("syntax")
            objs.append(ParsedObject(desc, np.asarray(bins, np.int32), np.asarray(pos, np.int32)))
            i = j + 1
        except _Fail as f:
            reason = f.reason
        if reason is not None:
            dropped[reason] += 1
            if reason == "truncated":
                closed = False
                break
            # resync: after the next </obj>, or at the next <obj>
            j = i + 1
            while j < n and not is_tok(units[j], t.obj_open) and not is_tok(units[j], t.obj_close):
                j += 1
            i = j + 1 if j < n and is_tok(units[j], t.obj_close) else j
    return objs, dropped, closed


def parse(ids, tokenizer, token_ids, protocol: str = "coordjson") -> ParseResult:
    """Token ids of an answer (may include `<|im_end|>` and anything after it) -> `ParseResult`.

    Never raises on model output: an unknown protocol or a tokenizer without tag tokens are programming errors
    and do raise ValueError.
    """
    _check_protocol(protocol, token_ids)
    clean, end, has_eos = _clean_ids(ids, token_ids)
    specials = _special_ids(tokenizer, token_ids)
    try:
        if protocol == "qwen_text":
            char_pos: list[int] = []
            units = _units(clean, tokenizer, token_ids, specials, char_pos)
            objs, dropped, closed = _parse_qwen_text(units, char_pos)
        else:
            units = _units(clean, tokenizer, token_ids, specials)
            if protocol == "coordjson":
                objs, dropped, closed = _parse_coordjson(units)
            else:
                objs, dropped, closed = _parse_tags(units, token_ids, tokenizer)
    except Exception:  # noqa: BLE001 — a parser bug must not crash a rollout; counted instead
        objs, dropped, closed = [], collections.Counter({"internal_error": 1}), False
    return ParseResult(objects=objs, dropped=dict(dropped), closed=closed, end=end, has_eos=has_eos)


@dataclasses.dataclass
class CountResult:
    """`count`: the stated count (None if missing/unparsable); `points [N,2]` bins and `positions [N,2]`."""

    count: int | None
    points: np.ndarray
    positions: np.ndarray
    dropped: dict[str, int]
    closed: bool


def parse_count(ids, tokenizer, token_ids) -> CountResult:
    """Parse a counting answer `{"count": N, "points": [[x, y], ...]}`; never raises on model output."""
    clean, _, _ = _clean_ids(ids, token_ids)
    dropped: collections.Counter = collections.Counter()
    count, pts, pos, closed = None, [], [], False
    try:
        lx = _Lexer(_units(clean, tokenizer, token_ids, _special_ids(tokenizer, token_ids)))
        _expect(lx, "{")
        if _expect(lx, "str")[1] != "count":
            raise _Fail("bad_prefix")
        _expect(lx, ":")
        count = _expect(lx, "num")[1]
        _expect(lx, ",")
        if _expect(lx, "str")[1] != "points":
            raise _Fail("syntax")
        _expect(lx, ":")
        _expect(lx, "[")
        while True:
            t = lx.peek()
            if t[0] == "]":
                lx.pop()
                _expect(lx, "}")
                closed = True
                break
            if t[0] == ",":
                lx.pop()
                continue
            d0 = lx.depth
            try:
                b, p = _value_list(lx, 2, "coord")
                pts.append(b)
                pos.append(p)
            except _Fail as f:
                dropped[f.reason] += 1
                if f.reason == "truncated":
                    break
                _resync(lx, d0)
    except _Fail as f:
        dropped[f.reason] += 1
    except Exception:  # noqa: BLE001
        dropped["internal_error"] += 1
    return CountResult(count, np.asarray(pts, np.int32).reshape(-1, 2), np.asarray(pos, np.int32).reshape(-1, 2),
                       dict(dropped), closed)
