"""GRPO grounding rewards against hand-computed values, a numerical Bhattacharyya integral, the seed's matrix
formula and brute-force matching; parse failures, empty answers, duplicates, degenerate boxes, unknown tags."""

import itertools
import math

import numpy as np
import pytest

from coordexp_jax.coord import protocols as P
from coordexp_jax.data.tokenizer import small_tokenizer, token_ids_from_tokenizer
from coordexp_jax.errors import CoordExpError
from coordexp_jax.rl import rewards as R
from coordexp_jax.rl.rewards import Answer

# Every value below is float64 arithmetic of a handful of operations: relative error ~1e-15, so 1e-12 holds on
# any x86 CPU (no reductions long enough for AVX2 / AVX-512 reassociation to matter).
TOL = 1e-12

GT = [("cat", (0.2, 0.2, 0.6, 0.4))]  # centre (0.4, 0.3), size (0.4, 0.2) -> σ_gt = (0.2, 0.1)
SINGLE = ("gaussian_point", "gaussian_plane", "iou")
MULTI = ("multi_gaussian_point", "multi_gaussian_plane", "multi_iou")


def ans(*objs, ok=True):
    return Answer(ok, tuple(objs))


def test_registry_names():
    assert set(R.REWARDS) == {"format", "multi_box_format", *SINGLE, *MULTI}


# ------------------------------------------------------------------------------------------- single box
def test_exact_box_scores_one():
    a = ans(("cat", GT[0][1]))
    for k in ("format", "multi_box_format", *SINGLE, *MULTI):
        assert R.REWARDS[k](a, GT) == pytest.approx(1.0, abs=TOL), k


def test_gaussian_point_by_hand():
    # centre (0.5, 0.35): Δ = (0.1, 0.05), σ_gt = (0.2, 0.1): exponent -½ (0.25 + 0.25) = -0.25
    a = ans(("cat", (0.3, 0.25, 0.7, 0.45)))
    assert R.REWARDS["gaussian_point"](a, GT) == pytest.approx(math.exp(-0.25), rel=TOL)
    # the point reward only looks at the centre: a box of any size with the same centre scores the same
    b = ans(("cat", (0.45, 0.3, 0.55, 0.4)))
    assert R.REWARDS["gaussian_point"](b, GT) == pytest.approx(math.exp(-0.25), rel=TOL)


def test_gaussian_plane_by_hand():
    # same centre, pred size (0.8, 0.4) -> σ_p = (0.4, 0.2) = 2 σ_g on both axes.
    # per axis: s = (4 + 1)/2 σ_g² -> ½ ln(2.5 / 2) ; D = 2 · ½ ln 1.25 = ln 1.25 -> reward 0.8
    a = ans(("cat", (0.0, 0.1, 0.8, 0.5)))
    assert R.REWARDS["gaussian_plane"](a, GT) == pytest.approx(0.8, rel=TOL)
    # IoU: pred area 0.32, gt area 0.08 inside it -> 0.25
    assert R.REWARDS["iou"](a, GT) == pytest.approx(0.25, rel=TOL)


def _bc_numeric(p, g, n=4001):
    """Bhattacharyya coefficient ∫∫ sqrt(N_p N_g) by the trapezoid rule on a wide grid (independent of the closed
    form: densities written out, no log-determinants)."""
    out = 1.0
    for d in range(2):
        mp, sp = (p[d] + p[d + 2]) / 2, max(0.5 * (p[d + 2] - p[d]), R.SIGMA_MIN)
        mg, sg = (g[d] + g[d + 2]) / 2, max(0.5 * (g[d + 2] - g[d]), R.SIGMA_MIN)
        lo, hi = min(mp - 10 * sp, mg - 10 * sg), max(mp + 10 * sp, mg + 10 * sg)
        x = np.linspace(lo, hi, n)
        f = lambda m, s: np.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))  # noqa: E731
        out *= np.trapezoid(np.sqrt(f(mp, sp) * f(mg, sg)), x)
    return out


def _bhattacharyya_matrix(p, g):
    """The seed's general formula: D = ⅛ Δμᵀ Σ⁻¹ Δμ + ½ ln(det Σ / sqrt(det Σ_p det Σ_g)) with numpy linalg."""
    def mu_cov(b):
        s = np.maximum(0.5 * np.abs(np.array([b[2] - b[0], b[3] - b[1]])), R.SIGMA_MIN)
        return np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]), np.diag(s**2)
    mp, cp = mu_cov(p)
    mg, cg = mu_cov(g)
    c = (cp + cg) / 2
    dm = mp - mg
    det = np.linalg.det
    d = dm @ np.linalg.inv(c) @ dm / 8 + 0.5 * np.log(det(c) / np.sqrt(det(cp) * det(cg)))
    return float(np.exp(-d))


