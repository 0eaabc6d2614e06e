"""Rollouts and training batches across processes (`jax.distributed`): every process holds its own rows, the arrays
the model sees are global.

Design (docs/training.md, "Stage-2 on several processes"): the rollout runs as ONE SPMD program on the global,
batch-sharded prompt batch with the global (fsdp/tensor-sharded) parameters of the train state, the same way the
train step runs. Each process only ever touches its own rows on the host: it pads its prompts to the shape buckets
that every process agrees on (one tiny all-gather of the local lengths), hands them to
`jax.make_array_from_process_local_data`, and reads back the rows its own devices hold
(`Array.addressable_shards`: no gather of the other processes' tokens). Matching and the rewritten rows are computed
on the host where the rows live; the new batch goes to the train step as global arrays again.

Why not one independent rollout per process: on a pod the parameters are sharded over hosts (fsdp), so a
per-process rollout would first need a full replicated copy of the weights on every host (the memory the sharding
saves) and a second compiled program; the SPMD rollout reuses the train state's sharding as it is and scales with the
mesh like the train step.

Image slots: `visual_index [B, S]` points into the flat merged-token array `[I * P / m^2]` of the batch it was
collated with. Once the slots of all processes are laid side by side in one global `[I_global, P, F]` array, this
process's indices must be shifted by the merged tokens of the slots in front of its own (`offset_visual_index`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from coordexp_jax.errors import CoordExpError
from coordexp_jax.rollout.sampler import VISION_KEYS, Rollout, bucket_inputs, next_pow2
from coordexp_jax.train import sharding as shd

# arrays whose first dimension is the image slot, not the row ([I, ...]); `vision_token_rect` too
_SLOT_KEYS = tuple(VISION_KEYS) + ("vision_token_rect",)


class MultiHostError(CoordExpError, ValueError):
    """The processes of one run hold batches that cannot form one global batch (different shapes)."""


def allgather_ints(values) -> np.ndarray:
    """`[n]` ints of this process -> `[processes, n]` (every process gets all rows; one collective)."""
    v = np.asarray(values, np.int64).reshape(-1)
    if jax.process_count() == 1:
        return v[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(v)).reshape(jax.process_count(), -1)


def allgather_floats(values) -> np.ndarray:
    """`[n]` floats of this process -> `[processes, n]` float64 (through float32 on the wire)."""
    v = np.asarray(values, np.float32).reshape(-1)
    if jax.process_count() == 1:
        return v[None].astype(np.float64)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(v), np.float64).reshape(jax.process_count(), -1)


def allgather_columns(columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Per-row host values of this process, `{name: [n_name]}` -> `{name: [processes * n_name]}` float64, process 0's
    rows first (one collective). Every process must pass the same names with the same lengths (equal per-process
    batches). Single process: the columns as float64, values unchanged. Values travel as float32
    (`allgather_floats`)."""
    cols = {k: np.asarray(v, np.float64).reshape(-1) for k, v in columns.items()}
    if jax.process_count() == 1:
        return cols
    names = sorted(cols)
    sizes = [len(cols[k]) for k in names]
    allv = allgather_floats(np.concatenate([cols[k] for k in names]) if names else np.zeros(0))
    ends = np.cumsum(sizes)
    return {k: allv[:, e - n:e].reshape(-1) for k, n, e in zip(names, sizes, ends)}


def _batch_dim(name: str) -> int:
    return 1 if name == "positions" else 0


def local_offset(sharding: NamedSharding, global_shape: tuple, dim: int) -> int:
    """Index along `dim` of the first element this process's devices hold (0 for a replicated dimension)."""
    idx = sharding.addressable_devices_indices_map(tuple(global_shape))
    return min((s[dim].start or 0) if isinstance(s[dim], slice) else 0 for s in idx.values())


def global_shape(name: str, local_shape: tuple, accum_axis: bool = False) -> tuple:
    """The global shape of a per-process batch array: its row (or image-slot) dimension times the processes."""
    shape = list(local_shape)
    dim = (1 if accum_axis else 0) + _batch_dim(name)
    if len(shape) > dim:
        shape[dim] *= jax.process_count()
    return tuple(shape)


def offset_visual_index(batch: Mapping[str, np.ndarray], mesh: Mesh, merge: int, accum_axis: bool = False) -> dict:
    """Shifts this process's `visual_index` (`[B, S]`, or `[A, B, S]` with `accum_axis`) by the merged tokens of the
    global image slots in front of its own: slot offset (from the batch sharding of `pixel_values [I, P, F]`) times
    P / merge^2. -1 (not a placeholder) stays -1. Single process or no images: the batch unchanged.

    Raises MultiHostError when the image slots are not sharded over the processes (the slot dimension not divisible by
    the data-parallel size), since the global slot array would then not hold every process's images."""
    if jax.process_count() == 1 or "visual_index" not in batch or "pixel_values" not in batch:
        return dict(batch)
    pv = np.asarray(batch["pixel_values"])
    gshape = global_shape("pixel_values", pv.shape, accum_axis)
    lead = 1 if accum_axis else 0
    spec = shd.batch_spec("pixel_values", gshape, mesh, accum_axis)
    if len(spec) <= lead or spec[lead] is None:
        raise MultiHostError(f"batch key 'pixel_values': {gshape[lead]} global image slots are not divisible by the "
                             f"data-parallel size {dict(mesh.shape)}; use a per-process batch the mesh divides")
    slot0 = local_offset(NamedSharding(mesh, spec), gshape, lead)
    per_slot = pv.shape[lead + 1] // (merge * merge)
    vi = np.asarray(batch["visual_index"])
    out = dict(batch)
    out["visual_index"] = np.where(vi >= 0, vi + slot0 * per_slot, vi).astype(vi.dtype)
    return out


