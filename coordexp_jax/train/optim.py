"""Optimizer: AdamW with warmup + cosine decay, global-norm clipping, parameter groups, freezing, coordinate rows.

Parameters are labelled by path into groups 'lm' (default), 'vision', 'merger' (config `optim.group_patterns`), and
LoRA adapters 'lora' (they inherit the lr multiplier of the group of the layer they adapt). A frozen group is not
trainable at all: `trainable_filter` leaves it out of the differentiated state, so it gets neither gradients nor
optimizer state. The vocabulary rows of the coordinate tokens in the embedding (and an untied lm_head) form the group
'coord_rows' with their own lr multiplier; they stay trainable when the rest of their matrix is frozen (LoRA, or a
frozen 'lm'), through a per-row gradient mask and update scale. The regression heads of sequential counting
(`model/regression.py`, paths under `regression_heads/`) form the group 'heads' (`optim.heads`, lr multiplier 5 by
default as in the VLM-regression counting recipe); they are new parameters, so they stay trainable under LoRA.
The spatial-linking module (`model/spatial_linking.py`, paths under `spatial_linking/`) likewise forms the group
'linking' (`optim.linking`), trainable under LoRA and with the vision tower frozen.

Each group differs only by a constant lr multiplier, and AdamW's update is elementwise, so the groups are one
`optax.adamw` followed by a per-parameter (or per-row) scale of its update: exactly AdamW with lr * multiplier
(weight decay included, as optax's decoupled decay is scaled by the lr too). Gradients are cast to float32 first, so
the optimizer states are float32 whatever the parameter dtype.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from coordexp_jax.data.tokenizer import NUM_BINS


def path_str(path: tuple) -> str:
    """'/'-joined names of a pytree key path (nnx.State paths, Variable '.value' dropped), e.g. 'layers/0/kernel'."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_group(path: str, patterns) -> str:
    """The group ('lm', 'vision' or 'merger') of a '/'-joined parameter path."""
    for group, pattern in patterns:
        if re.search(pattern, path):
            return group
    return "lm"


HEADS_PATTERN = r"(^|/)regression_heads(/|$)"
LINKING_PATTERN = r"^spatial_linking(/|$)"
# Add-on modules beside Qwen3-VL: whole groups of new parameters, trainable under LoRA unless their group is frozen
ADDON_GROUPS = (("heads", HEADS_PATTERN), ("linking", LINKING_PATTERN))


def is_heads_param(path: str) -> bool:
    """Whether a '/'-joined parameter path belongs to the regression heads (group 'heads')."""
    return re.search(HEADS_PATTERN, path) is not None


def addon_group(path: str) -> str | None:
    """The add-on group ('heads', 'linking') of a '/'-joined parameter path, or None for a Qwen3-VL parameter."""
    return next((g for g, pattern in ADDON_GROUPS if re.search(pattern, path)), None)


def is_coord_row_param(path: str, cfg: ml_collections.ConfigDict) -> bool:
    return any(re.search(p, path) for p in cfg.optim.coord_row_params)


