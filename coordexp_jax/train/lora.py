"""LoRA on chosen linear layers, with Flax NNX's `nnx.LoRA`, and merging it back into the base weights for export.

`apply_lora` replaces each linear layer (`nnx.Linear` or the model's `Dense`) whose attribute name is in `targets` by an `nnx.LoRA` wrapping it
(`y = base(x) + (alpha / rank) * x @ A @ B`, B initialised to zero so training starts from the base model). The
adapter parameters are `nnx.LoRAParam`s, which `optim.trainable_filter` keeps trainable while the base weights are
frozen (the coordinate-token rows of the embedding stay trainable through `optim.coord_rows`).
`merge_lora` folds `W <- W + (alpha / rank) A @ B` and puts the plain layer back.

Scanned models (`ModelConfig.scan_layers`): a stacked layer's kernel is [n_layers, in, out] (sharding names
('layers', ...)); its adapters get the same leading axis, A [n_layers, in, rank] (one independent draw per layer)
and B [n_layers, rank, out], and the scan body sees the per-layer [in, rank] / [rank, out] slices.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

from coordexp_jax.model.scan import LAYERS_AXIS


class ScaledLoRA(nnx.LoRA):
    """`nnx.LoRA` with the usual alpha / rank scale on the adapter path (nnx.LoRA itself has no scale)."""

    def __init__(self, in_features: int, lora_rank: int, out_features: int, *, scale: float, **kwargs):
        super().__init__(in_features, lora_rank, out_features, **kwargs)
        self.scale = float(scale)

    def __call__(self, x, **kwargs):
        base = self.base_module(x, **kwargs)
        x, a, b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        return base + (self.scale * (x @ a @ b)).astype(base.dtype)


def _modules(model: nnx.Module):
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and path:
            yield path, node


def _is_stacked(param) -> bool:
    """A kernel of a scanned stack: [n_layers, in, out] with the 'layers' sharding name first."""
    names = param.get_metadata().get("out_sharding") or ()
    return param[...].ndim == 3 and len(names) == 3 and names[0] == LAYERS_AXIS


def _is_linear(mod) -> bool:
    """nnx.Linear, or the model's Dense: a module whose `kernel` is a 2-D [in, out] Param (or a stacked
    [n_layers, in, out] one) and y = x @ kernel (+ b)."""
    k = getattr(mod, "kernel", None)
    return isinstance(mod, nnx.Module) and isinstance(k, nnx.Param) and (k[...].ndim == 2 or _is_stacked(k))


def _set(model: nnx.Module, path: tuple, value) -> None:
    parent = model
    for k in path[:-1]:
        parent = parent[k] if isinstance(k, int) else getattr(parent, k)
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def apply_lora(model: nnx.Module, targets: Sequence[str], rank: int, alpha: float, rngs: nnx.Rngs,
               exclude: str | None = r"(^|/)(vision|visual)\w*(/|$)") -> int:
    """Wraps every `nnx.Linear` named in `targets` (path not matching `exclude`) in a `ScaledLoRA`, in place.

    Returns the number of layers adapted; raises if none matched (a typo in `lora.targets` would otherwise train
    nothing). Add-on modules (the regression heads, spatial linking) are trained whole, never adapted.
    """
    hits = []
    for path, mod in list(_modules(model)):
        name = path[-1]
        p = "/".join(str(k) for k in path)
        if re.match(r"(regression_heads|spatial_linking)(/|$)", p):
            continue
        if name in targets and _is_linear(mod) and not (exclude and re.search(exclude, p)):
            hits.append((path, mod))
    if not hits:
        raise ValueError(f"lora: no linear layer (nnx.Linear or a module with a 2-D 'kernel') is named any of "
                         f"lora.targets={tuple(targets)}")
    for path, lin in hits:
        kernel = lin.kernel[...]
        stacked = _is_stacked(lin.kernel)
        # adapters inherit the kernel's logical axis names so that the mesh rules shard them like their layer
        names = lin.kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
        if stacked:
            names = names[1:]
        meta_a = {"out_sharding": (names[0], "lora_rank"), "eager_sharding": False}
        meta_b = {"out_sharding": ("lora_rank", names[1]), "eager_sharding": False}
        kw = dict(scale=alpha / rank, dtype=getattr(lin, "dtype", None), param_dtype=kernel.dtype, rngs=rngs,
                  a_metadata=meta_a, b_metadata=meta_b)
        wrapped = ScaledLoRA(kernel.shape[-2], rank, kernel.shape[-1], base_module=lin, **kw)
        if stacked:  # one independent draw per layer, stacked on the leading 'layers' axis
            draws = [wrapped] + [ScaledLoRA(kernel.shape[-2], rank, kernel.shape[-1], **kw)
                                 for _ in range(kernel.shape[0] - 1)]
            for attr, meta in (("lora_a", meta_a), ("lora_b", meta_b)):
                value = jnp.stack([getattr(d, attr)[...] for d in draws])
                setattr(wrapped, attr, nnx.LoRAParam(value, out_sharding=(LAYERS_AXIS,) + meta["out_sharding"],
                                                     eager_sharding=False))
        _set(model, path, wrapped)
    return len(hits)


def merge_lora(model: nnx.Module) -> int:
    """Folds every `ScaledLoRA` into its base `nnx.Linear` (W += scale * A @ B) and removes it, in place.

    Returns the number of layers merged.
    """
    hits = [(p, m) for p, m in _modules(model) if isinstance(m, ScaledLoRA)]
    for path, lora in hits:
        lin = lora.base_module
        k = lin.kernel[...]
        # [in, r] @ [r, out], or batched over the leading layers axis of a scanned stack
        delta = lora.scale * (lora.lora_a[...].astype(jnp.float32) @ lora.lora_b[...].astype(jnp.float32))
        lin.kernel[...] = (k.astype(jnp.float32) + delta).astype(k.dtype)
        _set(model, path, lin)
    return len(hits)
