"""Matching: Hungarian vs scipy, Sinkhorn vs Hungarian, FP/FN dummies, gating, greedy IoU matcher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from coordexp_jax.coord import boxes, matching as M

BUCKETS = (16, 32, 64)


def _bucket(k):
    return next(b for b in BUCKETS if k <= b)


def _random_problems(rng, count, max_size=60):
    """Random rectangular cost problems, grouped by padded size bucket: {P: (costs [B,P,P], rv, cv, sizes)}."""
    groups = {}
    for _ in range(count):
        n, m = (int(x) for x in rng.integers(1, max_size + 1, 2))
        kind = rng.integers(3)
        c = rng.random((n, m)) if kind == 0 else (rng.integers(0, 5, (n, m)) if kind == 1 else rng.exponential(3, (n, m)))
        groups.setdefault(_bucket(max(n, m)), []).append(c.astype(np.float32))
    out = {}
    for p, cs in groups.items():
        costs = rng.random((len(cs), p, p)).astype(np.float32) * 10  # padding holds garbage
        rv = np.zeros((len(cs), p), bool)
        cv = np.zeros((len(cs), p), bool)
        for b, c in enumerate(cs):
            costs[b, : c.shape[0], : c.shape[1]] = c
            rv[b, : c.shape[0]] = cv[b, : c.shape[1]] = True
        out[p] = (costs, rv, cv, cs)
    return out


def _check_assignment(p2g, rv, cv):
    got = p2g[p2g >= 0]
    assert len(set(got.tolist())) == len(got)  # 1:1
    assert np.all(rv[p2g >= 0]) and np.all(cv[got]) and np.all(p2g[~rv] == -1)


def test_hungarian_matches_scipy_on_1000_problems():
    rng = np.random.default_rng(0)
    groups = _random_problems(rng, 1000)
    assert sum(len(g[3]) for g in groups.values()) == 1000
    for p, (costs, rv, cv, cs) in groups.items():
        p2g = np.asarray(jax.jit(jax.vmap(lambda c, a, b: M.assign(c, a, b, "hungarian")))(costs, rv, cv))
        for b, c in enumerate(cs):
            r, col = linear_sum_assignment(c)
            _check_assignment(p2g[b], rv[b], cv[b])
            rows = np.nonzero(p2g[b] >= 0)[0]
            assert len(rows) == min(c.shape)
            # assign pads the real block with pad (matching._hungarian), so optax's float32 Hungarian works at that
            # scale and may settle a near-tie a few float32 ulps of pad off the optimum (seen: 2.5 ulps, 2 of the
            # 1000 problems; comparisons only, so ISA-independent); 16 ulps of pad, rtol for the float32 sums
            pad = (min(c.shape) + 1) * (np.abs(c).max() + 1)
            np.testing.assert_allclose(c[rows, p2g[b][rows]].sum(), c[r, col].sum(), rtol=1e-5, atol=16 * 2**-23 * pad)


def _augmented_reference(c, fp, fn):
    """Independent numpy construction of CoordExp's square FP/FN matrix, solved with scipy."""
    n, m = c.shape
    big = 1e6
    a = np.full((n + m, m + n), big)
    a[:n, :m] = c
    a[:n, m:][np.arange(n), np.arange(n)] = fp
    a[n:, :m][np.arange(m), np.arange(m)] = fn
    a[n:, m:] = 0
    r, col = linear_sum_assignment(a)
    return a[r, col].sum()


