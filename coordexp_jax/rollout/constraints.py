"""Protocol constraints for decoding: a token-level finite automaton carried in the decode loop.

A `TokenDFA` is three tables built once on the host:
- `allowed [n_states, V] bool`: which token ids may be emitted in each state (the rest get -inf logits before
  sampling, as big_vision's `mask_logits` hook does);
- `token_class [V] int32`: each id's class (one class per token the automaton cares about, one for all
  coordinate bins, one for everything else);
- `next_state [n_states, n_classes] int32`.
Inside the loop the state is one `int32` per row; masking is a gather of one row of `allowed` per batch row.

Three builders:
- `tags_dfa`: the complete `tags` grammar (coordexp_method.md §3):
  `(<obj><desc>TEXT</desc><box>C C C C</box></obj>)* <|im_end|>`, TEXT = ordinary (non-special, non-coordinate)
  tokens. Every sequence it allows parses.
- `coordjson_dfa`: coordinate placement for `coordjson`: coordinate tokens are allowed exactly in the 4 slots
  that follow the box opening (the token sequence the serialiser writes before the first coordinate, e.g.
  `"bbox_2d": [`), separated by the serialiser's separator tokens (`, `), and nowhere else; end of turn is not
  allowed inside a box. Text outside boxes is not constrained (the JSON around the boxes is left to the model).
- `text_dfa`: for `qwen_text` (coordinates written as text): one state that never allows a coordinate token (the
  bins and the wildcard), which the protocol does not write; on a tokenizer without coordinate tokens it allows
  every id. The first two need the coordinate tokens and raise ValueError on a tokenizer without them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import jax.numpy as jnp

from coordexp_jax.data.tokenizer import TokenIds


@dataclasses.dataclass(frozen=True, eq=False)
class TokenDFA:
    """Host tables of a token automaton (see module docstring). `start` is the initial state."""

    allowed: np.ndarray  # [n_states, V] bool
    token_class: np.ndarray  # [V] int32
    next_state: np.ndarray  # [n_states, n_classes] int32
    start: int = 0
    name: str = ""

    @property
    def vocab_size(self) -> int:
        return self.allowed.shape[1]

    def padded_to(self, vocab_size: int) -> "TokenDFA":
        """The same automaton over a vocabulary padded to `vocab_size` (padded ids are never allowed)."""
        v = self.vocab_size
        if vocab_size == v:
            return self
        if vocab_size < v:
            raise ValueError(f"constraint built for vocab {v} cannot be used with a model vocab of {vocab_size}")
        allowed = np.zeros((self.allowed.shape[0], vocab_size), bool)
        allowed[:, :v] = self.allowed
        other = int(self.token_class.max()) if self.token_class.size else 0
        cls = np.full((vocab_size,), other, np.int32)
        cls[:v] = self.token_class
        return dataclasses.replace(self, allowed=allowed, token_class=cls)

    def accepts_prefix(self, ids: Sequence[int]) -> bool:
        """Host reference: True iff every token of `ids` is allowed in the state it is emitted in."""
        s = self.start
        for t in ids:
            if not self.allowed[s, int(t)]:
                return False
            s = int(self.next_state[s, self.token_class[int(t)]])
        return True


def mask_logits(logits, dfa_allowed, state):
    """`logits [B, V]`, `dfa_allowed [n_states, V]` (device array), `state [B]` -> logits with -inf where not allowed."""
    return jnp.where(dfa_allowed[state], logits, -jnp.inf)


def advance(dfa_next, dfa_class, state, tokens):
    """Next automaton state `[B]` after emitting `tokens [B]`."""
    return dfa_next[state, dfa_class[tokens]]


class _Classes:
    """Assigns class ids: one per named token id, one for coordinate bins, one for the rest (last)."""

    def __init__(self, vocab_size: int, ids: Sequence[int], coord_start: int, num_bins: int):
        if coord_start < 0:
            raise ValueError("constraint classes need the coordinate tokens (coord_start is -1)")
        uniq = sorted(set(int(i) for i in ids))
        for i in uniq:
            if not 0 <= i < vocab_size:
                raise ValueError(f"constraint token id {i} is outside the vocabulary [0, {vocab_size})")
        self.of = {i: c for c, i in enumerate(uniq)}
        self.coord = len(uniq)
        self.other = len(uniq) + 1
        self.n = len(uniq) + 2
        cls = np.full((vocab_size,), self.other, np.int32)
        cls[coord_start:coord_start + num_bins] = self.coord
        for i, c in self.of.items():
            cls[i] = c
        self.token_class = cls


def _coord_row(vocab_size: int, tid: TokenIds) -> np.ndarray:
    """`[V] bool`, True at the bins `<|coord_0|>`..`<|coord_999|>` (all False without coordinate tokens)."""
    row = np.zeros((vocab_size,), bool)
    if tid.has_coords:
        row[tid.coord_start:tid.coord_end] = True
    return row


def _need_coords(tid: TokenIds, what: str) -> None:
    if not tid.has_coords:
        raise ValueError(f"the {what} constraint needs the coordinate tokens, which the tokenizer lacks "
                         f"(coord_start -1); protocol 'qwen_text' writes coordinates as text")


def text_dfa(tid: TokenIds, vocab_size: int) -> TokenDFA:
    """The `qwen_text` constraint: one state, every id allowed except the coordinate bins and the wildcard (when
    the tokenizer has them). Token classes: 0 = coordinate token, 1 = every other id."""
    forbid = _coord_row(vocab_size, tid)
    if tid.coord_wildcard >= 0:
        forbid[tid.coord_wildcard] = True
    return TokenDFA((~forbid)[None], np.where(forbid, 0, 1).astype(np.int32), np.zeros((1, 2), np.int32), 0,
                    "qwen_text")


def tags_dfa(tid: TokenIds, vocab_size: int, special_ids: Sequence[int]) -> TokenDFA:
    """The full `tags` grammar. `special_ids`: every id that is not ordinary text (Qwen specials, tag tokens,
    the coordinate wildcard, ...); they and the bins are excluded from descriptions."""
    if not tid.has_tags:
        raise ValueError("the tokenizer has no <obj>/<desc>/<box> tokens: the tags protocol is unavailable")
    _need_coords(tid, "tags")
    V = vocab_size
    OUT, DOPEN, DESC, BOPEN, C0, C1, C2, C3, BCLOSE, OCLOSE = range(10)
    cl = _Classes(V, [tid.obj_open, tid.obj_close, tid.desc_open, tid.desc_close, tid.box_open, tid.box_close,
                      tid.eos], tid.coord_start, tid.num_bins)
    n_states = 10
    allowed = np.zeros((n_states, V), bool)
    nxt = np.zeros((n_states, cl.n), np.int32)  # unlisted transitions are never taken (token not allowed)

    def only(state, token, to):
        allowed[state, token] = True
        nxt[state, cl.of[token]] = to

    only(OUT, tid.obj_open, DOPEN)
    only(OUT, tid.eos, OUT)
    only(DOPEN, tid.desc_open, DESC)
    text = np.ones((V,), bool)
    text[tid.coord_start:tid.coord_end] = False
    text[np.asarray(list(special_ids), dtype=np.int64)] = False
    for t in (tid.obj_open, tid.obj_close, tid.desc_open, tid.desc_close, tid.box_open, tid.box_close, tid.eos,
              tid.coord_wildcard, tid.pad):
        text[t] = False
    allowed[DESC] = text
    nxt[DESC, cl.other] = DESC
    only(DESC, tid.desc_close, BOPEN)
    only(BOPEN, tid.box_open, C0)
    for s, to in ((C0, C1), (C1, C2), (C2, C3), (C3, BCLOSE)):
        allowed[s] = _coord_row(V, tid)
        nxt[s, cl.coord] = to
    only(BCLOSE, tid.box_close, OCLOSE)
    only(OCLOSE, tid.obj_close, OUT)
    return TokenDFA(allowed, cl.token_class, nxt, OUT, "tags")


def coordjson_dfa(tid: TokenIds, vocab_size: int, open_seq: Sequence[int], sep_seq: Sequence[int],
                  n_coords: int = 4) -> TokenDFA:
    """Coordinate placement for `coordjson` (module docstring). `open_seq`: ids written right before the first
    coordinate of a box; `sep_seq`: ids between two coordinates. Detection of `open_seq` in free text is a KMP
    automaton over the classes of its ids."""
    _need_coords(tid, "coordjson")
    open_seq = [int(t) for t in open_seq]
    sep_seq = [int(t) for t in sep_seq]
    if not open_seq:
        raise ValueError("coordjson constraint: the box opening sequence is empty")
    V = vocab_size
    cl = _Classes(V, open_seq + sep_seq + [tid.eos], tid.coord_start, tid.num_bins)
    n_open = len(open_seq)
    # states: 0..n_open-1 free text with j opening tokens matched; then per coordinate i: COORD_i, then SEP_{i,j}
    coord_state = []
    sep_states = []
    s = n_open
    for i in range(n_coords):
        coord_state.append(s)
        s += 1
        if i < n_coords - 1:
            sep_states.append(list(range(s, s + len(sep_seq))))
            s += len(sep_seq)
    n_states = s
    allowed = np.zeros((n_states, V), bool)
    nxt = np.zeros((n_states, cl.n), np.int32)
    free_row = ~_coord_row(V, tid)
    free_row[tid.coord_wildcard] = False

    def kmp(j: int, t: int) -> int:  # longest prefix of open_seq that is a suffix of open_seq[:j] + [t]
        seq = open_seq[:j] + [t]
        for k in range(min(len(seq), n_open), 0, -1):
            if seq[-k:] == open_seq[:k]:
                return k
        return 0

    for j in range(n_open):
        allowed[j] = free_row
        for t, c in cl.of.items():
            k = kmp(j, t)
            nxt[j, c] = coord_state[0] if k == n_open else k
        nxt[j, cl.other] = 0
    for i in range(n_coords):
        allowed[coord_state[i]] = _coord_row(V, tid)
        if i == n_coords - 1:
            nxt[coord_state[i], cl.coord] = 0
        elif sep_seq:
            nxt[coord_state[i], cl.coord] = sep_states[i][0]
            for j, st in enumerate(sep_states[i]):
                allowed[st, sep_seq[j]] = True
                nxt[st, cl.of[sep_seq[j]]] = sep_states[i][j + 1] if j + 1 < len(sep_seq) else coord_state[i + 1]
        else:
            nxt[coord_state[i], cl.coord] = coord_state[i + 1]
    return TokenDFA(allowed, cl.token_class, nxt, 0, "coordjson")


def coordjson_sequences(render: Callable[[list[tuple[str, list[int]]]], list[int]], tid: TokenIds):
    """Derives (open_seq, sep_seq) from a serialiser: `render([(desc, [k1, k2, k3, k4]), ...]) -> token ids`.

    open_seq = the longest common suffix of the tokens before the first coordinate of two renderings with different
    descriptions (what follows the description: `", "bbox_2d": [`); sep_seq = the tokens between the first two
    coordinates. Raises if the renderings do not contain 4 coordinates per box.
    """
    outs = [render([(d, [11, 22, 33, 44])]) for d in ("red circle", "a")]
    prefixes = []
    for ids in outs:
        ids = list(ids)
        pos = [i for i, t in enumerate(ids) if tid.coord_start <= t < tid.coord_end]
        if len(pos) != 4:
            raise ValueError(f"coordjson serialiser wrote {len(pos)} coordinate tokens for one box (expected 4)")
        prefixes.append(ids[:pos[0]])
        sep = ids[pos[0] + 1:pos[1]]
    a, b = prefixes
    k = 0
    while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k]:
        k += 1
    if k == 0:
        raise ValueError("coordjson serialiser: no common token sequence opens a box")
    return a[-k:], sep


def protocol_constraint(protocol: str, tokenizer, tid: TokenIds, vocab_size: int | None = None) -> TokenDFA:
    """The constraint of an answer protocol for this tokenizer: `tags_dfa`, `coordjson_dfa` (box opening and
    separator token sequences taken from `coord.protocols.serialize`, so they are the ids training used) or, for
    `qwen_text`, `text_dfa`."""
    from coordexp_jax.coord import protocols

    V = int(vocab_size) if vocab_size is not None else tid.vocab_size
    if protocol in protocols.COORD_TOKEN_PROTOCOLS:
        _need_coords(tid, protocol)
    if protocol == "tags":
        return tags_dfa(tid, V, tokenizer.all_special_ids)
    if protocol == "coordjson":
        def render(objs):
            return protocols.serialize([protocols.AnswerObject(d, bins=tuple(b)) for d, b in objs], tokenizer, tid,
                                       "coordjson", order="given").ids

        open_seq, sep = coordjson_sequences(render, tid)
        return coordjson_dfa(tid, V, open_seq, sep)
    if protocol == "qwen_text":
        return text_dfa(tid, V)
    raise ValueError(f"no constraint for protocol {protocol!r} (choose one of {protocols.PROTOCOLS})")
