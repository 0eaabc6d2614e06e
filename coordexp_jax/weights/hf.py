"""HF safetensors directories <-> Qwen3VL parameters, tensor by tensor.

`load_hf_checkpoint(hf_dir, dtype)` checks every name and shape against config.json before reading any data,
then reads one tensor at a time into the model's (abstract) state, so peak host memory stays near one copy of the
weights plus one tensor. `save_hf_checkpoint` streams the other way and writes only the embedding when tied.

Output head, as transformers 5.23 `PreTrainedModel.tie_weights` decides it at load time (`resolve_head`):
    config tied, no lm_head.weight                  -> tied (the embedding is the head)
    config tied, lm_head.weight equal to embedding  -> tied (the duplicate is ignored)
    config tied, lm_head.weight differs             -> untied, lm_head.weight is the head; one warning line
    config tied, only lm_head.weight                -> tied, lm_head.weight is read as the embedding
    config untied, no lm_head.weight                -> WeightsError (transformers would draw a random head)
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..model.config import ModelConfig
from ..model.qwen3vl import Qwen3VL
from .names import TIED_HF_HEAD, WeightsError, hf_shape, name_table, to_hf, to_ours
from .safetensors_io import index_checkpoint, read_tensor, tensors_equal, write_file

log = logging.getLogger(__name__)

EMBED_HF = "model.language_model.embed_tokens.weight"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
                   "video_preprocessor_config.json", "generation_config.json")


def abstract_model(config: ModelConfig, dtype=jnp.float32, compute_dtype=None, remat: bool = False):
    """(graphdef, abstract state) of a Qwen3VL, no memory used (stacked layers when `config.scan_layers`)."""
    m = nnx.eval_shape(lambda: Qwen3VL(config, dtype=compute_dtype or dtype, param_dtype=dtype, remat=remat))
    return nnx.split(m)


def flat_params(state) -> dict:
    """path tuple -> Variable for every parameter of a model state."""
    return {tuple(p): v for p, v in nnx.to_flat_state(state)}


def resolve_head(config: ModelConfig, index: dict, hf_dir: str) -> tuple[ModelConfig, dict, str | None]:
    """The output head transformers 5.23 builds from config.json + the tensors present (table in the module doc).

    index: `index_checkpoint(hf_dir)`. Returns (effective config, {name-table HF name: tensor name to read instead},
    warning line or None). The effective config is `config` with tie_word_embeddings=False when a tied config ships
    an lm_head.weight with other values (compared as numbers, as `torch.equal`). Raises WeightsError for an untied
    config without lm_head.weight.
    """
    head, emb = TIED_HF_HEAD in index, EMBED_HF in index
    if not config.tie_word_embeddings:
        if not head:
            raise WeightsError(f"{hf_dir}: config.json has tie_word_embeddings: false but the checkpoint has no "
                               f"{TIED_HF_HEAD} (set \"tie_word_embeddings\": true if the head is the embedding)")
        return config, {}, None
    if head and not emb:
        return config, {EMBED_HF: TIED_HF_HEAD}, None
    if head and not tensors_equal(index[EMBED_HF], index[TIED_HF_HEAD]):
        msg = (f"{index[TIED_HF_HEAD][0]}: config.json says tie_word_embeddings: true but {TIED_HF_HEAD} differs from "
               f"{EMBED_HF}; using {TIED_HF_HEAD} as a separate output head, as transformers does "
               f"(set \"tie_word_embeddings\": false in config.json to silence this)")
        return config.replace(tie_word_embeddings=False), {}, msg
    return config, {}, None


def hf_model_config(hf_dir: str) -> ModelConfig:
    """The ModelConfig `load_hf_checkpoint(hf_dir)` builds (config.json with the head resolved), without reading
    weights beyond an lm_head/embedding comparison. Raises as `load_hf_checkpoint`."""
    config = ModelConfig.from_hf(hf_dir)
    return resolve_head(config, index_checkpoint(hf_dir), hf_dir)[0]


def load_hf_checkpoint(hf_dir: str, dtype=jnp.float32, *, compute_dtype=None, return_state: bool = False,
                       remat: bool = False, scan_layers: bool = False, remat_policy: str | None = None):
    """Reads an HF Qwen3-VL directory (sharded with model.safetensors.index.json, or *.safetensors).

    Returns (ModelConfig, Qwen3VL) or, with return_state=True, (ModelConfig, (graphdef, state)). Parameters are
    stored in `dtype`; compute dtype defaults to `dtype`. scan_layers: build the scanned model (the per-layer HF
    tensors are stacked on load; `ModelConfig.scan_layers`); remat_policy: `ModelConfig.remat_policy` (None: default). The output head follows `resolve_head` (a tied config with
    a differing lm_head.weight loads untied, logging one warning line). Raises WeightsError naming the tensor on a
    missing, unexpected or mis-shaped tensor, ConfigError naming the key on a bad config.json.
    """
    config = ModelConfig.from_hf(hf_dir)
    index = index_checkpoint(hf_dir)
    config, alias, msg = resolve_head(config, index, hf_dir)
    if msg:
        log.warning(msg)
    config = config.replace(scan_layers=bool(scan_layers), **({"remat_policy": remat_policy} if remat_policy else {}))
    graphdef, state = abstract_model(config, dtype, compute_dtype, remat)
    flat = flat_params(state)
    table = name_table(config)
    known = {e.hf for e in table}
    for name in index:
        if name not in known and not (config.tie_word_embeddings and name == TIED_HF_HEAD):
            raise WeightsError(f"{index[name][0]}: unexpected tensor {name} (not part of Qwen3-VL with this config.json)")
    for e in table:  # names and shapes first: fail before reading any data
        src = alias.get(e.hf, e.hf)
        if src not in index:
            raise WeightsError(f"{hf_dir}: missing tensor {e.hf}")
        if e.path not in flat:
            raise WeightsError(f"name table: {e.hf} maps to {e.path}, which the model does not have")
        want = hf_shape(e, flat[e.path].shape, config)
        got = tuple(index[src][1]["shape"])
        if got != want:
            raise WeightsError(f"{index[src][0]}: tensor {src} has shape {got}, config.json implies {want}")
    if len({e.path for e in table}) != len(flat):
        raise WeightsError(f"name table covers {len(table)} parameters, the model has {len(flat)}")
    np_dtype = np.dtype(dtype)
    # stacked parameters are filled slice by slice in a host buffer and moved to the device once complete; the table
    # is walked parameter-major so that only one stack is buffered at a time
    stacks: dict[tuple, list] = {}  # path -> [buffer, slices filled]
    for e in sorted(table, key=lambda e: (e.layer is not None, str(e.path), e.layer or 0)):
        src = alias.get(e.hf, e.hf)
        path, info, start = index[src]
        arr = to_ours(e, read_tensor(path, info, start, src), flat[e.path].shape, config).astype(np_dtype, copy=False)
        if e.layer is None:
            flat[e.path].set_value(jnp.asarray(arr))
        else:
            buf = stacks.setdefault(e.path, [np.empty(flat[e.path].shape, np_dtype), 0])
            buf[0][e.layer] = arr
            buf[1] += 1
            if buf[1] == buf[0].shape[0]:
                flat[e.path].set_value(jnp.asarray(buf[0]))
                del stacks[e.path]
        del arr
    state = nnx.from_flat_state(list(flat.items()))
    if return_state:
        return config, (graphdef, state)
    return config, nnx.merge(graphdef, state)


def _split_state(model_or_state):
    if isinstance(model_or_state, nnx.Module):
        return nnx.state(model_or_state, nnx.Param)
    if isinstance(model_or_state, tuple) and len(model_or_state) == 2:
        return model_or_state[1]
    return model_or_state


def hf_tensors(model_or_state, config: ModelConfig):
    """[(hf_name, shape, dtype, producer)] of the HF tensors of a model, tied head left out. The layout (per-layer or
    scanned) is read from the state itself, so `config.scan_layers` need not match."""
    state = _split_state(model_or_state)
    flat = flat_params(state)
    out = []
    config = config.replace(scan_layers=_is_scanned(flat))
    for e in name_table(config):
        if e.path not in flat:
            raise WeightsError(f"model state has no parameter {'.'.join(map(str, e.path))} (for {e.hf})")
        var = flat[e.path]
        shape = hf_shape(e, var.shape, config)
        if e.layer is None:
            get = lambda var=var: var.get_value()  # noqa: E731
        else:  # slice on the device: only this layer's tensor is copied to the host
            get = lambda var=var, i=e.layer: var.get_value()[i]  # noqa: E731
        out.append((e.hf, shape, np.dtype(var.dtype), lambda e=e, get=get: to_hf(e, np.asarray(jax.device_get(get())),
                                                                                  config)))
    return out


def _is_scanned(flat: dict) -> bool:
    """Whether a flat parameter dict (path tuple -> Variable) holds stacked decoder layers (a scanned model)."""
    return any(p[:2] == ("language_model", "layers") and len(p) > 2 and not isinstance(p[2], int) and
               not str(p[2]).isdigit() for p in flat)


def save_hf_checkpoint(model_or_state, config: ModelConfig, out_dir: str, tokenizer_dir: str | None = None, *,
                       max_shard_bytes: int = 5 * 2**30, dtype=None) -> list[str]:
    """Writes config.json + safetensors (sharded with an index when larger than max_shard_bytes) + tokenizer files.

    Tied configs write only the embedding (HF re-ties lm_head on load). `dtype` casts on the way out (default: the
    parameter dtype). Copied tokenizer files get the coordinate/tag tokens as plain added tokens
    (`data.tokenizer.unmark_special_files`), so `decode(..., skip_special_tokens=True)` keeps them.
    Writes into `out_dir` directly; CLIs write to a temp dir and rename. Returns the files written.
    """
    tensors = hf_tensors(model_or_state, config)
    if dtype is not None:
        dt = np.dtype(dtype)
        tensors = [(n, s, dt, (lambda f=f: f().astype(dt))) for n, s, _, f in tensors]
    os.makedirs(out_dir, exist_ok=True)
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        n = int(np.prod(t[1])) * t[2].itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    written = []
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        fn = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        producers = {n: f for n, _, _, f in shard}
        total += write_file(os.path.join(out_dir, fn), [(n, s, d) for n, s, d, _ in shard], lambda n: producers[n]())
        for n, *_ in shard:
            weight_map[n] = fn
        written.append(fn)
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        written.append("model.safetensors.index.json")
    hf_cfg = config.to_hf()
    dts = {t[2] for t in tensors}
    hf_cfg["dtype"] = "bfloat16" if dts == {np.dtype(jnp.bfloat16)} else "float32" if dts == {np.dtype(np.float32)} else str(next(iter(dts)))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    written.append("config.json")
    if tokenizer_dir is not None:
        if not os.path.isdir(tokenizer_dir):
            raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir}")
        for fn in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, fn)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(out_dir, fn))
                written.append(fn)
        from ..data.tokenizer import unmark_special_files

        unmark_special_files(out_dir)  # coordinate/tag tokens of older expansions: plain, so decoding keeps them
    return written
