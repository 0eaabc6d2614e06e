"""Set matching between predicted and ground-truth boxes (`../shared/reference/coordexp_method.md` §6).

- `box_cost_matrix`: lambda_L1 * ||b_i - g_j||_1 + lambda_giou * (1 - GIoU) (+ lambda_desc * desc mismatch),
  with `nan_to_num` and clipping to a static upper bound.
- `assign`: one assignment on a cost matrix `[N, M]` with validity masks (padding), jittable and vmappable;
  NaN/±inf costs are replaced by one cost above any matching of finite ones (`replace_nonfinite`), so they are
  the least attractive pairs:
  * `method="hungarian"`: exact, `optax.assignment.hungarian_algorithm`. Padded rows/columns get a cost larger
    than any full matching of real pairs, so the real pairs are the optimum of the unpadded problem.
  * `method="sinkhorn"`: entropic OT with ott-jax at a fixed iteration count. The problem is augmented with one
    dummy row and one dummy column (cost 0, mass = the surplus of the other side, plus a tiny mass) so that the
    transport polytope is the rectangular assignment's; padded rows/columns get a tiny, not zero, mass (zero
    mass gives NaN gradients). The hard assignment is read off the plan as mutual argmaxes (row i's largest
    entry is column j and column j's largest entry is row i), which is 1:1 by construction.
  * `dummy=True`: CoordExp's FP/FN option: leaving a prediction unmatched costs `fp_cost`, a ground-truth box
    `fn_cost`, so the solver may leave pairs unmatched (Hungarian: the square `(N+M)` augmented matrix; Sinkhorn:
    the dummy row/column carry these costs).
- `match`: cost + assignment + the IoU gate (pairs with IoU < threshold are not accepted) -> `MatchResult`,
  everything under `stop_gradient`. `match_batch` is its vmap over a leading batch axis.
- `greedy_iou_match`: host-side greedy 1:1 matching by decreasing IoU for F1@0.5 (evaluation).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coordexp_jax.coord import boxes as box_ops

METHODS = ("hungarian", "sinkhorn")
TINY = 1e-6  # mass of padded rows/columns in Sinkhorn (relative to 1 per real box)


class MatchResult(NamedTuple):
    """Per image (leading batch axes under vmap). `pred_to_gt [N]` int32 (-1: unmatched), `gt_to_pred [M]`,
    `matched_pred [N]`, `matched_gt [M]`, `fp [N]` (valid, unmatched), `fn [M]` (valid, unmatched) bool, and the
    matching's `cost` (sum of accepted pair costs)."""

    pred_to_gt: jax.Array
    gt_to_pred: jax.Array
    matched_pred: jax.Array
    matched_gt: jax.Array
    fp: jax.Array
    fn: jax.Array
    cost: jax.Array


def cost_bound(l1_weight: float = 1.0, giou_weight: float = 1.0, desc_weight: float = 0.0) -> float:
    """Upper bound of `box_cost_matrix` for boxes in [0, 1] (L1 <= 4, 1 - GIoU <= 2, mismatch <= 1)."""
    return 4 * abs(l1_weight) + 2 * abs(giou_weight) + abs(desc_weight)


def box_cost_matrix(pred, gt, l1_weight: float = 1.0, giou_weight: float = 1.0, desc_cost=None,
                    desc_weight: float = 1.0, canonicalize: bool = True):
    """Cost `[N, M]` between `pred [N, 4]` and `gt [M, 4]` (normalised xyxy).

    `desc_cost [N, M]` (optional, e.g. `desc_mismatch(...)`) is added with `desc_weight`. Boxes are canonicalised
    (min/max, clamp to [0, 1]) first unless `canonicalize=False`. NaN/inf are replaced by the bound and every
    entry is clipped to [0, bound].
    """
    pred = jnp.asarray(pred, jnp.float32)
    gt = jnp.asarray(gt, jnp.float32)
    if canonicalize:
        pred, gt = box_ops.canonicalize(pred), box_ops.canonicalize(gt)
    c = l1_weight * box_ops.pairwise_l1(pred, gt) + giou_weight * (1.0 - box_ops.pairwise_giou(pred, gt))
    dw = 0.0
    if desc_cost is not None:
        c = c + desc_weight * jnp.asarray(desc_cost, jnp.float32)
        dw = desc_weight
    bound = cost_bound(l1_weight, giou_weight, dw)
    return jnp.clip(jnp.nan_to_num(c, nan=bound, posinf=bound, neginf=0.0), 0.0, bound)


