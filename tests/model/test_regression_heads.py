"""Regression heads of sequential counting (model/regression.py) and their objective (train/counting_objective.py)
against numpy / torch references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from coordexp_jax.model.regression import (HeadsConfig, RegressionHead, RegressionHeads, attach_heads, gather_rows,
                                           heads_to_numpy, token_positions)
from coordexp_jax.train.counting_objective import CountingObjective, regression_loss
from coordexp_jax.train.step import _combine

H = 12
_erf = np.vectorize(math.erf)


def _np_gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _np_head(tensors, axis, h):
    """numpy MLP from the torch-layout tensors: x @ W.T + b, exact GELU between layers, tanh at the end."""
    n = len([k for k in tensors if k.startswith(f"{axis}.layers.") and k.endswith(".weight")])
    x = h.astype(np.float64)
    for i in range(n):
        x = x @ tensors[f"{axis}.layers.{i}.weight"].astype(np.float64).T + tensors[f"{axis}.layers.{i}.bias"]
        if i < n - 1:
            x = _np_gelu(x)
    return np.tanh(x[..., 0])


@pytest.fixture(scope="module")
def heads():
    h = RegressionHeads(HeadsConfig(hidden_size=H, layers=3, width=16), rngs=nnx.Rngs(3))
    # non-zero biases, so a transposed or dropped bias would show
    for lay in list(h.x.layers) + list(h.y.layers):
        lay.bias[...] = jax.random.normal(jax.random.key(7), lay.bias[...].shape) * 0.3
    return h


def test_gather_rows_is_one_row_per_batch_entry():
    hid = np.random.default_rng(0).standard_normal((4, 9, 5)).astype(np.float32)
    pos = np.array([0, 8, 3, 3])
    got = np.asarray(gather_rows(jnp.asarray(hid), jnp.asarray(pos)))
    np.testing.assert_array_equal(got, hid[np.arange(4), pos])  # a gather: bit-exact


def test_token_positions_last_occurrence_and_missing():
    ids = np.array([[5, 7, 1, 7, 0], [7, 2, 2, 2, 2]])
    np.testing.assert_array_equal(token_positions(ids, 7), [3, 0])
    with pytest.raises(ValueError, match="row 1 has no <x>"):
        token_positions(np.array([[7, 1], [1, 1]]), 7, name="<x>")


@pytest.mark.parametrize("layers,width", [(1, 0), (3, 16)])
def test_head_matches_numpy_and_torch(layers, width):
    head = RegressionHead(HeadsConfig(hidden_size=H, layers=layers, width=width), rngs=nnx.Rngs(1))
    hs = RegressionHeads(HeadsConfig(hidden_size=H, layers=layers, width=width), rngs=nnx.Rngs(1))
    hs.x = head
    t = heads_to_numpy(hs)
    h = np.random.default_rng(1).standard_normal((6, H)).astype(np.float32) * 2
    got = np.asarray(head(jnp.asarray(h)))
    # float32 MLP of a dozen-wide layers vs float64: a few float32 ulps of O(1) activations
    np.testing.assert_allclose(got, _np_head(t, "x", h), atol=1e-5, rtol=0)
    # the same tensors in torch nn.Linear layers (what a torch user of regression_heads.safetensors builds)
    dims = HeadsConfig(H, layers, width).dims
    mods = []
    for i in range(layers):
        lin = torch.nn.Linear(dims[i], dims[i + 1])
        lin.weight.data = torch.from_numpy(t[f"x.layers.{i}.weight"].copy())
        lin.bias.data = torch.from_numpy(t[f"x.layers.{i}.bias"].copy())
        mods += [lin] + ([torch.nn.GELU()] if i < layers - 1 else [])
    with torch.no_grad():
        ref = torch.tanh(torch.nn.Sequential(*mods)(torch.from_numpy(h))[:, 0]).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)  # two float32 implementations: ulps of O(1) values


def test_heads_read_their_own_positions(heads):
    rng = np.random.default_rng(2)
    hid = rng.standard_normal((3, 10, H)).astype(np.float32)
    xp, yp = np.array([4, 9, 0]), np.array([5, 2, 1])
    got = np.asarray(heads(jnp.asarray(hid), jnp.asarray(xp), jnp.asarray(yp)))
    t = heads_to_numpy(heads)
    ref = np.stack([_np_head(t, "x", hid[np.arange(3), xp]), _np_head(t, "y", hid[np.arange(3), yp])], -1)
    assert got.shape == (3, 2) and np.all(np.abs(got) <= 1)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)  # float32 vs float64 MLP on O(1) values
    # the two heads are separate parameters: x's prediction differs from y's on the same row
    assert not np.allclose(np.asarray(heads.x(jnp.asarray(hid[:, 0]))), np.asarray(heads.y(jnp.asarray(hid[:, 0]))))


@pytest.mark.parametrize("kind", ["l1", "mse", "smooth_l1"])
def test_regression_loss_matches_torch(kind):
    rng = np.random.default_rng(4)
    p, t = rng.uniform(-1, 1, (64, 2)).astype(np.float32), rng.uniform(-1, 1, (64, 2)).astype(np.float32)
    t[:8] = p[:8] + rng.uniform(-0.05, 0.05, (8, 2)).astype(np.float32)  # inside smooth L1's quadratic zone
    got = np.asarray(regression_loss(jnp.asarray(p), jnp.asarray(t), kind, beta=0.1))
    P, T = torch.from_numpy(p), torch.from_numpy(t)
    ref = {"l1": torch.nn.functional.l1_loss(P, T, reduction="none"),
           "mse": torch.nn.functional.mse_loss(P, T, reduction="none"),
           "smooth_l1": torch.nn.functional.smooth_l1_loss(P, T, reduction="none", beta=0.1)}[kind].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-6)  # same float32 formula; errors below 2


class _Stub(nnx.Module):
    """A stand-in 'model': hidden = embedding of the ids (the objective only needs model(...) -> [B, S, H])."""

    def __init__(self):
        self.emb = nnx.Embed(20, H, rngs=nnx.Rngs(0))

    def __call__(self, input_ids, positions, attention_mask, vision=None):
        return self.emb(input_ids)


@pytest.mark.parametrize("kind", ["l1", "smooth_l1"])
def test_objective_sums_and_counts_against_numpy(heads, kind):
    model = attach_heads(_Stub(), heads)
    rng = np.random.default_rng(5)
    B, S = 5, 7
    ids = rng.integers(0, 20, (B, S)).astype(np.int32)
    batch = {"input_ids": ids, "positions": np.zeros((3, B, S), np.int32), "attention_mask": np.ones((B, S), np.int32),
             "x_pos": rng.integers(0, S, B).astype(np.int32), "y_pos": rng.integers(0, S, B).astype(np.int32),
             "target": rng.uniform(-1, 1, (B, 2)).astype(np.float32),
             "valid": np.array([1, 1, 0, 1, 0], np.float32)}
    obj = CountingObjective(loss=kind, beta=0.1)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    sums, counts = obj.sums(model, jb), obj.counts(jb)
    emb = np.asarray(model.emb.embedding[...], np.float64)
    t = heads_to_numpy(heads)
    hid = emb[ids]
    pred = np.stack([_np_head(t, "x", hid[np.arange(B), batch["x_pos"]]),
                     _np_head(t, "y", hid[np.arange(B), batch["y_pos"]])], -1)
    e = pred - batch["target"]
    per = np.abs(e) if kind == "l1" else np.where(np.abs(e) < 0.1, 0.5 * e * e / 0.1, np.abs(e) - 0.05)
    per = per * batch["valid"][:, None]
    assert float(counts["x"]) == float(counts["y"]) == 3.0
    # sums of <= 5 float32 losses of size < 2 vs float64: a few float32 ulps (smooth L1's /beta: x10)
    np.testing.assert_allclose([float(sums["x"]), float(sums["y"])], per.sum(0), atol=1e-4, rtol=0)
    total = float(_combine(obj.weights, sums, counts))
    np.testing.assert_allclose(total, per.sum() / 3.0, atol=1e-4, rtol=0)  # loss = mean loss_x + mean loss_y


def test_set_target_takes_the_cheapest_candidate_brute_force(heads):
    """`counting.target = 'set'`: per row, the loss of the unmarked candidate nearest the prediction (brute force
    over the candidates in float64), gradients only through the chosen one, a row without candidates adds 0."""
    from coordexp_jax.train.counting_objective import set_loss

    model = attach_heads(_Stub(), heads)
    rng = np.random.default_rng(6)
    B, S, M = 6, 7, 4
    ids = rng.integers(0, 20, (B, S)).astype(np.int32)
    cands = rng.uniform(-1, 1, (B, M, 2)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]],
                    np.float32)
    cands[mask == 0] = 5.0  # padding far away: must never be chosen
    batch = {"input_ids": ids, "positions": np.zeros((3, B, S), np.int32), "attention_mask": np.ones((B, S), np.int32),
             "x_pos": rng.integers(0, S, B).astype(np.int32), "y_pos": rng.integers(0, S, B).astype(np.int32),
             "target": cands[:, 0].copy(), "valid": np.array([1, 1, 1, 1, 1, 0], np.float32),
             "candidates": cands, "candidate_mask": mask}
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    obj = CountingObjective(loss="l1", target="set")
    sums = obj.sums(model, jb)
    emb = np.asarray(model.emb.embedding[...], np.float64)
    t = heads_to_numpy(heads)
    hid = emb[ids]
    pred = np.stack([_np_head(t, "x", hid[np.arange(B), batch["x_pos"]]),
                     _np_head(t, "y", hid[np.arange(B), batch["y_pos"]])], -1)
    ref = np.zeros((B, 2))
    for b in range(B):
        if mask[b].sum() and batch["valid"][b]:
            costs = [np.abs(pred[b] - cands[b, m]).sum() if mask[b, m] else np.inf for m in range(M)]
            ref[b] = np.abs(pred[b] - cands[b, int(np.argmin(costs))])
    # sums of <= 6 float32 L1 terms of size < 8 vs float64: a few float32 ulps
    np.testing.assert_allclose([float(sums["x"]), float(sums["y"])], ref.sum(0), atol=1e-4, rtol=0)
    # with one candidate per row it is the ordered target's loss
    one = {**jb, "candidate_mask": jnp.asarray(np.eye(M, dtype=np.float32)[np.zeros(B, int)])}
    s1, s0 = obj.sums(model, one), CountingObjective(loss="l1").sums(model, one)
    np.testing.assert_allclose([float(s1["x"]), float(s1["y"])], [float(s0["x"]), float(s0["y"])], atol=1e-6)
    # the gradient w.r.t. the candidates is non-zero only at the chosen one (the argmin is not differentiated)
    p = jnp.asarray(pred, jnp.float32)
    g = np.asarray(jax.grad(lambda c: set_loss(p, c, jnp.asarray(mask)).sum())(jnp.asarray(cands)))
    for b in range(B):
        nz = np.flatnonzero(np.abs(g[b]).sum(-1))
        assert len(nz) == (1 if mask[b].sum() else 0)