def trainable_filter(cfg: ml_collections.ConfigDict) -> Callable[[tuple, Any], bool]:
    """An nnx filter `(path, variable) -> bool` selecting the trainable variables under `cfg.optim` and `cfg.lora`."""
    o = cfg.optim

    def f(path, var) -> bool:
        if not isinstance(var, nnx.Param):
            return False
        p = "/".join(str(k) for k in path)
        addon = addon_group(p)
        if addon is not None:
            return not o[addon].freeze
        group = param_group(p, o.group_patterns)
        if isinstance(var, nnx.LoRAParam):
            return not o[group].freeze
        if is_coord_row_param(p, cfg) and not o.coord_rows.freeze:
            return True
        if cfg.lora.enabled:
            return False
        return not o[group].freeze

    return f


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `optim.lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps` (or constant)."""
    o = cfg.optim
    warm = int(o.warmup_steps)
    if o.schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(o.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, o.lr, warm), optax.constant_schedule(o.lr)], [warm]
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=warm,
        decay_steps=max(total_steps, warm + 1), end_value=o.lr * o.min_lr_ratio,
    )


def multipliers(params: nnx.State, cfg: ml_collections.ConfigDict, vocab_size: int, coord_start: int) -> Any:
    """A pytree like `params` of lr multipliers: a float per parameter, or for coordinate-row parameters a
    `(axis, base, coord)` triple (rows [coord_start, coord_start + 1000) of the vocabulary axis get `coord`).
    With no coordinate tokens (`coord_start < 0`) there are no coordinate rows: every parameter gets its group's.

    Leaves are static Python values (built from the path and shape only).
    """
    o = cfg.optim

    def one(path, leaf):
        p = path_str(path)
        addon = addon_group(p)
        if addon is not None:
            return 0.0 if o[addon].freeze else float(o[addon].lr_mult)
        group = param_group(p, o.group_patterns)
        base = 0.0 if (o[group].freeze or cfg.lora.enabled) else float(o[group].lr_mult)
        if "lora_a" in p or "lora_b" in p:
            return float(o[group].lr_mult)
        if is_coord_row_param(p, cfg) and coord_start >= 0:
            axes = [i for i, d in enumerate(leaf.shape) if d == vocab_size]
            if len(axes) != 1:
                raise ValueError(f"optim: cannot find the vocabulary axis (size {vocab_size}) of '{p}' {leaf.shape}")
            coord = 0.0 if o.coord_rows.freeze else float(o.coord_rows.lr_mult)
            return (axes[0], base, coord)
        return base

    return jax.tree_util.tree_map_with_path(one, params)


def _expand(mult, leaf, coord_start: int):
    """The multiplier of `mult` broadcastable against `leaf`."""
    if not isinstance(mult, tuple):
        return mult
    axis, base, coord = mult
    n = leaf.shape[axis]
    rows = jnp.arange(n)
    m = jnp.where((rows >= coord_start) & (rows < coord_start + NUM_BINS), coord, base).astype(jnp.float32)
    shape = [1] * leaf.ndim
    shape[axis] = n
    return m.reshape(shape)


def _is_mult(x):
    return isinstance(x, tuple) and len(x) == 3 and isinstance(x[0], int)


def make_optimizer(cfg: ml_collections.ConfigDict, params: nnx.State, total_steps: int, vocab_size: int,
                   coord_start: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer of the trainable `params` (shapes suffice) and its lr schedule.

    Chain: float32 grads -> zero the gradients of frozen rows -> clip by global norm -> AdamW(schedule) with weight
    decay on matrices only -> scale each update by its group's lr multiplier.
    """
    o = cfg.optim
    sched = schedule(cfg, total_steps)
    mults = multipliers(params, cfg, vocab_size, coord_start)
    mult_leaves = jax.tree.leaves(mults, is_leaf=_is_mult)
    treedef = jax.tree.structure(params)

    def _apply(updates, fn):
        leaves = treedef.flatten_up_to(updates)
        return treedef.unflatten([fn(u, m) for u, m in zip(leaves, mult_leaves)])

    def mask_rows(updates, state, params=None):
        del params
        # frozen rows (multiplier 0) must not count in the clipping norm nor move Adam's moments
        out = _apply(updates, lambda u, m: u * (_expand(m, u, coord_start) != 0) if _is_mult(m) else u)
        return out, state

    def scale(updates, state, params=None):
        del params
        return _apply(updates, lambda u, m: (u * _expand(m, u, coord_start)).astype(u.dtype)), state

    def to_f32(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: g.astype(jnp.float32), updates), state

    stateless = lambda fn: optax.GradientTransformation(lambda p: optax.EmptyState(), fn)  # noqa: E731
    chain = [stateless(to_f32), stateless(mask_rows)]
    if o.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(o.clip_norm))
    chain.append(
        optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                    mu_dtype=jnp.float32, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    )
    chain.append(stateless(scale))
    return optax.chain(*chain), sched
