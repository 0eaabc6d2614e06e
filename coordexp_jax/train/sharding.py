"""Device mesh, the logical-name -> mesh-axis rule table, and the shardings of parameters and batches.

The mesh has axes ('data', 'fsdp', 'tensor') with sizes from the config (-1 = all remaining devices). Parameters carry
logical axis names (`PartitionSpec('vocab', 'embed')`, from `model.sharding`); `resolve_spec` maps them to mesh axes
with the config's rule table. A dimension that the chosen mesh axes do not divide is replicated and reported once
(silently dropping an axis is a known trap: jax_lessons.md). Batches are sharded over ('data', 'fsdp') on their
batch dimension. The same code runs on 1 CPU, simulated CPU devices, a GPU node and a TPU pod.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

log = logging.getLogger(__name__)


def maybe_initialize_distributed() -> bool:
    """Calls `jax.distributed.initialize()` when the environment describes several processes.

    Recognised: `COORDEXP_COORDINATOR` (host:port) with `COORDEXP_NUM_PROCESSES` and `COORDEXP_PROCESS_ID`; or the
    cluster environments JAX detects itself (SLURM, Open MPI, TPU pods, Kubernetes), signalled by `COORDEXP_DISTRIBUTED=1`.
    Returns True when initialised. Must run before any other JAX call.
    """
    addr = os.environ.get("COORDEXP_COORDINATOR")
    if addr:
        n = int(os.environ["COORDEXP_NUM_PROCESSES"])
        pid = int(os.environ["COORDEXP_PROCESS_ID"])
        local = os.environ.get("COORDEXP_LOCAL_DEVICE_IDS")
        kwargs = {}
        if local:
            kwargs["local_device_ids"] = [int(i) for i in local.split(",")]
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid, **kwargs)
        return True
    if os.environ.get("COORDEXP_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolves the ('data', 'fsdp', 'tensor') sizes; at most one may be -1 (= the rest)."""
    dims = [int(sizes[a]) for a in AXES]
    free = [i for i, d in enumerate(dims) if d == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one of {AXES} may be -1, got {dict(zip(AXES, dims))}")
    known = math.prod(d for d in dims if d != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed mesh sizes {dims}")
        dims[free[0]] = num_devices // known
    if math.prod(dims) != num_devices:
        raise ValueError(
            f"mesh: sizes {dict(zip(AXES, dims))} need {math.prod(dims)} devices but {num_devices} are available"
        )
    return tuple(dims)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `Mesh` with axes ('data', 'fsdp', 'tensor') over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices()) if devices is None else list(devices)
    shape = mesh_shape(sizes, len(devices))
    if devices == list(jax.devices()):
        try:  # topology-aware device order where JAX knows one (TPU, GPU)
            from jax.experimental import mesh_utils

            arr = mesh_utils.create_device_mesh(shape, devices=devices)
        except Exception:  # noqa: BLE001 - plain order is always valid
            arr = np.asarray(devices).reshape(shape)
    else:
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, AXES)


