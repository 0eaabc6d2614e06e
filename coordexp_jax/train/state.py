"""TrainState: the whole mutable state of training as one pytree, and its creation with target shardings.

The model is split once with `nnx.split(model, trainable, ...)` into a static graphdef, the trainable parameters
(differentiated, updated) and everything else (`frozen`: frozen groups, LoRA base weights, non-parameter
variables). Step functions `nnx.merge` them back inside `jax.jit`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from coordexp_jax.train import sharding as shd


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params: trainable nnx.State; frozen: the rest of the model's state; opt_state: optax state
    of `params`; rng: uint32 [2] raw PRNG key; ema: EMA of `params` (or None); skipped: int32 [] count of
    batches skipped for a non-finite loss."""

    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array
    ema: Any
    skipped: jax.Array


def param_specs(state: Any, spec_fn: Callable[[Any], Any] | None) -> Any:
    """Logical PartitionSpecs of a model-state pytree: `spec_fn(state)` or, without one, the `sharding` metadata of
    the nnx Variables (None where absent)."""
    if spec_fn is not None:
        return spec_fn(state)
    try:
        return nnx.get_partition_spec(state)
    except Exception:  # noqa: BLE001 - no metadata: replicate
        return jax.tree.map(lambda _: P(), state)


def _opt_shardings(tx: optax.GradientTransformation, params_abs: Any, params_sh: Any, mesh: Mesh) -> Any:
    """Optimizer-state shardings: moments follow their parameter; everything else (counts) is replicated."""
    opt_abs = jax.eval_shape(tx.init, params_abs)
    rep = NamedSharding(mesh, P())
    return optax.tree_map_params(
        tx, lambda _, s: s, opt_abs, params_sh,
        transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, (NamedSharding, nnx.Variable)),
    )


def state_shardings(abstract: TrainState, tx: optax.GradientTransformation, mesh: Mesh, rules, spec_fn=None) -> TrainState:
    """NamedShardings for every leaf of an abstract TrainState (from `jax.eval_shape`)."""
    rep = NamedSharding(mesh, P())
    p_sh = shd.tree_shardings(param_specs(abstract.params, spec_fn), abstract.params, mesh, rules)
    f_sh = shd.tree_shardings(param_specs(abstract.frozen, spec_fn), abstract.frozen, mesh, rules)
    return TrainState(
        step=rep, params=p_sh, frozen=f_sh, opt_state=_opt_shardings(tx, abstract.params, p_sh, mesh),
        rng=rep, ema=None if abstract.ema is None else p_sh, skipped=rep,
    )


def create_state(
    make_model: Callable[[], nnx.Module],
    trainable: Callable,
    make_tx: Callable[[Any], optax.GradientTransformation],
    mesh: Mesh,
    rules,
    seed: int,
    ema: bool = False,
    spec_fn: Callable[[Any], Any] | None = None,
    materialize: bool = False,
) -> tuple[nnx.GraphDef, TrainState, TrainState, optax.GradientTransformation]:
    """Builds the model and its TrainState directly in the target shardings (under jit, so a large model is never
    materialised unsharded on one device).

    Args:
      make_model: () -> nnx.Module (random init, or loading weights).
      trainable: nnx filter of the trainable variables.
      make_tx: trainable params (abstract) -> optax transformation.
      materialize: `make_model` reads weights from disk (not traceable): it is called once eagerly and its arrays
        are placed into the target shardings; otherwise the whole init runs under jit with out_shardings.
    Returns:
      (graphdef, state, shardings of the state, tx).
    """
    loaded = None
    if materialize:
        loaded = nnx.split(make_model(), trainable, ...)

        def split():
            return loaded
    else:
        def split():
            return nnx.split(make_model(), trainable, ...)

    graphdef, params_abs, frozen_abs = nnx.eval_shape(split) if loaded is None else loaded
    tx = make_tx(params_abs)

    def init(params, frozen):
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, frozen=frozen, opt_state=tx.init(params),
            rng=jax.random.PRNGKey(seed), ema=jax.tree.map(lambda x: x.astype(jnp.float32), params) if ema else None,
            skipped=jnp.zeros((), jnp.int32),
        )

    def init_random():
        _, params, frozen = split()
        return init(params, frozen)

    abstract = jax.eval_shape(init_random)
    shardings = state_shardings(abstract, tx, mesh, rules, spec_fn)
    if loaded is None:
        state = jax.jit(init_random, out_shardings=shardings)()
    else:
        params = jax.device_put(loaded[1], shardings.params)
        frozen = jax.device_put(loaded[2], shardings.frozen)
        state = jax.jit(init, out_shardings=shardings, donate_argnums=(0, 1))(params, frozen)
    return graphdef, state, shardings, tx


def abstract_state(state_or_abstract: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings, for an orbax restore (jax_lessons.md: flax #5110)."""
    return shd.with_shardings(jax.eval_shape(lambda s: s, state_or_abstract), shardings)