def desc_mismatch(pred_descs, gt_descs) -> np.ndarray:
    """Host-side `[N, M]` float32: 1 where the descriptions differ (case/space-insensitive), else 0."""
    norm = lambda s: " ".join(str(s).lower().split())  # noqa: E731
    p = [norm(s) for s in pred_descs]
    g = [norm(s) for s in gt_descs]
    return np.array([[float(a != b) for b in g] for a in p], np.float32).reshape(len(p), len(g))


def _hungarian(cost, row_valid, col_valid, dummy: bool, fp_cost: float, fn_cost: float):
    n, m = cost.shape
    real = row_valid[:, None] & col_valid[None, :]
    b = jnp.max(jnp.where(real, jnp.abs(cost), 0.0)) + 1.0
    if not dummy:
        # Any matching using fewer real pairs costs at least `pad` more: the real block is solved exactly.
        pad = (min(n, m) + 1) * b
        c = jnp.where(real, cost, pad)
        rows, cols = optax.assignment.hungarian_algorithm(c)
        ok = real[rows, cols]
        pred_to_gt = jnp.full((n,), -1, jnp.int32).at[rows].set(jnp.where(ok, cols, -1).astype(jnp.int32))
        return pred_to_gt
    # Square augmented matrix [[C, FP], [FN, 0]]; FP/FN blocks diagonal, off-diagonals never chosen.
    big = (n + m) * (b + abs(fp_cost) + abs(fn_cost)) + 1.0
    c = jnp.where(real, cost, big)
    fp = jnp.where(jnp.eye(n, dtype=bool), jnp.where(row_valid, fp_cost, 0.0)[:, None], big)
    fn = jnp.where(jnp.eye(m, dtype=bool), jnp.where(col_valid, fn_cost, 0.0)[:, None], big)
    aug = jnp.block([[c, fp], [fn, jnp.zeros((m, n), cost.dtype)]])
    rows, cols = optax.assignment.hungarian_algorithm(aug)
    ok = (rows < n) & (cols < m)
    ok = ok & real[jnp.clip(rows, 0, n - 1), jnp.clip(cols, 0, m - 1)]
    tgt = jnp.where(ok, rows, n)  # scatter non-real rows out of range (dropped)
    return jnp.full((n,), -1, jnp.int32).at[tgt].set(cols.astype(jnp.int32), mode="drop")


def sinkhorn_plan(cost, row_valid, col_valid, dummy: bool = False, fp_cost: float = 1.0, fn_cost: float = 1.2,
                  epsilon: float = 0.01, num_iters: int = 200):
    """Transport plan `[N+1, M+1]` of the dummy-augmented problem (last row/column: the dummies)."""
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    n, m = cost.shape
    real = row_valid[:, None] & col_valid[None, :]
    b = jnp.max(jnp.where(real, cost, 0.0))
    c = jnp.where(real, cost, b)  # padded entries: finite, irrelevant (tiny mass)
    ra = jnp.where(row_valid, 1.0, TINY)
    rb = jnp.where(col_valid, 1.0, TINY)
    sa, sb = ra.sum(), rb.sum()
    if dummy:
        da, db = sb, sa  # the dummy row can absorb every gt (FN), the dummy column every prediction (FP)
        row_d = jnp.where(col_valid, fn_cost, 0.0)
        col_d = jnp.where(row_valid, fp_cost, 0.0)
    else:
        da, db = jnp.maximum(sb - sa, 0.0) + TINY, jnp.maximum(sa - sb, 0.0) + TINY
        row_d = jnp.zeros((m,), cost.dtype)
        col_d = jnp.zeros((n,), cost.dtype)
    full = jnp.block([[c, col_d[:, None]], [row_d[None, :], jnp.zeros((1, 1), cost.dtype)]])
    a = jnp.concatenate([ra, da[None]])
    bb = jnp.concatenate([rb, db[None]])
    tot = a.sum()
    geom = geometry.Geometry(cost_matrix=full, epsilon=epsilon)
    prob = linear_problem.LinearProblem(geom, a / tot, bb / tot)
    solver = sinkhorn.Sinkhorn(threshold=-1.0, min_iterations=num_iters, max_iterations=num_iters,
                               inner_iterations=max(1, min(10, num_iters)), implicit_diff=None)
    out = solver(prob)
    return out.matrix