def test_gaussian_plane_vs_matrix_formula_and_integral():
    rng = np.random.default_rng(0)
    for _ in range(40):
        p = np.sort(rng.uniform(0, 1, (2, 2)), axis=0).T.reshape(-1)[[0, 2, 1, 3]]  # x1 < x2, y1 < y2
        g = np.sort(rng.uniform(0, 1, (2, 2)), axis=0).T.reshape(-1)[[0, 2, 1, 3]]
        got = R.REWARDS["gaussian_plane"](ans(("a", p)), [("a", g)])
        # matrix formula: same float64 math in another order, ~1e-15 relative
        assert got == pytest.approx(_bhattacharyya_matrix(p, g), rel=1e-10, abs=1e-300)
        # trapezoid on 4001 points over ±10σ of smooth integrands: error far below 1e-6 of the value (or absolute
        # 1e-9 when the two Gaussians barely overlap)
        assert got == pytest.approx(_bc_numeric(p, g), rel=1e-6, abs=1e-9)


def test_first_predicted_box_counts_and_best_gt():
    good, bad = ("cat", GT[0][1]), ("cat", (0.8, 0.8, 0.9, 0.9))
    assert R.REWARDS["iou"](ans(good, bad), GT) == 1.0
    assert R.REWARDS["iou"](ans(bad, good), GT) == 0.0
    # two gt boxes for the phrase: the best one counts
    two = GT + [("cat", (0.8, 0.8, 0.9, 0.9))]
    assert R.REWARDS["iou"](ans(bad), two) == pytest.approx(1.0, abs=TOL)


def test_empty_answers_single():
    empty = ans()
    for k in SINGLE:
        assert R.REWARDS[k](empty, GT) == 0.0  # nothing predicted, one gt box
        assert R.REWARDS[k](empty, []) == 1.0  # nothing to find, nothing found
        assert R.REWARDS[k](ans(GT[0]), []) == 0.0
    assert R.REWARDS["format"](empty, GT) == 1.0  # an empty list is well-formed


def test_parse_failure_zero_everywhere():
    for pred in (None, Answer(False, (GT[0],)), ans(("cat", (0.2, float("nan"), 0.6, 0.4)))):
        for k in R.REWARDS:
            assert R.REWARDS[k](pred, GT) == 0.0, (k, pred)


def test_degenerate_boxes_finite():
    line = ("cat", (0.3, 0.3, 0.3, 0.5))  # zero width
    dot = ("cat", (0.4, 0.3, 0.4, 0.3))  # zero width and height, at the gt centre
    for pred in (line, dot):
        for k in R.REWARDS:
            v = R.REWARDS[k](ans(pred), GT)
            assert np.isfinite(v) and 0.0 <= v <= 1.0, (k, pred, v)
    # point reward of a dot at the gt centre: exactly 1 (only the centre matters)
    assert R.REWARDS["gaussian_point"](ans(dot), GT) == 1.0
    # plane of the dot: σ_p = (1e-3, 1e-3) (the floor) against σ_g = (0.2, 0.1), same centre:
    # BC = Π_d sqrt(2 σ_p σ_g / (σ_p² + σ_g²))
    sp, sg = np.array([1e-3, 1e-3]), np.array([0.2, 0.1])
    expect = float(np.prod(np.sqrt(2 * sp * sg / (sp**2 + sg**2))))
    assert R.REWARDS["gaussian_plane"](ans(dot), GT) == pytest.approx(expect, rel=TOL)
    # a degenerate ground truth: σ_gt floored too, a prediction on it scores 1, one off it a finite value < 1
    gt_dot = [("cat", (0.5, 0.5, 0.5, 0.5))]
    assert R.REWARDS["gaussian_point"](ans(("cat", (0.5, 0.5, 0.5, 0.5))), gt_dot) == 1.0
    assert R.REWARDS["gaussian_plane"](ans(("cat", (0.5, 0.5, 0.5, 0.5))), gt_dot) == 1.0
    assert R.REWARDS["gaussian_point"](ans(("cat", (0.5, 0.5, 0.501, 0.5))), gt_dot) == pytest.approx(
        math.exp(-0.5 * 0.25), rel=1e-9)  # Δcx = 0.0005 = ½ σ_min; 0.501 - 0.5 carries ~1e-13 relative error


