"""From a validated config to the pieces of training: tokenizer ids, model config and constructor, objective, data.

Kept apart from the loop so that tests can hand the loop other components (a stand-in model, an in-memory data
iterator) through the same `Components` record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coordexp_jax.errors import CoordExpError
from coordexp_jax.train.config import ConfigError
from coordexp_jax.data.tokenizer import NUM_BINS, SMALL_TOKENIZER_DIR, TokenIds

log = logging.getLogger(__name__)

_DT = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class DataPathError(CoordExpError, FileNotFoundError):
    """A data/tokenizer/checkpoint path in the config that does not exist; the message names the key."""


@dataclasses.dataclass
class Components:
    """What the loop needs besides the config.

    make_model: () -> nnx.Module (traceable: random init runs under jit into the target shardings);
    materialize: make_model reads weights from disk, so it is called eagerly once and the arrays are placed;
    objective: the step's Objective (counts / sums / weights); data_iter: host iterator of numpy batches with
    get_state/set_state; eval_iter_fn: () -> iterator of eval batches (or None); vocab_size, coord_start: for the
    coordinate rows; spec_fn: logical PartitionSpecs of a model state (None: from the params' metadata);
    model_config: saved with the final model (None for stand-ins); token_ids / tokenizer_dir: for evaluation.
    """

    make_model: Callable[[], nnx.Module]
    objective: Any
    data_iter: Any
    vocab_size: int
    coord_start: int
    materialize: bool = False
    eval_iter_fn: Callable[[], Any] | None = None
    spec_fn: Callable[[Any], Any] | None = None
    model_config: Any = None
    token_ids: TokenIds | None = None
    tokenizer_dir: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)


def _check_path(key: str, path: str) -> str:
    if not path or not os.path.exists(path):
        raise DataPathError(f"config key '{key}': path '{path}' does not exist")
    return path


def tokenizer_dir(cfg) -> str:
    return _check_path("tokenizer.path", cfg.tokenizer.path) if cfg.tokenizer.path else SMALL_TOKENIZER_DIR


def token_ids(cfg) -> TokenIds:
    """The tokenizer's ids. The coordinate tokens are required only when `data.protocol` writes them (coordjson,
    tags); for `qwen_text` a tokenizer without them (released, unexpanded) gives `coord_start = -1`.
    Raises ConfigError (one line naming `tokenizer.path` and the directory) when a required token is missing."""
    from coordexp_jax.coord.protocols import uses_coord_tokens
    from coordexp_jax.data.tokenizer import TokenizerError, load_tokenizer, token_ids_from_tokenizer

    path = tokenizer_dir(cfg)
    try:
        return token_ids_from_tokenizer(load_tokenizer(path), require_coords=uses_coord_tokens(cfg.data.protocol),
                                        name=path)
    except TokenizerError as e:
        raise ConfigError(f"config key 'tokenizer.path' (data.protocol {cfg.data.protocol!r}): {e}") from None


def _replace_nested(obj, overrides: dict, where: str):
    kw = {}
    fields = {f.name for f in dataclasses.fields(obj)}
    for k, v in overrides.items():
        if k not in fields:
            raise ConfigError(f"config key '{where}.{k}': {type(obj).__name__} has no field '{k}' "
                             f"(fields: {sorted(fields)})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            v = _replace_nested(cur, dict(v), f"{where}.{k}")
        elif isinstance(cur, tuple):
            v = tuple(v)
        kw[k] = v
    return dataclasses.replace(obj, **kw)


def model_config(cfg, ids: TokenIds):
    """The ModelConfig: from the checkpoint's config when `model.checkpoint` is set, else the preset; then
    `model.overrides` (nested: {'text': {'hidden_size': 96}}), with the tokenizer's vocabulary and vision ids.

    Vocabulary checks (ConfigError naming the keys): with coordinate tokens (`ids.has_coords`) the checkpoint's
    vocab_size must equal the tokenizer's length (an expanded checkpoint) and the coordinate ids must lie inside
    it; without them (`qwen_text` on a released, unexpanded checkpoint) the checkpoint needs a row for every
    tokenizer id and may have more (the released checkpoints' spare rows: 151936 rows for 151669 ids)."""
    from coordexp_jax.model.config import ModelConfig

    if cfg.model.checkpoint:
        path = _check_path("model.checkpoint", cfg.model.checkpoint)
        from coordexp_jax.weights.checkpoint import checkpoint_config

        mc = checkpoint_config(path)  # the head as the loader resolves it (tied config + differing lm_head: untied)
        if ids.has_coords and mc.vocab_size != ids.vocab_size:
            raise ConfigError(f"model.checkpoint {path} has vocab_size {mc.vocab_size} but the tokenizer has "
                             f"{ids.vocab_size} ids (expand the vocabulary with tools/expand_coord_vocab.py)")
        if not ids.has_coords and mc.vocab_size < ids.vocab_size:
            raise ConfigError(f"model.checkpoint {path} has vocab_size {mc.vocab_size}, fewer rows than the "
                             f"tokenizer's {ids.vocab_size} ids (config key 'tokenizer.path': use the checkpoint's "
                             f"own tokenizer)")
    else:
        mc = ModelConfig.preset(cfg.model.preset).with_vocab_size(ids.vocab_size)
        mc = mc.replace(image_token_id=ids.image_pad, video_token_id=ids.video_pad,
                        vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end)
    over = cfg.model.overrides.to_dict() if hasattr(cfg.model.overrides, "to_dict") else dict(cfg.model.overrides)
    if over:
        mc = _replace_nested(mc, over, "model.overrides")
    if ids.has_coords and ids.coord_start + NUM_BINS > mc.vocab_size:
        raise ConfigError(f"coordinate ids [{ids.coord_start}, {ids.coord_start + NUM_BINS}) exceed vocab_size "
                          f"{mc.vocab_size} (config key 'tokenizer.path' / 'model.checkpoint')")
    return mc


def sinusoidal_rows(num: int, dim: int, std: float) -> np.ndarray:
    """[num, dim] rows sin/cos(k * w_j) (transformer-style frequencies over k = 0..num-1), scaled to per-element
    standard deviation `std`: neighbouring bins start with similar embeddings."""
    k = np.arange(num, dtype=np.float64)[:, None]
    half = dim // 2
    freqs = np.exp(-np.log(num) * np.arange(half) / max(half, 1)) * (np.pi / 2)
    ang = k * freqs[None]
    rows = np.concatenate([np.sin(ang), np.cos(ang)], axis=1)
    if rows.shape[1] < dim:
        rows = np.pad(rows, ((0, 0), (0, dim - rows.shape[1])))
    return (rows / rows.std() * std).astype(np.float32)


def sinusoidal_grid(num: int, dim: int, std: float) -> np.ndarray:
    """[num, dim] 2-D sin/cos position rows for a sqrt(num) x sqrt(num) table (row-major): a quarter of the
    features each for sin/cos of the row and of the column, frequencies geometric from pi/2 per cell (neighbours
    distinguishable) down to pi/(2g) (half a period over the grid), scaled to per-element std `std`."""
    g = math.isqrt(num)
    if g * g != num:
        raise ValueError(f"the position table has {num} rows, not a square grid")
    r, c = np.divmod(np.arange(num, dtype=np.float64), g)
    q = max(dim // 4, 1)
    freqs = (np.pi / 2) * (1.0 / g) ** (np.arange(q) / max(q - 1, 1))
    rows = np.concatenate([np.sin(r[:, None] * freqs), np.cos(r[:, None] * freqs),
                           np.sin(c[:, None] * freqs), np.cos(c[:, None] * freqs)], axis=1)[:, :dim]
    rows = np.pad(rows, ((0, 0), (0, dim - rows.shape[1])))
    return (rows / rows.std() * std).astype(np.float32)


def make_model_fn(cfg, mc, ids: TokenIds) -> tuple[Callable[[], nnx.Module], bool]:
    """(make_model, materialize). Random init: traceable (jit into shardings). From a checkpoint: eager load."""
    from coordexp_jax.model.qwen3vl import Qwen3VL
    from coordexp_jax.train import lora as lora_lib

    dtype, pdtype = _DT[cfg.model.dtype], _DT[cfg.model.param_dtype]

    def finish(model, fresh: bool):
        """Init options (only for a freshly initialised model: a checkpoint keeps its trained rows), then LoRA."""
        model.config = model.config.replace(attention=cfg.model.attention)  # an execution option, also for checkpoints
        if fresh and cfg.model.coord_init == "sinusoidal" and ids.has_coords:
            H = mc.text.hidden_size
            rows = jnp.asarray(sinusoidal_rows(NUM_BINS, H, 0.02))
            emb = model.language_model.embed_tokens.embedding
            emb[...] = emb[...].at[ids.coord_start:ids.coord_start + NUM_BINS].set(rows.astype(emb.dtype))
            if model.lm_head is not None:
                k = model.lm_head.kernel
                k[...] = k[...].at[:, ids.coord_start:ids.coord_start + NUM_BINS].set(rows.T.astype(k.dtype))
        if fresh and cfg.model.vision_pos_init == "sinusoidal":
            # The learned table starts as N(0, 0.02): 20x weaker than the patch embedding, so the visual tokens
            # carry almost no absolute position until it is learned. A 2-D sin/cos grid gives it from step 0.
            pe = model.visual.pos_embed
            pe[...] = jnp.asarray(sinusoidal_grid(*pe[...].shape, cfg.model.vision_pos_std), pe[...].dtype)
        from coordexp_jax.model.spatial_linking import maybe_attach

        maybe_attach(model, cfg, seed=cfg.train.seed + 3)  # model.spatial_linking (before LoRA: never adapted)
        if cfg.lora.enabled:
            exclude = None if cfg.lora.include_vision else r"(^|/)(vision|visual)\w*(/|$)"
            n = lora_lib.apply_lora(model, cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha,
                                    nnx.Rngs(cfg.train.seed + 1), exclude=exclude)
            log.info("LoRA rank %d on %d layers", cfg.lora.rank, n)
        return model

    if cfg.model.checkpoint:
        from coordexp_jax.weights.checkpoint import load_checkpoint

        def load():
            log.info("starting weights: %s (model.checkpoint)", os.path.abspath(cfg.model.checkpoint))
            _, model = load_checkpoint(cfg.model.checkpoint, pdtype, compute_dtype=dtype, remat=cfg.model.remat,
                                       scan_layers=mc.scan_layers, remat_policy=mc.remat_policy)  # mc's layout
            return finish(model, fresh=False)

        return load, True

    def init():
        return finish(Qwen3VL(mc, dtype=dtype, param_dtype=pdtype, rngs=nnx.Rngs(cfg.train.seed),
                              remat=cfg.model.remat), fresh=True)

    return init, False


# ----------------------------------------------------------------------------------------------------- data
def synthetic_dir(cfg) -> str:
    if cfg.data.path:
        return cfg.data.path
    key = json.dumps({k: cfg.data[k] for k in ("image_size", "num_train", "num_eval", "num_classes", "min_objects",
                                                 "max_objects", "seed")}, sort_keys=True)
    root = os.environ.get("COORDEXP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "coordexp_jax"))
    return os.path.join(root, "synthetic_" + hashlib.sha1(key.encode()).hexdigest()[:10])


def _synthetic_sources(cfg) -> tuple[list, list]:
    from coordexp_jax.data import synthetic as syn
    from coordexp_jax.data.pipeline import SourceSpec

    s = cfg.data.image_size
    classes = syn.SHAPES[: cfg.data.num_classes]
    scfg = syn.SyntheticConfig(image_size=(s, s), classes=tuple(classes), min_objects=cfg.data.min_objects,
                               max_objects=cfg.data.max_objects)
    out = synthetic_dir(cfg)
    paths = syn.ensure_dataset(out, cfg.data.num_train, max(cfg.data.num_eval, 1), seed=cfg.data.seed, cfg=scfg)
    key = "grounding" if cfg.data.synthetic_task == "grounding" else "jsonl"  # one record per unique phrase
    return ([SourceSpec("synthetic", paths["train"][key])],
            [SourceSpec("synthetic_val", paths["val"][key])])


def _fusion_specs(cfg) -> list:
    from coordexp_jax.data.pipeline import specs_from_config
    from coordexp_jax.train.config import load_config_file

    path = _check_path("data.path", cfg.data.path)
    if path.endswith(".py"):
        fusion = load_config_file(path)
    else:
        with open(path) as f:
            fusion = json.load(f)
    specs = specs_from_config(fusion)
    for s in specs:
        _check_path(f"data.path ({path}): source '{s.name}'", s.path)
    return specs


def prompt_config(cfg, mc):
    from coordexp_jax.data.image import ImageConfig
    from coordexp_jax.data.prompts import PromptConfig

    v = mc.vision
    px = cfg.data.image_size ** 2
    image = ImageConfig(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                        temporal_patch_size=v.temporal_patch_size, min_pixels=min(px, 32 * 32 * 4), max_pixels=px)
    side = cfg.data.image_size // v.patch_size
    return PromptConfig(protocol=cfg.data.protocol, max_objects=cfg.data.max_objects, text_bucket=cfg.data.seq_len,
                        max_text_len=cfg.data.seq_len, min_text_len=min(64, cfg.data.seq_len), image=image,
                        patches_per_slot=max(4, (side * side + 3) // 4 * 4))


def data_specs(cfg) -> tuple[list, list | None]:
    """(train SourceSpecs, eval SourceSpecs or None) for `cfg.data`; missing paths raise DataPathError."""
    from coordexp_jax.data.pipeline import SourceSpec

    if cfg.data.kind == "synthetic":
        return _synthetic_sources(cfg)
    if cfg.data.kind == "jsonl":
        train = [SourceSpec("data", _check_path("data.path", cfg.data.path))]
    else:
        train = _fusion_specs(cfg)
    ev = [SourceSpec("eval", _check_path("data.eval_path", cfg.data.eval_path))] if cfg.data.eval_path else None
    return train, ev


def per_process_batch(global_batch: int) -> int:
    n = jax.process_count()
    if global_batch % n:
        raise ConfigError(f"config key 'data.batch_size' = {global_batch} is not divisible by {n} processes")
    return global_batch // n


def build_components(cfg) -> Components:
    """The real components: Qwen3-VL (random init or a checkpoint), the Stage-1 objective, Grain data."""
    from coordexp_jax.data.pipeline import make_train_iterator
    from coordexp_jax.train.objective import Stage1Objective
    from coordexp_jax.train.stage2 import check_protocol

    check_protocol(cfg)  # Stage-2 with qwen_text: refused before anything is built
    ids = token_ids(cfg)
    mc = model_config(cfg, ids)
    make_model, materialize = make_model_fn(cfg, mc, ids)
    if cfg.data.kind == "hoi":  # chat records with boxes in the prompt; batches carry `links` (data/hoi.py)
        from coordexp_jax.data import hoi

        pcfg, tdir = prompt_config(cfg, mc), tokenizer_dir(cfg)
        data_iter, eval_iter_fn, eval_records = hoi.build_train_data(
            cfg, pcfg, mc, tdir, per_process_batch(cfg.data.batch_size), per_process_batch(cfg.eval.batch_size))
        return Components(make_model=make_model, objective=Stage1Objective.from_config(cfg.loss, ids.coord_start,
                                                                                       mc.vocab_size),
                          data_iter=data_iter, vocab_size=mc.padded_vocab_size, coord_start=ids.coord_start,
                          materialize=materialize, eval_iter_fn=eval_iter_fn, model_config=mc, token_ids=ids,
                          tokenizer_dir=tdir, extra={"prompt_config": pcfg, "eval_specs": None,
                                                     "hoi_eval_records": eval_records})
    train_specs, eval_specs = data_specs(cfg)
    pcfg = prompt_config(cfg, mc)
    tdir = tokenizer_dir(cfg)
    data_iter = make_train_iterator(train_specs, pcfg, batch_size=per_process_batch(cfg.data.batch_size),
                                    tokenizer_dir=tdir, seed=cfg.data.seed, num_workers=cfg.data.worker_count,
                                    model_config=mc)
    eval_iter_fn = None
    if eval_specs and cfg.data.num_eval > 0:
        def eval_iter_fn():
            import dataclasses as dc

            specs = [dc.replace(s, max_records=cfg.data.num_eval) for s in eval_specs]
            return make_train_iterator(specs, pcfg, batch_size=per_process_batch(cfg.eval.batch_size),
                                       tokenizer_dir=tdir, seed=0, num_workers=0, model_config=mc)
    objective = Stage1Objective.from_config(cfg.loss, ids.coord_start, mc.vocab_size)
    return Components(make_model=make_model, objective=objective, data_iter=data_iter,
                      vocab_size=mc.padded_vocab_size, coord_start=ids.coord_start, materialize=materialize,
                      eval_iter_fn=eval_iter_fn, model_config=mc, token_ids=ids, tokenizer_dir=tdir,
                      extra={"prompt_config": pcfg, "eval_specs": eval_specs})


def num_params(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))
