"""The pure train step: `train_step(state, batch) -> (state, metrics)`, jitted with shardings and a donated state.

An objective provides, for a batch with a leading micro-batch axis `[A, b, ...]`:
- `counts(batch) -> {term: float32 []}`: the number of tokens/boxes each term averages over, from the masks only,
  summed over all micro-batches (and, being a global sum under jit, over all devices);
- `sums(model, micro_batch, rng) -> {term: float32 []}`: the summed (not averaged) loss of each term on one
  micro-batch;
- `weights: {term: float}`.
The loss is `sum_t w_t * (sum over micro-batches of sums_t) / max(count_t, 1)`, so gradient accumulation equals the
big-batch step even when token counts differ between micro-batches (dividing per micro-batch would not).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from coordexp_jax.train.state import TrainState


class Objective(Protocol):
    weights: dict[str, float]

    def counts(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]: ...

    def sums(self, model: nnx.Module, batch: dict[str, jax.Array], rng: jax.Array) -> dict[str, jax.Array]: ...


def _combine(weights: dict[str, float], sums: dict[str, jax.Array], counts: dict[str, jax.Array]) -> jax.Array:
    total = jnp.zeros((), jnp.float32)
    for t, w in weights.items():
        if w:
            total = total + w * sums[t].astype(jnp.float32) / jnp.maximum(counts[t], 1.0)
    return total


def make_train_step(
    graphdef: nnx.GraphDef,
    objective: Objective,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
    ema_decay: float = 0.0,
    skip_nonfinite: bool = True,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The (un-jitted) pure step. Batch arrays carry a leading micro-batch axis `A` (1 without accumulation).

    A non-finite loss or gradient norm leaves the state unchanged except `step` and `skipped` when
    `skip_nonfinite` (the loop then stops or continues per `train.nan_policy`); metrics['nonfinite'] flags it.
    """
    weights = dict(objective.weights)

    def loss_fn(params, frozen, micro, counts, rng):
        model = nnx.merge(graphdef, params, frozen)
        sums = objective.sums(model, micro, rng)
        return _combine(weights, sums, counts), sums

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        counts = {k: v.astype(jnp.float32) for k, v in objective.counts(batch).items()}
        num_micro = jax.tree.leaves(batch)[0].shape[0]
        rng, step_rng = jax.random.split(state.rng)
        rngs = jax.random.split(step_rng, num_micro)

        def body(carry, xs):
            g_acc, s_acc = carry
            micro, r = xs
            (_, sums), g = grad_fn(state.params, state.frozen, micro, counts, r)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            s_acc = {k: s_acc[k] + sums[k].astype(jnp.float32) for k in s_acc}
            return (g_acc, s_acc), None

        g0 = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        s0 = {k: jnp.zeros((), jnp.float32) for k in counts}
        if num_micro == 1:
            (g, s_sum), _ = body((g0, s0), (jax.tree.map(lambda x: x[0], batch), rngs[0]))
        else:
            (g, s_sum), _ = jax.lax.scan(body, (g0, s0), (batch, rngs))

        loss = _combine(weights, s_sum, counts)
        grad_norm = optax.global_norm(g)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply_update(operands):
            g, params, opt_state, ema = operands
            updates, opt_state = tx.update(g, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            new_params = jax.tree.map(lambda new, old: new.astype(old.dtype), new_params, params)
            if ema is not None:
                ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p.astype(jnp.float32), ema,
                                   new_params)
            return new_params, opt_state, ema

        def keep(operands):
            return operands[1:]

        operands = (g, state.params, state.opt_state, state.ema)
        if skip_nonfinite:
            # A cond, not a tree-wide `where(finite, new, old)`: the select kept both the old and the new optimizer
            # state alive, so XLA copied every moment buffer each step (~0.8 GB per step at 100M parameters).
            params, opt_state, ema = jax.lax.cond(finite, apply_update, keep, operands)
        else:
            params, opt_state, ema = apply_update(operands)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng, ema=ema,
                            skipped=state.skipped + (~finite).astype(jnp.int32) if skip_nonfinite else state.skipped)

        metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.int32)}
        for t in counts:
            metrics[f"loss/{t}"] = s_sum[t] / jnp.maximum(counts[t], 1.0)
            metrics[f"count/{t}"] = counts[t]
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new, metrics

    return train_step


def jit_train_step(step_fn: Callable, state_shardings: TrainState, mesh) -> Callable:
    """`jax.jit` of a step with the state's in/out shardings, replicated metrics and the state donated. The step is
    traced under the mesh (`jax.sharding.use_abstract_mesh`), so that code inside it can read the mesh (the
    vocabulary-parallel head of `coord.losses.chunked_vocab_stats`)."""
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step_in_mesh(state, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step_fn(state, batch)

    return jax.jit(
        step_in_mesh,
        in_shardings=(state_shardings, None),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    )


def make_eval_loss(graphdef: nnx.GraphDef, objective: Objective) -> Callable:
    """Pure `(params, frozen, batch) -> metrics` of the objective without gradients (for validation loss)."""

    def eval_loss(params, frozen, batch):
        counts = objective.counts(batch)
        micro = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
        model = nnx.merge(graphdef, params, frozen)
        sums = objective.sums(model, micro, None)  # no rng: no dropout in validation
        out = {"loss": _combine(dict(objective.weights), sums, counts)}
        out.update({f"loss/{k}": sums[k] / jnp.maximum(counts[k], 1.0) for k in counts})
        return out

    return eval_loss


__all__ = ["Objective", "make_train_step", "jit_train_step", "make_eval_loss"]
