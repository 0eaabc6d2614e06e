"""The rollout engine: one jitted prefill, then one jitted `lax.while_loop` decode over a preallocated KV cache.

Model interface (what `Sampler` calls; `coordexp_jax.model.qwen3vl.Qwen3VL` provides it, tests use stand-ins):

    model.init_cache(batch_size, max_len) -> cache                      # preallocated, one shared write index
                                                                        # (layout opaque here: per-layer arrays, or
                                                                        # stacked [L, B, nkv, T, hd] when scanned)
    model.prefill(input_ids [B,S], positions [3,B,S], attention_mask [B,S], vision: dict | None, cache=cache)
        -> (logits [B, V] float32 at the last prompt position, cache)
        (and `links=` when the batch has a `links` dict: the spatial-linking boxes, model/spatial_linking.py)
    model.decode_step(tokens [B], positions [3, B], cache) -> (logits [B, V], cache)

The batch holds the model-input keys of docs/architecture.md (`input_ids`, `attention_mask`, `positions`,
`rope_deltas`, and with images the vision arrays and `visual_index`, which go to the model as the `vision` dict). Prompts are LEFT-padded, so every row's last prompt token sits at column S-1 and all rows
share one cache write index (prompt in [0, S), generated token k-1 written at S + k - 1 when it is fed).

Per-row positions (qwen3vl_spec.md §7): generated token k (k = 0 comes from prefill) is fed at
`n_valid_b + k + rope_delta_b` on all three M-RoPE axes, n_valid_b = number of real prompt tokens of row b.

Loop carry: the cache, the current token `[B]`, output buffers `[B, T]` (token ids, model log-prob, sampling
log-prob, coordinate expectation ĉ), `done [B]`, `lengths [B]`, the automaton state `[B]` when constrained, the
step counter. Never a `[B, T, V]` logits buffer. The carry is donated to the decode call so the cache is updated
in place.

Shape buckets: batch -> next power of two, prompt length -> next power of two (>= `min_prompt_len`), image slots
-> next power of two; the cache length is prompt bucket + `max_new_tokens`. A second call whose batch falls in
the same buckets reuses the compiled prefill and decode (`Sampler.compile_count()`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coordexp_jax.errors import CoordExpError
from coordexp_jax.data.tokenizer import TokenIds
from coordexp_jax.rollout import sampling
from coordexp_jax.rollout.constraints import TokenDFA, advance, mask_logits

# keys of the model-input contract with a leading image-slot axis [I, P, ...]
VISION_KEYS = ("pixel_values", "vision_segment_ids", "vision_pos_taps", "vision_pos_weights", "vision_rope_rc")
# spatial linking (model/spatial_linking.py): the merged tokens' rectangles [I, P/4, 4] and the image of each
# placeholder [B, S], passed in the vision dict when the batch has them; `links` goes to prefill
LINK_VISION_KEYS = ("vision_token_rect", "visual_image")


class PromptTooLongError(CoordExpError, ValueError):
    """The prompt does not fit into the configured cache."""


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static decoding settings (a change recompiles).

    temperature 0 = greedy. top_k 0 = off, top_p 1 = off. `seed` is used when `generate` gets no key.
    `coord_tau`: temperature of the coordinate-expectation softmax (1 = the model's distribution).
    `max_prompt_len`: prompts longer than this (in tokens) raise `PromptTooLongError`; 0 = no limit.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    coord_tau: float = 1.0
    min_prompt_len: int = 16
    max_prompt_len: int = 0
    bucket_batch: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplerConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplerConfig.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplerConfig.top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplerConfig.top_p must be in (0, 1], got {self.top_p}")
        if self.coord_tau <= 0:
            raise ValueError(f"SamplerConfig.coord_tau must be > 0, got {self.coord_tau}")


@dataclasses.dataclass
class Rollout:
    """Host results of `generate`, rows in input order. T = max_new_tokens.

    tokens [B, T] int32 (pad id after a row stops; the stop token itself is included), logprobs [B, T] float32
    (model log-prob at temperature 1 of each emitted token, 0 after the stop), sample_logprobs [B, T] float32
    (log-prob under the distribution sampled from; 0 for greedy), coord_expectation [B, T] float32 (ĉ in [0, 1] where
    the emitted token is a coordinate bin, NaN elsewhere: all NaN for a tokenizer without coordinate tokens), lengths [B] int32 (emitted tokens including the stop
    token), finished [B] bool (stopped by end of turn, not by max_new_tokens).
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    sample_logprobs: np.ndarray
    coord_expectation: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray

    def row(self, b: int) -> list[int]:
        """The emitted token ids of row b (up to and including the stop token)."""
        return [int(t) for t in self.tokens[b, : self.lengths[b]]]


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket_inputs(inputs: dict[str, Any], *, pad_id: int, min_prompt_len: int = 16, bucket_batch: bool = True):
    """Pads a left-padded prompt batch to its shape buckets (numpy, host side).

    Rows are padded on the left to the next power of two (>= min_prompt_len); extra batch rows are text-only
    rows with one real token (pad id) in the last column, so every row has a valid query and no NaNs appear;
    image slots are padded with empty slots (segment id -1, gathered by nobody). Returns (bucketed dict, B).
    """
    ids = np.asarray(inputs["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {ids.shape}")
    B, S = ids.shape
    mask = np.asarray(inputs["attention_mask"])
    if mask.shape != (B, S):
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {(B, S)}")
    if np.any(mask[:, -1] == 0):
        bad = int(np.nonzero(mask[:, -1] == 0)[0][0])
        raise ValueError(f"prompt row {bad} is not left-padded (its last column is padding)")
    Sb = max(next_pow2(S), int(min_prompt_len))
    Bb = next_pow2(B) if bucket_batch else B
    ls, lb = Sb - S, Bb - B
    out = {}
    for k, v in inputs.items():
        if k == "links":  # {pos [B, N], boxes [B, N, 4], image [B, N], kind [B, N]}: positions move with the padding
            lk = {n: np.asarray(a) for n, a in v.items()}
            pos = np.where(lk["pos"] >= 0, lk["pos"] + ls, -1)
            fill = {"pos": -1, "kind": 3}
            out[k] = {n: np.pad(pos if n == "pos" else a, ((0, lb),) + ((0, 0),) * (a.ndim - 1),
                                constant_values=fill.get(n, 0)) for n, a in lk.items()}
            continue
        v = np.asarray(v)
        if k in VISION_KEYS or k == "vision_token_rect":
            n = v.shape[0]
            nb = next_pow2(n) if n > 0 else 0
            fill = -1 if k == "vision_segment_ids" else 0
            if nb > n:
                v = np.concatenate([v, np.full((nb - n,) + v.shape[1:], fill, v.dtype)], 0)
        elif k == "input_ids":
            v = np.pad(v, ((0, lb), (ls, 0)), constant_values=pad_id)
        elif k == "attention_mask":
            v = np.pad(v, ((0, lb), (ls, 0)))
            v[B:, -1] = 1
        elif k == "positions":
            if v.shape[:2] != (3, B) and v.shape[1:] != (B, S):
                raise ValueError(f"positions must be [3, B, S], got {v.shape}")
            v = np.pad(v, ((0, 0), (0, lb), (ls, 0)))
        elif k == "visual_index":
            v = np.pad(v, ((0, lb), (ls, 0)), constant_values=-1)
        elif k == "rope_deltas":
            v = np.pad(v.reshape(B), ((0, lb),))
        elif v.ndim >= 2 and v.shape[:2] == (B, S):  # any other per-token array: pad with zeros
            v = np.pad(v, ((0, lb), (ls, 0)) + ((0, 0),) * (v.ndim - 2))
        elif v.ndim >= 1 and v.shape[0] == B:
            v = np.pad(v, ((0, lb),) + ((0, 0),) * (v.ndim - 1))
        out[k] = v
    if "rope_deltas" not in out:
        out["rope_deltas"] = np.zeros((Bb,), np.int32)
    return out, B


class Sampler:
    """Jitted rollouts of one model. Build once per (model, tokenizer ids, config); call `generate` many times.

    `constraint`: an optional `TokenDFA` (rollout/constraints.py); with it, every emitted token is allowed by the
    automaton (logits of disallowed ids are set to -inf before sampling; the model log-prob still uses the raw
    logits).
    """

    def __init__(self, model, token_ids: TokenIds, config: SamplerConfig = SamplerConfig(), *,
                 constraint: TokenDFA | None = None, vocab_size: int | None = None):
        self.config = config
        self.ids = token_ids
        if isinstance(model, tuple):  # (graphdef, state) as load_checkpoint(..., return_state=True) gives
            self.graphdef, self.state = model
        else:
            self.graphdef, self.state = nnx.split(model)
        if vocab_size is None:  # the model's logits width (vocabulary padded for tensor parallelism)
            cfg = getattr(nnx.merge(self.graphdef, self.state), "config", None) if constraint is not None else None
            vocab_size = getattr(cfg, "padded_vocab_size", None)
        self.constraint = constraint
        self._tables = None
        if constraint is not None and vocab_size is not None:
            self._set_tables(vocab_size)
        self._prefill = jax.jit(self._prefill_impl)
        self._decode = jax.jit(self._decode_impl, donate_argnums=(1,))

    # ---- compiled parts -------------------------------------------------------------------------------------
    def _set_tables(self, vocab: int):
        c = self.constraint.padded_to(vocab)
        self._tables = (jnp.asarray(c.allowed), jnp.asarray(c.token_class), jnp.asarray(c.next_state),
                        int(c.start))

    def _select(self, logits, key, step, carry):
        """Chooses token `step` of every row from `logits [B, V]` and writes it into the output buffers."""
        cfg, ids = self.config, self.ids
        logits = logits.astype(jnp.float32)
        raw = logits
        if self._tables is not None:
            allowed, _, _, _ = self._tables
            logits = mask_logits(logits, allowed, carry["cstate"])
        tok, slp = sampling.sample(jax.random.fold_in(key, step), logits, temperature=cfg.temperature,
                                   top_k=cfg.top_k, top_p=cfg.top_p)
        done = carry["done"]
        tok = jnp.where(done, ids.pad, tok)
        lp = jnp.where(done, 0.0, sampling.token_logprob(raw, tok))
        slp = jnp.where(done, 0.0, slp)
        if ids.has_coords:
            is_coord = (tok >= ids.coord_start) & (tok < ids.coord_end) & ~done
            chat = sampling.coord_expectation(raw, ids.coord_start, ids.num_bins, cfg.coord_tau)
            chat = jnp.where(is_coord, chat, jnp.nan)
        else:  # no coordinate tokens (coord_start -1): no token is a bin, there are no coordinate logits
            chat = jnp.full(tok.shape, jnp.nan, jnp.float32)
        col = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, v[:, None].astype(buf.dtype), step, axis=1)
        carry = dict(carry)
        carry["tokens"] = col(carry["tokens"], tok)
        carry["logprobs"] = col(carry["logprobs"], lp)
        carry["sample_logprobs"] = col(carry["sample_logprobs"], slp)
        carry["coord"] = col(carry["coord"], chat)
        carry["lengths"] = carry["lengths"] + (~done).astype(jnp.int32)
        carry["done"] = done | (tok == ids.eos)
        carry["last"] = tok
        if self._tables is not None:
            _, cls, nxt, _ = self._tables
            carry["cstate"] = jnp.where(done, carry["cstate"], advance(nxt, cls, carry["cstate"], tok))
        return carry

    def _prefill_impl(self, state, inputs, key):
        model = nnx.merge(self.graphdef, state)
        B, S = inputs["input_ids"].shape
        T = self.config.max_new_tokens
        cache = model.init_cache(B, S + T)
        vision = {k: inputs[k] for k in VISION_KEYS + ("visual_index",) + LINK_VISION_KEYS if k in inputs} \
            if "visual_index" in inputs else None
        extra = {"links": inputs["links"]} if "links" in inputs else {}  # spatial linking, at prefill only
        logits, cache = model.prefill(inputs["input_ids"], inputs["positions"], inputs["attention_mask"], vision,
                                      cache=cache, **extra)
        if self._tables is None and self.constraint is not None:
            raise RuntimeError("constraint tables not initialised")
        carry = {
            "cache": cache,
            "tokens": jnp.full((B, T), self.ids.pad, jnp.int32),
            "logprobs": jnp.zeros((B, T), jnp.float32),
            "sample_logprobs": jnp.zeros((B, T), jnp.float32),
            "coord": jnp.full((B, T), jnp.nan, jnp.float32),
            "lengths": jnp.zeros((B,), jnp.int32),
            "done": jnp.zeros((B,), bool),
            "last": jnp.zeros((B,), jnp.int32),
            "n_valid": inputs["attention_mask"].sum(-1).astype(jnp.int32),
            "delta": inputs["rope_deltas"].reshape(B).astype(jnp.int32),
            "step": jnp.ones((), jnp.int32),
            "key": key,
        }
        if self._tables is not None:
            carry["cstate"] = jnp.full((B,), self._tables[3], jnp.int32)
        return self._select(logits, key, 0, carry)

    def _decode_impl(self, state, carry):
        model = nnx.merge(self.graphdef, state)
        T = self.config.max_new_tokens
        step_kw = {}
        if getattr(getattr(model, "config", None), "scan_layers", False):  # slice the stacked layers once, here
            from coordexp_jax.model.scan import unstack_module

            step_kw["layers"] = unstack_module(model.language_model.layers)

        def cond(c):
            return (c["step"] < T) & ~jnp.all(c["done"])

        def body(c):
            k = c["step"]
            # feed token k-1 at n_valid + (k - 1) + rope_delta on all three axes (qwen3vl_spec.md §7)
            pos = c["n_valid"] + (k - 1) + c["delta"]
            positions = jnp.broadcast_to(pos[None, :], (3,) + pos.shape)
            logits, cache = model.decode_step(c["last"], positions, c["cache"], **step_kw)
            c = dict(c, cache=cache)
            c = self._select(logits, c["key"], k, c)
            c["step"] = k + 1
            return c

        return jax.lax.while_loop(cond, body, carry)

    # ---- host API -------------------------------------------------------------------------------------------
    def compile_count(self) -> int:
        """Number of compiled variants of prefill + decode so far."""
        return self._prefill._cache_size() + self._decode._cache_size()

    def generate(self, inputs: dict[str, Any], *, key=None, seed: int | None = None) -> Rollout:
        """Rolls out a left-padded prompt batch (numpy model inputs). Returns host arrays for the B input rows."""
        cfg = self.config
        n_valid = np.asarray(inputs["attention_mask"]).sum(-1)
        if cfg.max_prompt_len and int(n_valid.max()) > cfg.max_prompt_len:
            b = int(np.argmax(n_valid))
            raise PromptTooLongError(
                f"prompt row {b} has {int(n_valid[b])} tokens, more than max_prompt_len={cfg.max_prompt_len} "
                f"(the cache must hold the prompt plus max_new_tokens={cfg.max_new_tokens})")
        bucketed, B = bucket_inputs(inputs, pad_id=self.ids.pad, min_prompt_len=cfg.min_prompt_len,
                                    bucket_batch=cfg.bucket_batch)
        if self.constraint is not None and self._tables is None:
            raise RuntimeError("Sampler with a constraint needs vocab_size= (the model's logits width)")
        if key is None:
            key = jax.random.key(cfg.seed if seed is None else seed)
        dev = jax.tree.map(jnp.asarray, bucketed)  # (`links` is a dict of arrays)
        carry = self._prefill(self.state, dev, key)
        carry = self._decode(self.state, carry)
        out = jax.device_get({k: carry[k] for k in
                              ("tokens", "logprobs", "sample_logprobs", "coord", "lengths", "done")})
        return Rollout(tokens=out["tokens"][:B], logprobs=out["logprobs"][:B],
                       sample_logprobs=out["sample_logprobs"][:B], coord_expectation=out["coord"][:B],
                       lengths=out["lengths"][:B], finished=out["done"][:B])


def generate(model, batch: dict[str, Any], config: SamplerConfig, token_ids: TokenIds, **kw) -> Rollout:
    """One-shot convenience: builds a `Sampler` and rolls out `batch`. Reuse a `Sampler` to avoid recompiles."""
    return Sampler(model, token_ids, config, **kw).generate(batch)
