"""Scanned layers: a stack of identical modules stored as one module with a leading 'layers' axis on every
parameter, run under `jax.lax.scan` with an optional remat policy (docs/model.md, "Scanned layers").

`stack_modules([m0, m1, ...])` builds the stacked module from per-layer modules (so a scanned model built from a
seed holds exactly the values of the per-layer model built from the same seed); `scan_apply` runs a body over the
layers; `stack_pure` / `unstack_pure` convert pure-dict parameter trees between the two layouts (checkpoints).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LAYERS_AXIS = "layers"  # logical name of the stacking axis; never sharded (train/sharding.resolve_spec)

# Module paths (in the pure-dict / nnx state) that hold per-layer modules, and the config field giving their count.
STACKED = ((("language_model", "layers"), lambda c: c.text.num_hidden_layers),
           (("visual", "blocks"), lambda c: c.vision.depth))


def stack_modules(modules) -> nnx.Module:
    """One module whose every Variable is the per-layer Variables stacked on a new leading axis [L, ...].

    The sharding names get LAYERS_AXIS in front. The result is only meant to be run through `scan_apply` (calling
    it directly would see the stacked shapes)."""
    graphdef, first = nnx.split(modules[0])
    states = [nnx.split(m)[1] for m in modules[1:]]
    flats = [dict(nnx.to_flat_state(first))] + [dict(nnx.to_flat_state(s)) for s in states]
    out = []
    for path, var in flats[0].items():
        value = jnp.stack([f[path].get_value() for f in flats])
        meta = dict(var.get_metadata())
        names = meta.get("out_sharding")
        if names is not None:
            meta["out_sharding"] = (LAYERS_AXIS,) + tuple(names)
        meta.pop("hijax", None), meta.pop("ref", None)
        out.append((path, type(var)(value, **meta)))
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def remat_policy(name: str):
    """jax.checkpoint policy for ModelConfig.remat_policy: "full" -> None (save nothing), else the named policy."""
    return None if name == "full" else getattr(jax.checkpoint_policies, name)


def scan_apply(stacked: nnx.Module, body, carry, *, remat: bool = False, policy: str = "full"):
    """Runs `carry = body(layer, i, carry)` for i = 0..L-1 under `jax.lax.scan`, `layer` being the i-th slice of
    `stacked` (an nnx module of the per-layer shapes). `body` must not modify the layer's Variables.

    remat: rematerialise each iteration in the backward pass with `policy` (ModelConfig.remat_policy).
    Returns the final carry."""
    graphdef, state = nnx.split(stacked)
    n = jax.tree.leaves(state)[0].shape[0]

    def step(c, xs):
        st, i = xs
        return body(nnx.merge(graphdef, st), i, c), None

    if remat:
        step = jax.checkpoint(step, policy=remat_policy(policy), prevent_cse=False)
    carry, _ = jax.lax.scan(step, carry, (state, jnp.arange(n, dtype=jnp.int32)))
    return carry


def unstack_module(stacked: nnx.Module) -> list[nnx.Module]:
    """The L per-layer modules of a stacked module (every Variable sliced at i, LoRA adapters included).

    For the rollout's decode loop (`Qwen3VL.decode_step(..., layers=...)`): sliced once per decode call, outside the
    `while_loop`, the layers run with static weights. Inside the loop `scan_apply` would slice every layer's weights
    per step, and XLA materialises those slices (a copy of the layer weights per generated token). Costs one copy
    of the stacked weights while the decode runs."""
    graphdef, state = nnx.split(stacked)
    n = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state)) for i in range(n)]


# ------------------------------------------------------------------------------------------ layout conversion
def _get(tree, path):
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _layer_keys(d: dict) -> list:
    """Keys of a per-layer dict ({0: ..., 1: ...} or {'0': ..., '1': ...} after a restore), in layer order."""
    return sorted(d, key=int)


def is_stacked_pure(pure: dict) -> bool | None:
    """True for a stacked parameter tree, False for a per-layer one, None when it holds neither stack."""
    for path, _ in STACKED:
        d = _get(pure, path)
        if isinstance(d, dict) and d:
            return not all(str(k).isdigit() for k in d)
    return None


def stack_pure(pure: dict) -> dict:
    """Per-layer pure-dict parameter tree -> stacked (a copy of the changed subtrees; other leaves shared)."""
    out = dict(pure)
    for path, _ in STACKED:
        d = _get(pure, path)
        if not isinstance(d, dict) or not d or not all(str(k).isdigit() for k in d):
            continue
        layers = [d[k] for k in _layer_keys(d)]
        _put(out, path, jax.tree.map(lambda *xs: jnp.stack(xs), *layers))
    return out


def unstack_pure(pure: dict) -> dict:
    """Stacked pure-dict parameter tree -> per-layer ({0: ..., 1: ...} under each stack)."""
    out = dict(pure)
    for path, _ in STACKED:
        d = _get(pure, path)
        if not isinstance(d, dict) or not d or all(str(k).isdigit() for k in d):
            continue
        n = jax.tree.leaves(d)[0].shape[0]
        _put(out, path, {i: jax.tree.map(lambda x, i=i: x[i], d) for i in range(n)})
    return out


def _put(tree: dict, path, value):
    for k in path[:-1]:
        tree[k] = dict(tree[k])
        tree = tree[k]
    tree[path[-1]] = value