def _axes_size(mesh: Mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


_reported: set[tuple] = set()


def resolve_spec(
    logical: P | Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]],
    name: str = "",
) -> P:
    """Maps a logical PartitionSpec to mesh axes with `rules` (first match wins).

    A mesh axis already used by an earlier dimension, an axis of size 1, or axes that do not divide the dimension
    are dropped (that dimension replicated); non-divisible cases are logged once per parameter name.
    """
    if logical is None:
        return P()
    table = {}
    for lname, axes in rules:
        table.setdefault(lname, axes)
    used: set[str] = set()
    out = []
    logical = tuple(logical) + (None,) * (len(shape) - len(tuple(logical)))
    for dim, lname in zip(shape, logical):
        if lname is None or lname == "layers":  # the stacking axis of scanned layers (model.scan) is never sharded
            out.append(None)
            continue
        if lname not in table:
            raise ValueError(f"sharding: logical axis name '{lname}' of '{name}' has no rule in mesh.rules")
        axes = table[lname]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and dim % _axes_size(mesh, axes):
            key = (name, lname, dim, axes)
            if key not in _reported:
                _reported.add(key)
                log.warning("sharding: '%s' dim '%s' of size %d is not divisible by mesh axes %s; replicated",
                            name, lname, dim, axes)
            axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def tree_shardings(logical_specs: Any, shapes: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) given a matching pytree of logical specs."""
    paths_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    specs = jax.tree_util.tree_leaves(logical_specs, is_leaf=lambda x: isinstance(x, P) or x is None)
    if len(specs) != len(paths_shapes):
        raise ValueError(f"sharding: {len(specs)} logical specs for {len(paths_shapes)} arrays")
    out = [
        NamedSharding(mesh, resolve_spec(spec, leaf.shape, mesh, rules, jax.tree_util.keystr(path)))
        for spec, (path, leaf) in zip(specs, paths_shapes)
    ]
    warn_replicated([(jax.tree_util.keystr(p), leaf) for p, leaf in paths_shapes], out, mesh)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shapes), out)


REPLICATED_WARN_BYTES = 16 * 2**20


def warn_replicated(named_arrays: Sequence[tuple[str, Any]], shardings: Sequence[NamedSharding], mesh: Mesh,
                    limit_bytes: int = REPLICATED_WARN_BYTES) -> list[str]:
    """Logs one warning naming each array larger than `limit_bytes` (default 16 MiB) that its sharding leaves whole
    on every device of a mesh with an fsdp or tensor axis > 1 (its optimizer moments are then whole there too: every
    logical rule of its dimensions maps to unused, size-1 or non-dividing axes). Returns the names; none on a
    single device or a data-only mesh, where replication is the intent. Called by `tree_shardings` at start-up.

    named_arrays: (name, array or ShapeDtypeStruct) pairs; shardings: one NamedSharding each.
    """
    if all(n == 1 for a, n in mesh.shape.items() if a != "data"):
        return []  # one device, or pure data parallelism: replication is the intent
    names = []
    for (name, leaf), sh in zip(named_arrays, shardings):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if nbytes > limit_bytes and all(a is None for a in sh.spec):
            names.append(name)
            key = ("replicated", name, tuple(leaf.shape))
            if key not in _reported:
                _reported.add(key)
                log.warning("sharding: '%s' %s (%.0f MiB) is replicated on all %d devices of mesh %s; add a "
                            "mesh.rules entry that shards one of its dimensions", name, tuple(leaf.shape),
                            nbytes / 2**20, mesh.size, dict(mesh.shape))
    return names


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# Batch arrays whose batch (or image-slot) dimension is not the first one after the micro-batch axis.
_BATCH_DIM = {"positions": 1}


def batch_spec(name: str, shape: Sequence[int], mesh: Mesh, accum_axis: bool = True) -> P:
    """The PartitionSpec of a batch array: its batch (or image-slot) dimension over ('data', 'fsdp').

    `shape` includes the leading micro-batch axis when `accum_axis`. Arrays whose batch dimension the data-parallel
    size does not divide are replicated.
    """
    lead = 1 if accum_axis else 0
    dim = lead + _BATCH_DIM.get(name, 0)
    if len(shape) <= dim:
        return P()
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    if not axes or shape[dim] % _axes_size(mesh, axes):
        return P()
    spec = [None] * len(shape)
    spec[dim] = axes if len(axes) > 1 else axes[0]
    return P(*spec)


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, accum_axis: bool = True) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, batch_spec(k, np.shape(v), mesh, accum_axis)) for k, v in batch.items()}


def put_batch(batch: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding],
              global_shapes: Mapping[str, tuple] | None = None) -> dict[str, jax.Array]:
    """Host numpy batch -> global jax Arrays. Each process passes its own slice of the batch dimension (single
    process: the whole batch); `global_shapes` gives the global shapes when they differ from the local ones."""
    out = {}
    for k, v in batch.items():
        gshape = None if global_shapes is None else global_shapes[k]
        out[k] = jax.make_array_from_process_local_data(shardings[k], np.asarray(v), gshape)
    return out


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (nnx.eval_shape drops them: flax #5110)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
