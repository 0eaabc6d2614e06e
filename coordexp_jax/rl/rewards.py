"""GRPO grounding rewards: pure host-side functions `(pred, gt) -> float` in [0, 1], registered by name.

Formulas: `../shared/reference/coordexp_method.md` §8, from the GUI-G² paper (Tang et al. 2025, "GUI-G²: Gaussian
Reward Modeling for GUI Grounding", arXiv:2507.15846) as its MMKD-RL-Grounding port writes them; see `docs/rl.md`.

Inputs
- `pred`: a `protocols.ParseResult` (what `coord.protocols.parse` returns for a rollout), an `Answer`, or `None`
  (a failure). A `ParseResult` counts as parsed (`ok`) iff its structure was closed and nothing was dropped
  (`closed and num_dropped == 0`, the rule Stage-2 uses); its boxes are the decoded bins (k / 999).
- `gt`: a sequence of `(desc, box)` pairs (or objects with `.desc` and `.box`), box = normalised xyxy.
- Every box is normalised xyxy in [0, 1] (x1, y1, x2, y2 as fractions of the image width / height). Before any
  reward, boxes are canonicalised (`coord.boxes.canonicalize`: min/max per axis, clamped to [0, 1]).

Conventions
- A parse failure (`ok` False, `None`, a predicted box with a non-finite coordinate) gives 0 for every reward,
  `format` included. Model output is never evaluated (`parse` reads token ids; nothing here calls `eval`).
- Single-box rewards (`gaussian_point`, `gaussian_plane`, `iou`) score the FIRST predicted box. Against one
  ground-truth box this is §8 exactly; with several ground-truth boxes (a phrase naming several objects) the best
  of them counts (max over gt); with no ground-truth box the reward is 1 for an empty answer, else 0; with no
  predicted box (and a gt box) it is 0.
- Multi-box rewards (`multi_*`): objects are grouped by desc (case- and whitespace-insensitive, as
  `coord.matching.desc_mismatch`); within each desc, Hungarian matching (`scipy.optimize.linear_sum_assignment`)
  on 1 - IoU; pairs with IoU >= 0.5 (exact IoU, no epsilon) are kept; reward = 2 · Σ_kept g(pred, gt) /
  (N_gt + N_pred), and 1 when both are empty. g is the pair's IoU, point or plane reward (`multi_box_format` is
  the format reward). A predicted desc absent from the ground truth matches nothing and counts in N_pred.
  (Host-side scipy, not `coord.matching.assign`: that one is jitted per shape, and here every answer has its own.)
- Degenerate boxes: σ = α · size (α = 0.5) is floored at `SIGMA_MIN` = 1e-3 (normalised units: 0.1 % of the
  image side), so zero-width or zero-height boxes give finite rewards, never NaN. IoU with a zero union is 0.

`compute_rewards(preds, gts, weights)` runs the named rewards over a batch and returns the weighted sum.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from coordexp_jax.coord import boxes as box_ops
from coordexp_jax.errors import CoordExpError

ALPHA = 0.5  # σ = ALPHA · box size (GUI-G²; coordexp_method.md §8)
SIGMA_MIN = 1e-3  # floor of σ in normalised units: degenerate boxes stay finite
IOU_THRESHOLD = 0.5  # multi-box: matched pairs kept when IoU >= this


class RewardError(CoordExpError, ValueError):
    """A reward name that is not registered, or ground truth that is not a list of (desc, normalised box)."""


@dataclasses.dataclass(frozen=True)
class Answer:
    """A parsed answer: `ok` (it parsed under the protocol) and `objects`, a list of `(desc, box)` with box a
    normalised xyxy 4-tuple. The adapter every reward works on (`as_answer` builds it)."""

    ok: bool
    objects: tuple = ()


REWARDS: dict[str, Callable] = {}


def register(name: str):
    """Decorator: add a `(pred, gt) -> float` reward to `REWARDS` under `name` (a duplicate name is a bug)."""

    def deco(fn):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} registered twice")
        REWARDS[name] = fn
        return fn

    return deco


# ------------------------------------------------------------------------------------------------ inputs
_FAIL = Answer(False, ())


def as_answer(pred) -> Answer:
    """`ParseResult` / `Answer` / `None` -> `Answer` with canonicalised float boxes. A non-finite predicted
    coordinate or a malformed object makes the whole answer a failure (`ok=False`)."""
    if pred is None:
        return _FAIL
    if isinstance(pred, Answer):
        ok, objs = bool(pred.ok), pred.objects
    elif hasattr(pred, "closed") and hasattr(pred, "objects"):  # protocols.ParseResult
        ok = bool(pred.closed) and pred.num_dropped == 0
        objs = [(o.desc, o.box) for o in pred.objects]
    else:
        raise TypeError(f"reward prediction must be a ParseResult, an Answer or None, got {type(pred).__name__}")
    if not ok:
        return _FAIL
    out = []
    for o in objs:
        try:
            desc, box = o
            b = np.asarray(box, np.float64).reshape(4)
        except (TypeError, ValueError):
            return _FAIL
        if not np.all(np.isfinite(b)):
            return _FAIL
        out.append((str(desc), box_ops.canonicalize(b)))
    return Answer(True, tuple(out))


def gt_objects(gt, where: str = "ground truth") -> list[tuple[str, np.ndarray]]:
    """Ground truth `[(desc, box), ...]` (or objects with `.desc` / `.box`) -> list of (desc, canonical box).
    Raises `RewardError` naming the object when a box is not 4 finite numbers."""
    out = []
    for i, o in enumerate(gt):
        try:
            desc, box = (o.desc, o.box) if hasattr(o, "desc") and hasattr(o, "box") else o
            b = np.asarray(box, np.float64).reshape(4)
        except (TypeError, ValueError):
            raise RewardError(f"{where} object {i}: expected (desc, box) with box 4 normalised numbers, "
                              f"got {o!r}") from None
        if not np.all(np.isfinite(b)):
            raise RewardError(f"{where} object {i}: box must be finite, got {b.tolist()}")
        out.append((str(desc), box_ops.canonicalize(b)))
    return out


def _norm_desc(s: str) -> str:
    return " ".join(str(s).lower().split())


# ---------------------------------------------------------------------------------------- pair rewards
def _gauss_params(box) -> tuple[np.ndarray, np.ndarray]:
    """Normalised xyxy `[..., 4]` -> (centre `[..., 2]`, σ `[..., 2]` = max(ALPHA · size, SIGMA_MIN))."""
    b = np.asarray(box, np.float64)
    mu = (b[..., :2] + b[..., 2:]) / 2
    sigma = np.maximum(ALPHA * np.abs(b[..., 2:] - b[..., :2]), SIGMA_MIN)
    return mu, sigma


def point_score(pred_box, gt_box) -> np.ndarray:
    """exp(-½ Σ_d (c_pred,d - c_gt,d)² / σ_gt,d²), σ of the GROUND-TRUTH box (GUI-G² Gaussian point reward).
    Broadcasts over leading axes: `[..., 4], [..., 4] -> [...]` in (0, 1]."""
    mp, _ = _gauss_params(pred_box)
    mg, sg = _gauss_params(gt_box)
    return np.exp(-0.5 * np.sum(((mp - mg) / sg) ** 2, axis=-1))


def plane_score(pred_box, gt_box) -> np.ndarray:
    """exp(-D_B), D_B the Bhattacharyya distance of the two boxes' diagonal Gaussians N(c, diag σ²), each with its
    own σ (GUI-G² Gaussian plane / coverage reward). With Σ = (Σ_p + Σ_g)/2,
    D_B = ⅛ Δμᵀ Σ⁻¹ Δμ + ½ ln(det Σ / sqrt(det Σ_p det Σ_g)), which for diagonal covariances is the sum over the two
    axes of Δμ_d² / (8 s_d) + ½ ln(s_d / (σ_p,d σ_g,d)), s_d = (σ_p,d² + σ_g,d²)/2. exp(-D_B) is the
    Bhattacharyya coefficient ∫ sqrt(p q), in (0, 1], 1 iff the boxes are equal. `[..., 4], [..., 4] -> [...]`."""
    mp, sp = _gauss_params(pred_box)
    mg, sg = _gauss_params(gt_box)
    s = (sp**2 + sg**2) / 2
    d = np.sum((mp - mg) ** 2 / (8 * s) + 0.5 * np.log(s / (sp * sg)), axis=-1)
    return np.exp(-d)


def iou_score(pred_box, gt_box) -> np.ndarray:
    """IoU with no epsilon (0 when the union is empty): `[4], [4] -> []`."""
    return box_ops.pairwise_iou_exact(pred_box, gt_box)[0, 0]


_PAIR = {"point": point_score, "plane": plane_score, "iou": iou_score}


def _single(kind: str, pred, gt) -> float:
    a = as_answer(pred)
    g = gt_objects(gt)
    if not a.ok:
        return 0.0
    if not g:
        return float(not a.objects)
    if not a.objects:
        return 0.0
    p = a.objects[0][1]
    return float(max(float(_PAIR[kind](p, gb)) for _, gb in g))


# ----------------------------------------------------------------------------------------------- matching
def match_per_desc(pred_objs, gt_objs, iou_threshold: float = IOU_THRESHOLD) -> list[tuple[int, int, float]]:
    """Kept pairs `(pred index, gt index, IoU)` of the per-desc Hungarian matching on 1 - IoU (pairs with
    IoU >= `iou_threshold`). `pred_objs`, `gt_objs`: lists of (desc, normalised box)."""
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for i, (d, _) in enumerate(pred_objs):
        groups.setdefault(_norm_desc(d), ([], []))[0].append(i)
    for j, (d, _) in enumerate(gt_objs):
        groups.setdefault(_norm_desc(d), ([], []))[1].append(j)
    pairs = []
    for pi, gj in groups.values():
        if not pi or not gj:
            continue
        iou = box_ops.pairwise_iou_exact([pred_objs[i][1] for i in pi], [gt_objs[j][1] for j in gj])
        rows, cols = linear_sum_assignment(1.0 - iou)
        pairs += [(pi[r], gj[c], float(iou[r, c])) for r, c in zip(rows, cols) if iou[r, c] >= iou_threshold]
    return sorted(pairs)


def _multi(kind: str, pred, gt) -> float:
    a = as_answer(pred)
    g = gt_objects(gt)
    if not a.ok:
        return 0.0
    n = len(a.objects) + len(g)
    if n == 0:
        return 1.0
    total = 0.0
    for i, j, iou in match_per_desc(a.objects, g):
        total += iou if kind == "iou" else float(_PAIR[kind](a.objects[i][1], g[j][1]))
    return 2.0 * total / n


# ------------------------------------------------------------------------------------------- registered
@register("format")
def format_reward(pred, gt=None) -> float:
    """1 if the answer parses under the protocol (closed, nothing dropped), else 0 (§8)."""
    return float(as_answer(pred).ok)


@register("multi_box_format")
def multi_box_format_reward(pred, gt=None) -> float:
    """The multi-box format reward: the same rule as `format` (a parsed object list, any length, empty included)."""
    return float(as_answer(pred).ok)


@register("gaussian_point")
def gaussian_point_reward(pred, gt) -> float:
    """`point_score` of the first predicted box (single-box conventions in the module docstring)."""
    return _single("point", pred, gt)


@register("gaussian_plane")
def gaussian_plane_reward(pred, gt) -> float:
    """`plane_score` (Bhattacharyya coefficient) of the first predicted box."""
    return _single("plane", pred, gt)


@register("iou")
def iou_reward(pred, gt) -> float:
    """IoU of the first predicted box."""
    return _single("iou", pred, gt)


@register("multi_gaussian_point")
def multi_gaussian_point_reward(pred, gt) -> float:
    """2 · Σ_matched point_score / (N_gt + N_pred) over the per-desc Hungarian matching (IoU >= 0.5)."""
    return _multi("point", pred, gt)


@register("multi_gaussian_plane")
def multi_gaussian_plane_reward(pred, gt) -> float:
    """2 · Σ_matched plane_score / (N_gt + N_pred) over the per-desc Hungarian matching (IoU >= 0.5)."""
    return _multi("plane", pred, gt)


@register("multi_iou")
def multi_iou_reward(pred, gt) -> float:
    """2 · Σ_matched IoU / (N_gt + N_pred) over the per-desc Hungarian matching (IoU >= 0.5)."""
    return _multi("iou", pred, gt)


# ------------------------------------------------------------------------------------------------ batch
def compute_rewards(preds: Sequence, gts: Sequence, weights: Mapping[str, float]) -> tuple[np.ndarray, dict]:
    """Rewards of a batch: `preds [N]` (ParseResult / Answer / None), `gts [N]` (lists of (desc, box)),
    `weights` {reward name: weight}. Returns `(total [N] float64 = Σ_name weight · reward, {name: [N] float64})`.

    Raises `RewardError` for an unknown reward name (naming it and the registered ones), for `preds` and `gts`
    of different lengths, or for a malformed ground-truth box (naming the sample and object).
    """
    unknown = [k for k in weights if k not in REWARDS]
    if unknown:
        raise RewardError(f"unknown reward {unknown[0]!r}; registered rewards: {sorted(REWARDS)}")
    if len(preds) != len(gts):
        raise RewardError(f"compute_rewards: {len(preds)} predictions but {len(gts)} ground truths")
    n = len(preds)
    answers = [as_answer(p) for p in preds]
    truths = [gt_objects(g, f"ground truth of sample {i}") for i, g in enumerate(gts)]
    per_fn = {k: np.array([REWARDS[k](a, g) for a, g in zip(answers, truths)], np.float64).reshape(n)
              for k in weights}
    total = np.zeros(n, np.float64)
    for k, w in weights.items():
        w = float(w)
        if not math.isfinite(w):
            raise RewardError(f"reward weight {k!r} must be finite, got {w}")
        total += w * per_fn[k]
    return total, per_fn
