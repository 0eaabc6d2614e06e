"""The objective of sequential counting with regression heads (`train.kind = 'counting_regression'`).

The batch holds one counting step per row (`train/counting_loop.py:encode_counting`): the model inputs of the
marked image and the prompt ending in `<x> <y>`, `x_pos [B]` / `y_pos [B]` (int32 positions of those two tokens),
`target [B, 2]` float32 (the next object's centre in [-1, 1], or (-1, -1) for a done sample) and `valid [B]`
float32 (0 for padding rows). The x head reads the final hidden state at `x_pos`, the y head at `y_pos`
(`model/regression.py`); the loss is per coordinate, summed over the valid rows and averaged by the train step
over their count, as two terms `x` and `y` (logged `loss/x`, `loss/y`; `loss` = their sum, the recipe's
loss_x + loss_y of `../shared/seeds/001_*.txt`).

Targets (`counting.target`, `data/counting.py` `TARGETS`):
- `ordered` (the recipe's): the loss against `target`, the (k+1)-th centre in the counting order;
- `set`: every unmarked object is a right answer. The batch adds `candidates [B, M, 2]` (the unmarked centres,
  or (-1, -1) for a done row) and `candidate_mask [B, M]`; the row's loss is that of the candidate nearest the
  prediction under the loss itself (argmin over m of loss_x + loss_y, the choice not differentiated), i.e. the
  one-prediction case of the order-invariant matching CoordExp uses for object sets
  (`../shared/reference/coordexp_method.md`, Hungarian matching: with one prediction the optimal assignment is the
  cheapest candidate). `loss/x` and `loss/y` are the chosen candidate's.

Per-element losses of the error e = pred - target (normalised units):
- `l1`: |e| (the recipe's default);
- `mse`: e^2;
- `smooth_l1`: 0.5 e^2 / beta where |e| < beta, else |e| - 0.5 beta (Huber / beta, torch's SmoothL1Loss).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

LOSSES = ("l1", "mse", "smooth_l1")
TERMS = ("x", "y")


def regression_loss(pred, target, kind: str = "l1", beta: float = 0.1):
    """Elementwise loss of `pred` vs `target` (same shape, float) under `kind` (`LOSSES`; module docstring).
    Raises ValueError for an unknown kind."""
    e = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if kind == "l1":
        return jnp.abs(e)
    if kind == "mse":
        return e * e
    if kind == "smooth_l1":
        a = jnp.abs(e)
        return jnp.where(a < beta, 0.5 * e * e / beta, a - 0.5 * beta)
    raise ValueError(f"regression loss must be one of {LOSSES}, got {kind!r}")


def set_loss(pred, candidates, mask, kind: str = "l1", beta: float = 0.1):
    """Per-axis loss `[B, 2]` of `pred [B, 2]` against the cheapest of each row's `candidates [B, M, 2]` (where
    `mask [B, M]` > 0; module docstring, `set` target). The argmin over m of the summed axis losses is taken
    without gradient; a row with no candidate gets loss 0. Units: normalised [-1, 1]."""
    per = regression_loss(pred[:, None, :], candidates, kind, beta)  # [B, M, 2]
    total = jnp.where(mask > 0, jnp.sum(per, -1), jnp.inf)  # [B, M]
    j = jnp.argmin(jax.lax.stop_gradient(total), axis=-1)  # [B]
    chosen = jnp.take_along_axis(per, j[:, None, None], axis=1)[:, 0]  # [B, 2]
    return chosen * (jnp.sum(mask, -1) > 0).astype(chosen.dtype)[:, None]


@dataclasses.dataclass(frozen=True)
class CountingObjective:
    """The step's Objective (`train/step.py`): terms 'x' and 'y' (weight 1 each), counted over the valid rows.
    `target`: 'ordered' or 'set' (module docstring); ValueError for an unknown loss or target."""

    loss: str = "l1"
    beta: float = 0.1
    target: str = "ordered"

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"CountingObjective.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.target not in ("ordered", "set"):
            raise ValueError(f"CountingObjective.target must be 'ordered' or 'set', got {self.target!r}")

    @property
    def weights(self) -> dict:
        return {t: 1.0 for t in TERMS}

    @classmethod
    def from_config(cls, cfg) -> "CountingObjective":
        return cls(loss=str(cfg.counting.loss), beta=float(cfg.counting.smooth_l1_beta),
                   target=str(cfg.counting.get("target", "ordered")))

    def counts(self, batch: dict) -> dict:
        n = jnp.sum(batch["valid"].astype(jnp.float32))
        return {t: n for t in TERMS}

    def per_row(self, model, batch: dict):
        """(prediction `[B, 2]` in [-1, 1], loss `[B, 2]` with invalid rows zeroed)."""
        from coordexp_jax.model.regression import predict_points

        pred = predict_points(model, batch)
        if self.target == "set":
            loss = set_loss(pred, batch["candidates"], batch["candidate_mask"], self.loss, self.beta)
        else:
            loss = regression_loss(pred, batch["target"], self.loss, self.beta)
        return pred, loss * batch["valid"].astype(jnp.float32)[:, None]

    def sums(self, model, batch: dict, rng=None) -> dict:
        del rng
        _, loss = self.per_row(model, batch)
        return {"x": jnp.sum(loss[:, 0]), "y": jnp.sum(loss[:, 1])}


class _SharedForward:
    """A model stand-in whose call returns hidden states computed once (`[B, S, H]`); every attribute (heads, output
    embedding, coordinate head, dtype) is the model's. Lets two objectives share one forward."""

    def __init__(self, model, hidden):
        self._model, self._hidden = model, hidden

    def __call__(self, *args, **kwargs):
        return self._hidden

    def __getattr__(self, name):
        return getattr(self._model, name)


@dataclasses.dataclass(frozen=True)
class CountingWithPointsObjective:
    """Regression heads and CoordExp's point tokens trained together (`counting.point_tokens`): the batch holds
    counting rows (`valid` 1: marked image, prompt ending `<x> <y>`, `target`) and point-token rows (`loss_mask`
    over the answer `{"count": N, "points": [...]}` of the same images, the Stage-1 keys of `data/prompts.py`).
    One forward of the whole batch; the terms are the Stage-1 objective's (counted over the point rows' tokens)
    and `x`, `y` (counted over the counting rows). `stage1`: a `train.objective.Stage1Objective`."""

    stage1: object
    counting: CountingObjective = CountingObjective()

    @property
    def weights(self) -> dict:
        return {**self.stage1.weights, **self.counting.weights}

    def counts(self, batch: dict) -> dict:
        return {**self.stage1.counts(batch), **self.counting.counts(batch)}

    def sums(self, model, batch: dict, rng=None) -> dict:
        from coordexp_jax.train.objective import links_of, vision_inputs

        hidden = model(batch["input_ids"], batch["positions"], batch["attention_mask"], vision_inputs(batch),
                       links_of(batch, rng))
        shared = _SharedForward(model, hidden)
        return {**self.stage1.sums(shared, batch, rng), **self.counting.sums(shared, batch)}


__all__ = ["CountingObjective", "CountingWithPointsObjective", "regression_loss", "set_loss", "LOSSES", "TERMS"]