def test_inverted_pred_box_is_canonicalised():
    inv = ("cat", (0.6, 0.4, 0.2, 0.2))
    for k in ("iou", "gaussian_point", "gaussian_plane"):
        assert R.REWARDS[k](ans(inv), GT) == pytest.approx(1.0, abs=TOL)


# --------------------------------------------------------------------------------------------- multi box
def test_multi_by_hand_with_duplicates_and_unknown_tag():
    gt = [("cat", (0.0, 0.0, 0.4, 0.4)), ("cat", (0.5, 0.5, 0.9, 0.9)), ("dog", (0.0, 0.6, 0.2, 0.8))]
    pred = ans(
        ("cat", (0.0, 0.0, 0.4, 0.4)),  # exact: IoU 1
        ("Cat ", (0.0, 0.0, 0.4, 0.4)),  # duplicate (desc normalised to "cat"): unmatched -> counts in N_pred
        ("cat", (0.5, 0.5, 0.9, 0.8)),  # IoU 0.75 with the second cat
        ("bird", (0.0, 0.6, 0.2, 0.8)),  # unknown tag on the dog's box: unmatched
    )
    # matched g: IoU 1 + 0.75; N_gt + N_pred = 3 + 4
    assert R.REWARDS["multi_iou"](pred, gt) == pytest.approx(2 * 1.75 / 7, rel=TOL)
    # point for the 0.75 pair: centre (0.7, 0.65) vs (0.7, 0.7), σ_gt = (0.2, 0.2): exp(-½ (0.05/0.2)²)
    pt = 1 + math.exp(-0.5 * 0.0625)
    assert R.REWARDS["multi_gaussian_point"](pred, gt) == pytest.approx(2 * pt / 7, rel=TOL)
    # plane: x equal; y: Δμ = 0.05, σ_p = 0.15, σ_g = 0.2, s = (0.0225 + 0.04)/2
    s = (0.0225 + 0.04) / 2
    pl = 1 + math.exp(-(0.05**2 / (8 * s) + 0.5 * math.log(s / (0.15 * 0.2))))
    assert R.REWARDS["multi_gaussian_plane"](pred, gt) == pytest.approx(2 * pl / 7, rel=TOL)
    assert R.REWARDS["multi_box_format"](pred, gt) == 1.0


def test_multi_threshold_and_empty():
    gt = [("cat", (0.0, 0.0, 0.5, 0.5))]
    # IoU exactly 0.5 (dyadic coordinates: 0.125 / 0.25 is exact in float64) is kept; just below is not
    assert R.REWARDS["multi_iou"](ans(("cat", (0.0, 0.0, 0.5, 0.25))), gt) == 0.5
    assert R.REWARDS["multi_iou"](ans(("cat", (0.0, 0.0, 0.5, 0.2499))), gt) == 0.0
    for k in MULTI:
        assert R.REWARDS[k](ans(), []) == 1.0
        assert R.REWARDS[k](ans(), gt) == 0.0
        assert R.REWARDS[k](ans(*gt), []) == 0.0
        assert R.REWARDS[k](None, []) == 0.0  # a parse failure is 0 even with nothing to find


def _brute_multi_iou(pred, gt):
    """Per desc: every injective assignment of the smaller side, minimum Σ(1 - IoU) (numpy IoU written out),
    then the IoU >= 0.5 filter, 2 Σ / (N_gt + N_pred)."""
    def iou(a, b):
        iw = max(min(a[2], b[2]) - max(a[0], b[0]), 0)
        ih = max(min(a[3], b[3]) - max(a[1], b[1]), 0)
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    if not pred and not gt:
        return 1.0
    total = 0.0
    for d in {o[0] for o in pred} | {o[0] for o in gt}:
        p = [o[1] for o in pred if o[0] == d]
        g = [o[1] for o in gt if o[0] == d]
        if not p or not g:
            continue
        m = np.array([[iou(a, b) for b in g] for a in p])
        best, best_cost = None, np.inf
        if len(p) <= len(g):
            cands = [list(zip(range(len(p)), perm)) for perm in itertools.permutations(range(len(g)), len(p))]
        else:
            cands = [list(zip(perm, range(len(g)))) for perm in itertools.permutations(range(len(p)), len(g))]
        for c in cands:
            cost = sum(1 - m[i, j] for i, j in c)
            if cost < best_cost - 1e-12:
                best, best_cost = c, cost
        total += sum(m[i, j] for i, j in best if m[i, j] >= 0.5)
    return 2 * total / (len(pred) + len(gt))