def _sinkhorn(cost, row_valid, col_valid, dummy, fp_cost, fn_cost, epsilon, num_iters):
    n, m = cost.shape
    plan = sinkhorn_plan(cost, row_valid, col_valid, dummy, fp_cost, fn_cost, epsilon, num_iters)
    row_best = jnp.argmax(plan[:n], axis=1)  # [N] in 0..M (M = dummy)
    col_best = jnp.argmax(plan[:, :m], axis=0)  # [M] in 0..N
    j = jnp.clip(row_best, 0, m - 1)
    mutual = (row_best < m) & (col_best[j] == jnp.arange(n))
    ok = mutual & row_valid & col_valid[j]
    return jnp.where(ok, j, -1).astype(jnp.int32)


def replace_nonfinite(cost, row_valid, col_valid, dummy: bool = False, fp_cost: float = 1.0,
                      fn_cost: float = 1.2):
    """NaN and ±inf entries of `cost [N, M]` -> one finite cost `L` above any matching's worth of finite costs,
    so they are the least attractive pairs: the solver first minimises the number of such pairs, then the finite
    cost (a lexicographic optimum; scipy's `linear_sum_assignment` on the same replaced matrix is the reference).

    `L = 2 (K + 1) (t + 1)` with `t` the largest |finite cost| among valid pairs (and |fp_cost|, |fn_cost| when
    `dummy`) and `K` the most entries a matching can use (min(N, M), or N + M with the FP/FN dummies): any two
    matchings' finite parts differ by at most `2 K t < L`. A matrix without non-finite entries is returned
    unchanged in value.
    """
    n, m = cost.shape
    finite = jnp.isfinite(cost)
    real = row_valid[:, None] & col_valid[None, :]
    top = jnp.max(jnp.where(finite & real, jnp.abs(cost), 0.0))
    k = min(n, m)
    if dummy:
        top = jnp.maximum(top, max(abs(fp_cost), abs(fn_cost)))
        k = n + m
    return jnp.where(finite, cost, 2.0 * (k + 1) * (top + 1.0))


def assign(cost, row_valid=None, col_valid=None, method: str = "hungarian", dummy: bool = False,
           fp_cost: float = 1.0, fn_cost: float = 1.2, epsilon: float = 0.01, num_iters: int = 200):
    """Assignment on `cost [N, M]` with `row_valid [N]`, `col_valid [M]` (default all valid) -> `pred_to_gt [N]`
    int32 (-1 = unassigned). Only valid rows/columns are ever assigned. Not differentiable (stop-gradient).

    NaN/±inf costs are the least attractive pairs (`replace_nonfinite`): taken only when every matching of
    the required size needs them (a row that is non-finite everywhere is still assigned when N <= M), and
    with `dummy=True` never in place of leaving both sides unmatched.
    """
    cost = jax.lax.stop_gradient(jnp.asarray(cost, jnp.float32))
    n, m = cost.shape
    row_valid = jnp.ones((n,), bool) if row_valid is None else jnp.asarray(row_valid, bool)
    col_valid = jnp.ones((m,), bool) if col_valid is None else jnp.asarray(col_valid, bool)
    if n == 0 or m == 0:
        return jnp.full((n,), -1, jnp.int32)
    cost = replace_nonfinite(cost, row_valid, col_valid, dummy, fp_cost, fn_cost)
    if method == "hungarian":
        return _hungarian(cost, row_valid, col_valid, dummy, fp_cost, fn_cost)
    if method == "sinkhorn":
        return _sinkhorn(cost, row_valid, col_valid, dummy, fp_cost, fn_cost, epsilon, num_iters)
    raise ValueError(f"matching method must be one of {METHODS}, got {method!r}")


def result_from_assignment(pred_to_gt, cost, pred_valid, gt_valid) -> MatchResult:
    """Masks and the inverse map from `pred_to_gt [N]` (entries must point at valid pairs or be -1)."""
    n, m = cost.shape
    matched_pred = pred_to_gt >= 0
    j = jnp.clip(pred_to_gt, 0, max(m - 1, 0))
    gt_to_pred = jnp.full((m,), -1, jnp.int32).at[jnp.where(matched_pred, j, m)].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop")
    matched_gt = gt_to_pred >= 0
    total = jnp.sum(jnp.where(matched_pred, cost[jnp.arange(n), j] if m else 0.0, 0.0))
    return MatchResult(pred_to_gt.astype(jnp.int32), gt_to_pred, matched_pred, matched_gt,
                       pred_valid & ~matched_pred, gt_valid & ~matched_gt, total)


