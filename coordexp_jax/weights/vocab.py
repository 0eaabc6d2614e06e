"""Coordinate-vocabulary expansion (coordexp_method.md §1): grow the embedding (and an untied lm_head) so the new
token ids get rows, initialised by one rule, both for an HF directory and for in-memory parameters.

Rule for the rows of the added ids: `mean` (default) = the exact mean of the base rows (the first `n_base` rows:
the base tokenizer's tokens; released checkpoints have untrained spare rows after them, which are excluded);
`normal` = N(0, 0.02). Rows of added ids that already existed as spare rows are overwritten; every other row is
kept bit-for-bit. The tie of the checkpoint is kept, as the loader resolves it (`hf.resolve_head`): a tied config
whose safetensors hold a differing lm_head.weight is written untied with both tensors grown.

The added tokens are plain added tokens (`data.tokenizer.add_coord_tokens`), not special ones, so decoding with
`skip_special_tokens=True` keeps them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
from flax import nnx

from ..model.config import ModelConfig
from .hf import EMBED_HF, resolve_head
from .names import TIED_HF_HEAD, WeightsError
from .safetensors_io import _DT, index_checkpoint, read_tensor, write_file

log = logging.getLogger(__name__)
INITS = ("mean", "normal")


def grow_rows(w: np.ndarray, new_vocab: int, new_ids, *, n_base: int, init: str = "mean", seed: int = 0) -> np.ndarray:
    """w [V, H] (HF layout) -> [max(V, new_vocab), H] with the rows of `new_ids` set by `init`."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    V, H = w.shape
    n_base = min(n_base, V)
    out = np.zeros((max(V, new_vocab), H), w.dtype)
    out[:V] = w
    ids = np.asarray(list(new_ids), np.int64)
    if ids.size and (ids.min() < n_base or ids.max() >= out.shape[0]):
        raise ValueError(f"new ids {ids.min()}..{ids.max()} must lie in [{n_base}, {out.shape[0]})")
    if init == "mean":
        row = w[:n_base].astype(np.float64).mean(0)
        out[ids] = row.astype(w.dtype)
    else:
        out[ids] = (np.random.default_rng(seed).standard_normal((ids.size, H)) * 0.02).astype(w.dtype)
    return out


def expand_vocab_state(state, config: ModelConfig, new_vocab: int, new_ids, *, n_base: int, init: str = "mean",
                       seed: int = 0):
    """In-memory expansion of a model's parameter state (padded layout). Returns (new state, new config).

    The new config has vocab_size = max(old, new_vocab) and its own padding; both the embedding and (untied) lm_head
    are regrown; all other parameters are shared with `state`.
    """
    import jax.numpy as jnp

    pure = nnx.to_pure_dict(state)
    V = config.vocab_size
    new_cfg = config.with_vocab_size(max(V, new_vocab))
    Vp = new_cfg.padded_vocab_size
    emb = np.asarray(pure["language_model"]["embed_tokens"]["embedding"])
    g = grow_rows(emb[:V], new_vocab, new_ids, n_base=n_base, init=init, seed=seed)
    pure["language_model"]["embed_tokens"]["embedding"] = jnp.asarray(np.concatenate([g, np.zeros((Vp - g.shape[0], g.shape[1]), g.dtype)]))
    if not config.tie_word_embeddings:
        k = np.asarray(pure["lm_head"]["kernel"])  # [H, Vp]
        g = grow_rows(k[:, :V].T, new_vocab, new_ids, n_base=n_base, init=init, seed=seed + 1)
        g = np.concatenate([g, np.zeros((Vp - g.shape[0], g.shape[1]), g.dtype)])
        pure["lm_head"]["kernel"] = jnp.asarray(np.ascontiguousarray(g.T))
    return pure, new_cfg


def expand_hf_dir(src: str, dst: str, *, init: str = "mean", seed: int = 0, with_tags: bool = False,
                  with_regression: bool = False) -> dict:
    """Adds `<|coord_*|>`, `<|coord_0|>`..`<|coord_999|>` (and optionally the tag tokens, and the `<x>` `<y>` pair of
    the regression heads with `with_regression`) to the tokenizer in `src` and
    writes the grown checkpoint to `dst` (must not exist). Streams tensor by tensor, keeping dtypes.
    Returns a summary dict (old/new vocab, coord_start, added ids)."""
    from ..data.tokenizer import add_coord_tokens, coord_token, load_tokenizer

    config = ModelConfig.from_hf(src)
    index = index_checkpoint(src)
    config, alias, msg = resolve_head(config, index, src)
    if msg:
        log.warning(msg)
    tok = load_tokenizer(src)
    n_base = len(tok)
    add_coord_tokens(tok, with_tags=with_tags, with_regression=with_regression)
    new_len = len(tok)
    vocab = tok.get_vocab()
    new_ids = sorted(i for i in vocab.values() if i >= n_base)
    coord_ids = np.array([vocab[coord_token(k)] for k in range(1000)])
    if not np.array_equal(coord_ids, coord_ids[0] + np.arange(1000)):
        raise WeightsError(f"{src}: coordinate token ids are not contiguous after expansion")
    V = config.vocab_size
    new_V = max(V, new_len)
    grow = {alias.get(EMBED_HF, EMBED_HF): 0}
    if not config.tie_word_embeddings:
        grow[TIED_HF_HEAD] = 1
    for name in grow:
        if name not in index:
            raise WeightsError(f"{src}: missing tensor {name}")
    # a tied head equal to the embedding is dropped: transformers re-ties it from the grown embedding
    names = sorted(n for n in index if n in grow or not (config.tie_word_embeddings and n == TIED_HF_HEAD and not alias))
    os.makedirs(dst)
    metas = []
    for n in names:
        info = index[n][1]
        shape = tuple(info["shape"])
        if n in grow:
            if shape[0] != V:
                raise WeightsError(f"{index[n][0]}: tensor {n} has shape {shape}, config.json vocab_size is {V}")
            shape = (new_V,) + shape[1:]
        metas.append((n, shape, np.dtype(_DT[info["dtype"]])))

    def produce(n):
        arr = read_tensor(index[n][0], index[n][1], index[n][2], n)
        if n in grow:
            arr = grow_rows(arr, new_V, new_ids, n_base=n_base, init=init, seed=seed + grow[n])
        return arr

    write_file(os.path.join(dst, "model.safetensors"), metas, produce)
    with open(os.path.join(src, "config.json")) as f:
        raw = json.load(f)
    raw["text_config"]["vocab_size"] = new_V
    if not config.tie_word_embeddings:  # written as loaded: untied (also when config.json said tied)
        raw["tie_word_embeddings"] = False
        if "tie_word_embeddings" in raw["text_config"]:
            raw["text_config"]["tie_word_embeddings"] = False
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    for fn in os.listdir(src):  # other side files (generation/preprocessor configs) travel unchanged
        if fn.endswith(".json") and fn not in ("config.json", "model.safetensors.index.json") and not fn.startswith("tokenizer") \
                and fn not in ("special_tokens_map.json", "added_tokens.json", "vocab.json"):
            shutil.copy2(os.path.join(src, fn), os.path.join(dst, fn))
    tok.save_pretrained(dst)
    out = dict(old_vocab=V, new_vocab=new_V, n_base=n_base, tokenizer_size=new_len, coord_start=int(coord_ids[0]),
               added=len(new_ids), init=init)
    if with_regression:
        from ..data.tokenizer import REGRESSION_TOKENS

        out.update(x_token=int(vocab[REGRESSION_TOKENS[0]]), y_token=int(vocab[REGRESSION_TOKENS[1]]))
    return out
