"""The objective of sequential counting with regression heads (`train.kind = 'counting_regression'`).

The batch holds one counting step per row (`train/counting_loop.py:encode_counting`): the model inputs of the
marked image and the prompt ending in `<x> <y>`, `x_pos [B]` / `y_pos [B]` (int32 positions of those two tokens),
`target [B, 2]` float32 (the next object's centre in [-1, 1], or (-1, -1) for a done sample) and `valid [B]`
float32 (0 for padding rows). The x head reads the final hidden state at `x_pos`, the y head at `y_pos`
(`model/regression.py`); the loss is per coordinate, summed over the valid rows and averaged by the train step
over their count, as two terms `x` and `y` (logged `loss/x`, `loss/y`; `loss` = their sum, the recipe's
loss_x + loss_y of `../shared/seeds/001_*.txt`).

Per-element losses of the error e = pred - target (normalised units):
- `l1`: |e| (the recipe's default);
- `mse`: e^2;
- `smooth_l1`: 0.5 e^2 / beta where |e| < beta, else |e| - 0.5 beta (Huber / beta, torch's SmoothL1Loss).
"""

from __future__ import annotations

import dataclasses

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


@dataclasses.dataclass(frozen=True)
class CountingObjective:
    """The step's Objective (`train/step.py`): terms 'x' and 'y' (weight 1 each), counted over the valid rows."""

    loss: str = "l1"
    beta: float = 0.1

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"CountingObjective.loss must be one of {LOSSES}, got {self.loss!r}")

    @property
    def weights(self) -> dict:
        return {t: 1.0 for t in TERMS}

    @classmethod
    def from_config(cls, cfg) -> "CountingObjective":
        return cls(loss=str(cfg.counting.loss), beta=float(cfg.counting.smooth_l1_beta))

    def counts(self, batch: dict) -> dict:
        n = jnp.sum(batch["valid"].astype(jnp.float32))
        return {t: n for t in TERMS}

    def per_row(self, model, batch: dict):
        """(prediction `[B, 2]` in [-1, 1], loss `[B, 2]` with invalid rows zeroed)."""
        from coordexp_jax.model.regression import predict_points

        pred = predict_points(model, batch)
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


__all__ = ["CountingObjective", "CountingWithPointsObjective", "regression_loss", "LOSSES", "TERMS"]