def match(pred, gt, pred_valid=None, gt_valid=None, *, method: str = "hungarian", dummy: bool = False,
          l1_weight: float = 1.0, giou_weight: float = 1.0, desc_cost=None, desc_weight: float = 1.0,
          iou_threshold: float | None = None, fp_cost: float = 1.0, fn_cost: float = 1.2,
          epsilon: float = 0.01, num_iters: int = 200) -> MatchResult:
    """Match `pred [N, 4]` to `gt [M, 4]` (normalised, padded, with validity masks) -> `MatchResult`.

    With `iou_threshold`, an assigned pair whose IoU (canonicalised boxes) is below it is not accepted: the
    prediction becomes a FP and the ground truth a FN. Everything is `stop_gradient`. Jittable (keyword options
    static) and vmappable (`match_batch`).
    """
    pred = jax.lax.stop_gradient(jnp.asarray(pred, jnp.float32))
    gt = jax.lax.stop_gradient(jnp.asarray(gt, jnp.float32))
    n, m = pred.shape[0], gt.shape[0]
    pred_valid = jnp.ones((n,), bool) if pred_valid is None else jnp.asarray(pred_valid, bool)
    gt_valid = jnp.ones((m,), bool) if gt_valid is None else jnp.asarray(gt_valid, bool)
    cost = box_cost_matrix(pred, gt, l1_weight, giou_weight, desc_cost, desc_weight)
    p2g = assign(cost, pred_valid, gt_valid, method, dummy, fp_cost, fn_cost, epsilon, num_iters)
    if iou_threshold is not None and n and m:
        iou = box_ops.pairwise_iou(box_ops.canonicalize(pred), box_ops.canonicalize(gt))
        j = jnp.clip(p2g, 0, m - 1)
        p2g = jnp.where((p2g >= 0) & (iou[jnp.arange(n), j] >= iou_threshold), p2g, -1)
    return jax.tree.map(jax.lax.stop_gradient, result_from_assignment(p2g, cost, pred_valid, gt_valid))


def match_batch(pred, gt, pred_valid=None, gt_valid=None, desc_cost=None, **kwargs) -> MatchResult:
    """`match` over a leading batch axis: pred `[B, N, 4]`, gt `[B, M, 4]`, masks `[B, N]`, `[B, M]`,
    desc_cost `[B, N, M]` -> `MatchResult` with a leading `B`."""
    bsz, n = pred.shape[:2]
    m = gt.shape[1]
    pv = jnp.ones((bsz, n), bool) if pred_valid is None else pred_valid
    gv = jnp.ones((bsz, m), bool) if gt_valid is None else gt_valid
    fn = functools.partial(match, **kwargs)
    if desc_cost is None:
        return jax.vmap(lambda p, g, a, b: fn(p, g, a, b))(pred, gt, pv, gv)
    return jax.vmap(lambda p, g, a, b, d: fn(p, g, a, b, desc_cost=d))(pred, gt, pv, gv, desc_cost)


# ---------------------------------------------------------------------------------------------- evaluation
def greedy_iou_match(pred, gt, iou_threshold: float = 0.5, pred_labels=None, gt_labels=None) -> np.ndarray:
    """Host-side greedy 1:1 matching for F1@IoU: pairs taken in order of decreasing IoU (ties: lower pred index,
    then lower gt index), accepted when IoU >= threshold and labels are equal (when given).

    pred `[N, 4]`, gt `[M, 4]` (any consistent units, xyxy) -> `pred_to_gt [N]` int (-1 = FP).
    """
    pred = np.asarray(pred, np.float64).reshape(-1, 4)
    gt = np.asarray(gt, np.float64).reshape(-1, 4)
    n, m = len(pred), len(gt)
    out = np.full(n, -1, np.int64)
    if n == 0 or m == 0:
        return out
    iou = box_ops.pairwise_iou_exact(pred, gt)  # exact: IoU == threshold must be accepted
    ok = iou >= iou_threshold
    if pred_labels is not None and gt_labels is not None:
        ok &= np.asarray(pred_labels, object)[:, None] == np.asarray(gt_labels, object)[None, :]
    ii, jj = np.nonzero(ok)
    order = np.lexsort((jj, ii, -iou[ii, jj]))
    used_p = np.zeros(n, bool)
    used_g = np.zeros(m, bool)
    for k in order:
        i, j = ii[k], jj[k]
        if not used_p[i] and not used_g[j]:
            out[i] = j
            used_p[i] = used_g[j] = True
    return out


def f1_counts(pred_to_gt, num_gt: int) -> dict:
    """tp / fp / fn / precision / recall / f1 from a `greedy_iou_match` result."""
    tp = int(np.sum(np.asarray(pred_to_gt) >= 0))
    fp = len(pred_to_gt) - tp
    fn = num_gt - tp
    prec = tp / (tp + fp) if tp + fp else 1.0
    rec = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": prec, "recall": rec, "f1": f1}