@pytest.mark.parametrize("method", M.METHODS)
def test_dummy_fp_fn_option(method):
    rng = np.random.default_rng(1)
    p = 12
    costs, rv, cv, sizes, refs = [], [], [], [], []
    for _ in range(60):
        n, m = (int(x) for x in rng.integers(1, p + 1, 2))
        # well separated: each pred is either a near-copy of a distinct gt (cost ~0.1) or far (cost >= 3)
        c = 3 + rng.random((n, m))
        k = int(rng.integers(0, min(n, m) + 1))
        ii, jj = rng.permutation(n)[:k], rng.permutation(m)[:k]
        c[ii, jj] = 0.1 + 0.1 * rng.random(k)
        full = np.full((p, p), 7.0, np.float32)
        full[:n, :m] = c
        costs.append(full)
        rv.append(np.arange(p) < n)
        cv.append(np.arange(p) < m)
        sizes.append((n, m))
        refs.append(_augmented_reference(c, 1.0, 1.2))
    costs, rv, cv = np.stack(costs), np.stack(rv), np.stack(cv)
    f = jax.jit(jax.vmap(lambda c, a, b: M.assign(c, a, b, method, dummy=True, epsilon=0.01, num_iters=300)))
    p2g = np.asarray(f(costs, rv, cv))
    for b, (n, m) in enumerate(sizes):
        _check_assignment(p2g[b], rv[b], cv[b])
        rows = np.nonzero(p2g[b] >= 0)[0]
        total = costs[b][rows, p2g[b][rows]].sum() + 1.0 * (n - len(rows)) + 1.2 * (m - len(rows))
        # well separated (any other assignment costs >= ~0.8 more): only the float32 rounding of the positive
        # costs (<= 2**-24 of the total) separates the totals
        assert total == pytest.approx(refs[b], rel=1e-5)