def put_global(batch: Mapping[str, Any], mesh: Mesh, accum_axis: bool = False) -> dict:
    """Per-process numpy batch -> global arrays sharded over ('data', 'fsdp') on the row / slot dimension
    (`sharding.batch_spec`). A nested dict (`links`) is placed key by key with its rows on dimension 0."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, Mapping):
            out[k] = put_global(v, mesh, accum_axis)
            continue
        v = np.asarray(v)
        gs = global_shape(k, v.shape, accum_axis)
        spec = shd.batch_spec(k, gs, mesh, accum_axis)
        dim = (1 if accum_axis else 0) + _batch_dim(k)
        if jax.process_count() > 1 and len(gs) > dim and (len(spec) <= dim or spec[dim] is None):
            raise MultiHostError(f"batch key {k!r}: global size {gs[dim]} of its row dimension is not divisible by "
                                 f"the data-parallel size {dict(mesh.shape)}")
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), v, gs)
    return out


def local_rows(x: jax.Array, mesh: Mesh, dim: int = 0) -> np.ndarray:
    """The rows (along `dim`) of a global array that this process's devices hold, in order, as numpy: the array is
    first laid out over ('data', 'fsdp') on `dim` (a no-op when XLA already chose that), then the addressable shards
    are read (replicas over 'tensor' counted once). Single process: the whole array."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    axes = tuple(a for a in shd.BATCH_AXES if mesh.shape[a] > 1)
    spec = [None] * x.ndim
    spec[dim] = axes if len(axes) > 1 else axes[0]
    x = jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, P(*spec)))(x)
    pieces = {}
    for s in x.addressable_shards:
        start = s.index[dim].start or 0
        if start not in pieces:
            pieces[start] = np.asarray(s.data)
    return np.concatenate([pieces[k] for k in sorted(pieces)], axis=dim)


def agreed_prompt_bucket(prompts: Mapping[str, np.ndarray], min_prompt_len: int) -> int:
    """The prompt-length bucket every process uses: the largest of the processes' power-of-two buckets."""
    L = int(np.asarray(prompts["input_ids"]).shape[1])
    return int(allgather_ints([max(next_pow2(L), int(min_prompt_len))]).max())


def generate_global(sampler, prompts: Mapping[str, np.ndarray], mesh: Mesh, *, merge: int = 2, key=None) -> Rollout:
    """Rolls out this process's left-padded prompts (`[B_local, L]`, rollout contract of `rollout/sampler.py`) as
    part of the global batch of all processes, with `sampler.state` (global arrays: the train state's parameters).
    Every process must call it with the same local shapes except the prompt length (agreed by one all-gather).
    Returns this process's B_local rows. Greedy or sampled: the key is the same on every process and the sampling
    of row r does not depend on the layout (threefry is partitionable), so the rows equal a one-process rollout of
    the same global batch up to float32 summation order.

    Raises MultiHostError when the processes' local batch shapes differ (besides the prompt length)."""
    cfg = sampler.config
    Lb = agreed_prompt_bucket(prompts, cfg.min_prompt_len)
    bucketed, B = bucket_inputs(prompts, pad_id=sampler.ids.pad, min_prompt_len=Lb, bucket_batch=cfg.bucket_batch)
    shapes = [int(d) for k in sorted(bucketed) if not isinstance(bucketed[k], Mapping)
              for d in np.shape(bucketed[k])]
    allg = allgather_ints(shapes)
    if (allg != allg[0]).any():
        raise MultiHostError(f"processes hold rollout batches of different shapes: process {jax.process_index()} "
                             f"{ {k: np.shape(v) for k, v in bucketed.items() if not isinstance(v, Mapping)} }")
    bucketed = offset_visual_index(bucketed, mesh, merge)
    dev = put_global(bucketed, mesh)
    if key is None:
        key = jax.random.key(cfg.seed)
    # the same key on every process as one replicated global array (device_put cannot target other hosts' devices)
    data = jax.make_array_from_process_local_data(NamedSharding(mesh, P()), np.asarray(jax.random.key_data(key)))
    key = jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))
    carry = sampler._prefill(sampler.state, dev, key)
    carry = sampler._decode(sampler.state, carry)
    out = {k: local_rows(carry[k], mesh) for k in ("tokens", "logprobs", "sample_logprobs", "coord", "lengths", "done")}
    return Rollout(tokens=out["tokens"][:B], logprobs=out["logprobs"][:B],
                   sample_logprobs=out["sample_logprobs"][:B], coord_expectation=out["coord"][:B],
                   lengths=out["lengths"][:B], finished=out["done"][:B])