def test_multi_iou_vs_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(150):
        gt, pred = [], []
        for _ in range(rng.integers(0, 5)):
            c = rng.uniform(0.2, 0.8, 2)
            s = rng.uniform(0.05, 0.4, 2)
            gt.append((str(rng.integers(0, 2)), tuple(np.r_[c - s / 2, c + s / 2])))
        for _ in range(rng.integers(0, 5)):
            if gt and rng.random() < 0.7:  # a jittered copy of a gt box (IoU around the threshold)
                d, b = gt[rng.integers(len(gt))]
                b = np.clip(np.asarray(b) + rng.normal(0, 0.04, 4), 0, 1)
                b = np.r_[np.minimum(b[:2], b[2:]), np.maximum(b[:2], b[2:])]
                pred.append((d if rng.random() < 0.9 else "2", tuple(b)))
            else:
                c = rng.uniform(0.2, 0.8, 2)
                s = rng.uniform(0.05, 0.4, 2)
                pred.append((str(rng.integers(0, 3)), tuple(np.r_[c - s / 2, c + s / 2])))
        # continuous random boxes: ties between optimal assignments with different IoU >= 0.5 pairs have
        # probability 0, so both optima keep the same pairs; sums of <= 8 float64 terms agree to ~1e-15
        assert R.REWARDS["multi_iou"](ans(*pred), gt) == pytest.approx(_brute_multi_iou(pred, gt), rel=1e-12,
                                                                        abs=1e-12)


# ------------------------------------------------------------------------------------------- ParseResult
def test_parse_result_input():
    tok = small_tokenizer()
    tid = token_ids_from_tokenizer(tok)
    ser = P.serialize([P.AnswerObject("cat", bins=(200, 200, 599, 400))], tok, tid)
    ok = P.parse(ser.ids + [tid.im_end], tok, tid)
    box = np.array([200, 200, 599, 400]) / 999
    gt = [("cat", box)]
    assert R.REWARDS["format"](ok, gt) == 1.0
    assert R.REWARDS["iou"](ok, gt) == pytest.approx(1.0, abs=TOL)
    truncated = P.parse(ser.ids[:-4], tok, tid)  # cut inside the box
    assert not truncated.closed
    for k in R.REWARDS:
        assert R.REWARDS[k](truncated, gt) == 0.0, k
    # a closed answer that dropped a malformed object is a failure too (strict format)
    dropped = P.ParseResult(objects=ok.objects, dropped={"bad_coord": 1}, closed=True, end=0, has_eos=True)
    assert R.REWARDS["format"](dropped, gt) == 0.0 and R.REWARDS["iou"](dropped, gt) == 0.0


# ------------------------------------------------------------------------------------------------ batch
def test_compute_rewards_weighted_sum():
    preds = [ans(("cat", (0.3, 0.25, 0.7, 0.45))), None, ans()]
    gts = [GT, GT, []]
    total, per = R.compute_rewards(preds, gts, {"format": 0.5, "gaussian_point": 2.0, "multi_iou": 1.0})
    assert set(per) == {"format", "gaussian_point", "multi_iou"}
    for v in per.values():
        assert v.shape == (3,) and v.dtype == np.float64
    np.testing.assert_allclose(per["format"], [1, 0, 1])
    np.testing.assert_allclose(per["gaussian_point"], [math.exp(-0.25), 0, 1], rtol=TOL)
    # IoU of (0.3,0.25,0.7,0.45) with GT: inter 0.3*0.15 = 0.045, union 0.08 + 0.08 - 0.045 = 0.115 -> < 0.5
    np.testing.assert_allclose(per["multi_iou"], [0, 0, 1])
    np.testing.assert_allclose(total, 0.5 * per["format"] + 2.0 * per["gaussian_point"] + per["multi_iou"], rtol=TOL)


def test_compute_rewards_errors():
    with pytest.raises(CoordExpError, match="'gaussian_pointy'"):
        R.compute_rewards([None], [GT], {"format": 1.0, "gaussian_pointy": 1.0})
    with pytest.raises(CoordExpError, match="sample 1 object 0"):
        R.compute_rewards([None, None], [GT, [("cat", (0.1, 0.2, 0.3))]], {"format": 1.0})
    with pytest.raises(CoordExpError, match="sample 0 object 0"):
        R.compute_rewards([None], [[("cat", (0.1, float("inf"), 0.3, 0.4))]], {"format": 1.0})
    with pytest.raises(CoordExpError, match="2 predictions but 1"):
        R.compute_rewards([None, None], [GT], {"format": 1.0})