def _separated_box_problem(rng, n, m, p):
    """gt boxes on a jittered grid; predictions = a subset of gt (shuffled) with small noise, plus extras."""
    k = min(n, m)
    cells = rng.permutation(64)[: max(n, m)]
    base = np.stack([(cells % 8) / 8, (cells // 8) / 8], 1) + rng.uniform(0, 0.02, (len(cells), 2))
    wh = rng.uniform(0.04, 0.1, (len(cells), 2))
    allb = np.concatenate([base, base + wh], 1)
    gt = allb[:m]
    pred = np.concatenate([gt[rng.permutation(m)[:k]], allb[m:][: n - k]])[rng.permutation(n)]
    pred = pred + rng.normal(0, 0.004, pred.shape)
    pad = lambda x, k: np.concatenate([x, rng.random((k - len(x), 4))]).astype(np.float32)  # noqa: E731
    return pad(pred, p), pad(gt, p), np.arange(p) < n, np.arange(p) < m


def test_sinkhorn_agrees_with_hungarian_on_separated_problems():
    rng = np.random.default_rng(2)
    p, count = 32, 400
    probs = [_separated_box_problem(rng, *(int(x) for x in rng.integers(1, p + 1, 2)), p) for _ in range(count)]
    pred, gt, pv, gv = (np.stack(x) for x in zip(*probs))
    hung = jax.jit(lambda *a: M.match_batch(*a, method="hungarian"))(pred, gt, pv, gv)
    sink = jax.jit(lambda *a: M.match_batch(*a, method="sinkhorn", epsilon=0.01, num_iters=200))(pred, gt, pv, gv)
    h, s = np.asarray(hung.pred_to_gt), np.asarray(sink.pred_to_gt)
    same = np.all(h == s, axis=1)
    assert same.mean() >= 0.99, same.mean()
    costs = np.asarray(jax.jit(jax.vmap(M.box_cost_matrix))(pred, gt))
    for b in np.nonzero(~same)[0]:  # the rest are near-ties: the Sinkhorn pairs cost (almost) no more per pair
        c = costs[b]
        rows = np.nonzero(s[b] >= 0)[0]
        assert c[rows, s[b][rows]].mean() <= c[h[b] >= 0, h[b][h[b] >= 0]].mean() + 1e-2
    for res in (hung, sink):
        for b in range(count):
            _check_assignment(np.asarray(res.pred_to_gt[b]), pv[b], gv[b])
        np.testing.assert_array_equal(res.fp, pv & ~np.asarray(res.matched_pred))
        np.testing.assert_array_equal(res.fn, gv & ~np.asarray(res.matched_gt))


def test_match_gate_masks_desc_and_stop_gradient():
    gt = jnp.array([[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.9], [0.0, 0.0, 0.0, 0.0]])
    gv = jnp.array([True, True, False])
    pred = jnp.array([[0.62, 0.6, 0.9, 0.92], [0.1, 0.1, 0.2, 0.2], [jnp.nan, 0.1, 0.2, 0.2], [0.5, 0.5, 0.6, 0.6]])
    pv = jnp.array([True, True, True, False])
    for method in M.METHODS:
        r = jax.jit(lambda p: M.match(p, gt, pv, gv, method=method, iou_threshold=0.5))(pred)
        # pred 1 vs gt 0 has IoU 0.25 < 0.5: assigned but gated out
        assert r.pred_to_gt.tolist() == [1, -1, -1, -1]
        assert r.gt_to_pred.tolist() == [-1, 0, -1]
        assert r.fp.tolist() == [False, True, True, False] and r.fn.tolist() == [True, False, False]
        r2 = jax.jit(lambda p: M.match(p, gt, pv, gv, method=method))(pred)
        assert r2.pred_to_gt[:2].tolist() == [1, 0]
        g = jax.jit(jax.grad(lambda p: M.match(p, gt, pv, gv, method=method).cost))(pred)
        assert float(jnp.abs(jnp.nan_to_num(g)).sum()) == 0.0
    # description mismatch changes the pairing
    a = jnp.array([[0.1, 0.1, 0.3, 0.3], [0.12, 0.1, 0.3, 0.3]])
    d = M.desc_mismatch(["cat", "Dog "], ["dog", "cat"])
    assert d.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    with_desc = jax.jit(lambda a, d: M.match(a, a, desc_cost=d, desc_weight=5.0).pred_to_gt)
    assert with_desc(a, d).tolist() == [1, 0]
    assert with_desc(a, np.zeros_like(d)).tolist() == [0, 1]
    # the cost matrix equals the formula, with NaN replaced by the bound
    c = np.asarray(jax.jit(lambda p, g: M.box_cost_matrix(p, g, 2.0, 3.0))(pred, gt))
    can_p, can_g = np.asarray(boxes.canonicalize(np.nan_to_num(np.asarray(pred)))), np.asarray(boxes.canonicalize(gt))
    ref = 2 * boxes.pairwise_l1(can_p, can_g) + 3 * (1 - boxes.pairwise_giou(can_p, can_g))
    # float32 vs float64: a few ulps of the largest cost (seen 8e-8 of it)
    np.testing.assert_allclose(c[[0, 1, 3]], ref[[0, 1, 3]], atol=1e-6 * np.abs(ref[[0, 1, 3]]).max())
    assert np.all(c[2] == M.cost_bound(2.0, 3.0))
    with pytest.raises(ValueError, match="method"):
        M.assign(np.ones((2, 2)), method="auction")


def _greedy_reference(pred, gt, thr):
    """Naive: repeatedly take the globally best remaining pair."""
    def iou1(p, g):  # exact scalar IoU (no epsilon: IoU exactly 0.5 happens with integer boxes)
        iw = max(0.0, min(p[2], g[2]) - max(p[0], g[0]))
        ih = max(0.0, min(p[3], g[3]) - max(p[1], g[1]))
        u = max(p[2] - p[0], 0) * max(p[3] - p[1], 0) + (g[2] - g[0]) * (g[3] - g[1]) - iw * ih
        return iw * ih / u if u > 0 else 0.0

    iou = np.array([[iou1(p, g) for g in gt] for p in pred]).reshape(len(pred), len(gt))
    out = -np.ones(len(pred), int)
    while iou.size and iou.max() >= thr:
        i, j = np.unravel_index(np.argmax(iou), iou.shape)  # first max in row-major order: lower i, then lower j
        out[i] = j
        iou[i, :] = -1
        iou[:, j] = -1
    return out


def test_greedy_iou_match():
    rng = np.random.default_rng(3)
    for _ in range(50):
        n, m = rng.integers(0, 8, 2)
        gt = rng.integers(0, 10, (m, 2)).astype(float)
        gt = np.concatenate([gt, gt + rng.integers(1, 5, (m, 2))], 1)
        pred = np.concatenate([gt[rng.integers(0, max(m, 1), n)] if m else np.zeros((n, 4)), ], 0)
        pred = pred + rng.integers(-1, 2, pred.shape)
        out = M.greedy_iou_match(pred, gt, 0.5)
        np.testing.assert_array_equal(out, _greedy_reference(pred, gt, 0.5))
    f = M.f1_counts(np.array([0, -1, 2]), num_gt=4)
    assert (f["tp"], f["fp"], f["fn"]) == (2, 1, 2) and f["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    # labels must agree
    b = np.array([[0, 0, 1, 1.0]])
    assert M.greedy_iou_match(b, b, 0.5, ["a"], ["b"]).tolist() == [-1]


# ------------------------------------------------------------------------------------- non-finite costs
_BAD = (np.inf, -np.inf, np.nan)


def _lexicographic_reference(c):
    """(number of non-finite pairs, finite cost) of scipy's optimum with non-finite entries replaced by 1e6,
    a cost above any finite matching here (costs in [0, 1], at most 6 pairs)."""
    bad = ~np.isfinite(c)
    r, col = linear_sum_assignment(np.where(bad, 1e6, c))
    return int(bad[r, col].sum()), float(np.where(bad, 0.0, c)[r, col].sum())


def _brute_force(c):
    """The same (count, cost) by enumerating every maximum-cardinality matching (lexicographic minimum)."""
    import itertools

    n, m = c.shape
    bad = ~np.isfinite(c)
    fin = np.where(bad, 0.0, c)
    best = None
    if n <= m:
        pairs = ([(i, j) for i, j in enumerate(p)] for p in itertools.permutations(range(m), n))
    else:
        pairs = ([(i, j) for j, i in enumerate(p)] for p in itertools.permutations(range(n), m))
    for ps in pairs:
        key = (sum(bad[i, j] for i, j in ps), sum(fin[i, j] for i, j in ps))
        best = key if best is None or key < best else best
    return int(best[0]), float(best[1])


def _padded(cs, p, fill):
    """Cost list -> ([B, p, p] float32 with `fill` outside each problem, row masks, column masks)."""
    full = np.full((len(cs), p, p), fill, np.float32)
    rv, cv = np.zeros((len(cs), p), bool), np.zeros((len(cs), p), bool)
    for b, c in enumerate(cs):
        full[b, :c.shape[0], :c.shape[1]] = c
        rv[b, :c.shape[0]] = cv[b, :c.shape[1]] = True
    return full, rv, cv


def _vassign(method, dummy=False):
    return jax.jit(jax.vmap(lambda c, a, b: M.assign(c, a, b, method, dummy=dummy, epsilon=0.01, num_iters=300)))


def test_assign_nonfinite_costs_are_least_attractive():
    # The two non-finite entries are exactly the pairs to avoid (scipy: [1, 0]).
    c2 = np.stack([np.array([[bad, 1.0], [1.0, bad]], np.float32) for bad in _BAD])
    for method in M.METHODS:
        p2g = np.asarray(jax.jit(jax.vmap(lambda c: M.assign(c, method=method)))(c2))
        np.testing.assert_array_equal(p2g, [[1, 0]] * len(_BAD), err_msg=method)
    rng = np.random.default_rng(5)
    cs = []
    for trial in range(150):
        n, m = (int(x) for x in rng.integers(1, 6, 2))
        c = rng.random((n, m))
        mask = rng.random((n, m)) < rng.uniform(0.1, 0.7)
        c[mask] = rng.choice(_BAD, int(mask.sum()))
        if trial % 5 == 0:
            c[rng.integers(n)] = rng.choice(_BAD, m)  # a row that is non-finite everywhere
        if trial % 7 == 0:
            c[:, rng.integers(m)] = np.nan  # a column likewise
        cs.append(c)
    full, rv, cv = _padded(cs, 5, np.inf)  # padding entries non-finite too: they must stay out
    p2g_all = np.asarray(_vassign("hungarian")(full, rv, cv))
    for b, c in enumerate(cs):
        n, m = c.shape
        ref = _lexicographic_reference(c)
        brute = _brute_force(c)
        assert ref[0] == brute[0] and ref[1] == pytest.approx(brute[1], abs=1e-9)
        p2g = p2g_all[b]
        _check_assignment(p2g, rv[b], cv[b])
        rows = np.nonzero(p2g >= 0)[0]
        assert len(rows) == min(n, m)
        cols = p2g[rows]
        got = (int((~np.isfinite(c[rows, cols])).sum()), float(np.where(np.isfinite(c), c, 0)[rows, cols].sum()))
        assert got[0] == ref[0], (c, p2g)
        # float32 costs in [0, 1] next to replacement/padding costs of a few hundred: sums of <= 5 entries agree
        # to ~1e-4 (float32 ulp at 256 is 3e-5, a few roundings per dual update); 1e-3 leaves margin.
        assert got[1] == pytest.approx(ref[1], abs=1e-3), (c, p2g)


def test_assign_nonfinite_with_dummies():
    # With FP/FN dummies a non-finite pair is never taken (leaving both unmatched is always cheaper).
    rng = np.random.default_rng(6)
    cs = []
    for trial in range(60):
        n, m = (int(x) for x in rng.integers(1, 7, 2))
        c = rng.random((n, m)) * 0.5
        mask = rng.random((n, m)) < 0.4
        c[mask] = rng.choice(_BAD, int(mask.sum()))
        cs.append(c)
    full, rv, cv = _padded(cs, 6, np.nan)
    p2g_all = np.asarray(_vassign("hungarian", dummy=True)(full, rv, cv))
    for b, c in enumerate(cs):
        n, m = c.shape
        p2g = p2g_all[b]
        _check_assignment(p2g, rv[b], cv[b])
        rows = np.nonzero(p2g >= 0)[0]
        assert np.all(np.isfinite(c[rows, p2g[rows]]))
        total = c[rows, p2g[rows]].sum() + 1.0 * (n - len(rows)) + 1.2 * (m - len(rows))
        ref = _augmented_reference(np.where(np.isfinite(c), c, 1e6), 1.0, 1.2)  # 1e6: never worth taking
        assert total == pytest.approx(ref, abs=1e-4)  # float32 sums of <= 12 entries of size <= 1.2


def test_sinkhorn_nonfinite_costs():
    # Well separated problems (one cheap partner per row) with non-finite entries off the cheap pairs and a row
    # non-finite everywhere but at its partner: Sinkhorn finds the Hungarian answer, never a non-finite pair;
    # with dummies likewise, and the transport plan stays finite.
    rng = np.random.default_rng(7)
    cs, perms = [], []
    for trial in range(20):
        n = int(rng.integers(2, 7))
        c = 2 + rng.random((n, n))
        perm = rng.permutation(n)
        mask = rng.random((n, n)) < 0.5
        c[mask] = rng.choice(_BAD, int(mask.sum()))
        c[0] = rng.choice(_BAD, n)
        c[np.arange(n), perm] = 0.1 * rng.random(n)
        cs.append(c)
        perms.append(perm)
    full, rv, cv = _padded(cs, 6, -np.inf)
    for method in M.METHODS:
        for dummy in (False, True):
            p2g_all = np.asarray(_vassign(method, dummy)(full, rv, cv))
            for b, perm in enumerate(perms):
                np.testing.assert_array_equal(p2g_all[b, :len(perm)], perm, err_msg=f"{method} dummy={dummy}")
    for dummy in (False, True):
        plan = jax.jit(jax.vmap(lambda c, a, b: M.sinkhorn_plan(M.replace_nonfinite(c, a, b, dummy), a, b, dummy)))
        assert np.all(np.isfinite(np.asarray(plan(full, rv, cv))))
