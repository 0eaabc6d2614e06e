"""Human-object interaction (HOI) metrics: grounding average recall over person-object pairs, and referring
answers scored by exact match, token F1 and BERTScore.

Grounding (an action query -> the (person, object) box pairs that perform it), after the HOI benchmarks the
spatial-linking recipe reports (its `recalculate_ground_metrics`; docs/evaluation.md, "Human-object interaction"):
- a predicted pair matches a true pair at IoU threshold t only when BOTH its person box and its object box have
  IoU >= t with the true pair's boxes; pairs are matched one-to-one, greedily in order of decreasing mean
  (person IoU + object IoU) / 2 (`match_pairs`);
- recall of one query at t = matched true pairs / true pairs; AR@t = the mean of that over the queries that have
  true pairs; AR = the mean of AR@t over t = 0.50, 0.55, ..., 0.95 (COCO's ten thresholds);
- ARs / ARm / ARl: the true pairs pooled by the area of their OBJECT box (pixels of the original image, COCO's
  ranges: small < 32², medium 32²..96², large >= 96²), recall = matched / pairs of that size, averaged over the
  ten thresholds; a size with no true pair is left out of the result.

Referring (person and object boxes -> the action, as text): exact match and token F1 after SQuAD's answer
normalisation (lower case, punctuation and the articles a / an / the removed, whitespace collapsed: `normalize_answer`
of the official SQuAD v1.1 evaluation script, Rajpurkar et al., "SQuAD: 100,000+ Questions for Machine
Comprehension of Text", EMNLP 2016), the best over the reference answers of a query; and BERTScore (Zhang et al.,
"BERTScore: Evaluating Text Generation with BERT", ICLR 2020) through the `bert-score` package with a model read
from a local directory (`bertscore`).

Boxes are (x1, y1, x2, y2) in pixels of the original image throughout.
"""

from __future__ import annotations

import collections
import json
import os
import re
import string
from collections.abc import Sequence

import numpy as np

from coordexp_jax.coord.boxes import pairwise_iou_exact
from coordexp_jax.errors import CoordExpError

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's 0.50:0.05:0.95 (linspace: no drift of arange's 0.05 steps)
AREA_RANGES = (("s", 0.0, 32.0 ** 2), ("m", 32.0 ** 2, 96.0 ** 2), ("l", 96.0 ** 2, float("inf")))  # COCO, px²


class BertScoreModelError(CoordExpError, ValueError):
    """The BERTScore model directory is missing or does not hold a transformers model and tokenizer."""


def _pairs(x, what: str) -> np.ndarray:
    """A query's pairs as float64 `[N, 2, 4]` ((person, object) boxes); None or [] -> `[0, 2, 4]`."""
    a = np.asarray([] if x is None else x, np.float64)
    if a.size == 0:
        return np.zeros((0, 2, 4))
    if a.ndim != 3 or a.shape[1:] != (2, 4):
        raise ValueError(f"{what} pairs must be [N, 2, 4] ((person, object) boxes, x1 y1 x2 y2), got shape "
                         f"{a.shape}")
    return a


def match_pairs(pred, gt, iou_threshold: float = 0.5) -> np.ndarray:
    """One query's greedy one-to-one matching of predicted to true (person, object) pairs.

    pred `[P, 2, 4]`, gt `[G, 2, 4]`: (person box, object box) per pair, pixels, (x1, y1, x2, y2).
    A (pred, gt) candidate needs person IoU >= t AND object IoU >= t (exact float64 IoU,
    `coord.boxes.pairwise_iou_exact`); candidates are taken in order of decreasing mean of the two IoUs (ties:
    lower pred index, then lower gt index) while neither side is taken. Returns `pred_to_gt [P]` int (-1 = none).
    """
    p, g = _pairs(pred, "predicted"), _pairs(gt, "true")
    out = np.full(len(p), -1, np.int64)
    if not len(p) or not len(g):
        return out
    iou_p = pairwise_iou_exact(p[:, 0], g[:, 0])
    iou_o = pairwise_iou_exact(p[:, 1], g[:, 1])
    ii, jj = np.nonzero((iou_p >= iou_threshold) & (iou_o >= iou_threshold))
    score = (iou_p[ii, jj] + iou_o[ii, jj]) / 2
    used_p, used_g = np.zeros(len(p), bool), np.zeros(len(g), bool)
    for k in np.lexsort((jj, ii, -score)):
        i, j = ii[k], jj[k]
        if not used_p[i] and not used_g[j]:
            out[i] = j
            used_p[i] = used_g[j] = True
    return out


def size_of(area: float) -> str:
    """COCO size class of an area in pixels²: 's' (< 32²), 'm' (32²..96²) or 'l' (>= 96²)."""
    for name, lo, hi in AREA_RANGES:
        if lo <= area < hi:
            return name
    raise ValueError(f"area {area} is not a finite non-negative number")


def grounding_recall(pred_pairs: Sequence, gt_pairs: Sequence, thresholds=IOU_THRESHOLDS) -> dict:
    """AR, AR@0.5, AR@0.75 and ARs / ARm / ARl of HOI grounding (the rules of the module docstring).

    pred_pairs[q] `[P_q, 2, 4]` and gt_pairs[q] `[G_q, 2, 4]`: the predicted and true (person, object) pairs of
    query q, pixels of the original image; a prediction may be None or empty (recall 0). Queries without a true
    pair are left out of the means. `thresholds`: the IoU thresholds AR averages (COCO's ten by default; AR@0.5
    and AR@0.75 are always computed).
    Returns {"AR", "AR@0.5", "AR@0.75", "ARs"/"ARm"/"ARl" (only the sizes that have true pairs), "num_queries"
    (queries with true pairs), "num_pairs" (true pairs)}; every AR is 0.0 when no query has a true pair.
    Raises ValueError when the two lists differ in length or a pair array is not [N, 2, 4].
    """
    if len(pred_pairs) != len(gt_pairs):
        raise ValueError(f"{len(pred_pairs)} predictions for {len(gt_pairs)} grounding queries")
    queries = [(_pairs(p, "predicted"), _pairs(g, "true")) for p, g in zip(pred_pairs, gt_pairs)]
    queries = [(p, g) for p, g in queries if len(g)]
    ts = [float(t) for t in thresholds]
    sizes = [size_of(float(np.clip(b[2] - b[0], 0, None) * np.clip(b[3] - b[1], 0, None)))
             for _, g in queries for b in g[:, 1]]
    count = collections.Counter(sizes)
    out = {"num_queries": len(queries), "num_pairs": len(sizes)}

    def at(t):
        """(mean per-query recall, matched pairs per size) at threshold t."""
        recalls, hit = [], collections.Counter()
        k = 0
        for p, g in queries:
            matched = np.zeros(len(g), bool)
            p2g = match_pairs(p, g, t)
            matched[p2g[p2g >= 0]] = True
            recalls.append(matched.mean())
            for m in matched:
                hit[sizes[k]] += int(m)
                k += 1
        return (float(np.mean(recalls)) if recalls else 0.0), hit

    per_t = [at(t) for t in ts]
    out["AR"] = float(np.mean([r for r, _ in per_t])) if per_t else 0.0
    out["AR@0.5"] = at(0.5)[0]
    out["AR@0.75"] = at(0.75)[0]
    for name, _, _ in AREA_RANGES:
        if count[name]:
            out[f"AR{name}"] = float(np.mean([hit[name] / count[name] for _, hit in per_t]))
    return out


# ------------------------------------------------------------------------------------------------------- referring
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1's answer normalisation (the official evaluation script's `normalize_answer`): lower case,
    punctuation removed, the articles a / an / the removed, whitespace collapsed to single spaces."""
    s = "".join(ch for ch in str(s).lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal (`normalize_answer`), else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: the normalised strings split on whitespace, overlap = the multiset intersection of the two
    token lists, precision = overlap / prediction tokens, recall = overlap / reference tokens, F1 their harmonic
    mean (0 without overlap; 1 when both are empty, as exact match would say)."""
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((collections.Counter(p) & collections.Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _refs(r) -> list[str]:
    refs = [r] if isinstance(r, str) else [str(x) for x in r]
    if not refs:
        raise ValueError("a referring query has no reference answer")
    return refs


def referring_scores(predictions: Sequence[str], references: Sequence) -> dict:
    """Exact match and token F1 of referring answers, each the best over the query's references (SQuAD's rule),
    averaged over the queries.

    predictions[q]: the answer text; references[q]: one reference string or a list of acceptable ones.
    Returns {"exact_match", "token_f1", "num"} (0.0 for no query). Raises ValueError when the lengths differ.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} referring queries")
    if not predictions:
        return {"exact_match": 0.0, "token_f1": 0.0, "num": 0}
    em = [max(exact_match(p, r) for r in _refs(rs)) for p, rs in zip(predictions, references)]
    f1 = [max(token_f1(p, r) for r in _refs(rs)) for p, rs in zip(predictions, references)]
    return {"exact_match": float(np.mean(em)), "token_f1": float(np.mean(f1)), "num": len(predictions)}


def check_bertscore_model(model_dir: str) -> int:
    """Checks a local BERTScore model directory and returns its number of layers (`num_hidden_layers` of its
    config.json; BERTScore then uses the last layer's token embeddings). Raises `BertScoreModelError` naming the
    directory when it is missing, has no config.json with `num_hidden_layers`, or no tokenizer files."""
    where = f"BERTScore model directory {model_dir!r}"
    if not model_dir or not os.path.isdir(model_dir):
        raise BertScoreModelError(f"{where}: not found (eval.bertscore_model must name a local directory with a "
                                  "transformers model and its tokenizer, e.g. one saved by save_pretrained)")
    cfg_path = os.path.join(model_dir, "config.json")
    try:
        with open(cfg_path) as f:
            n = json.load(f).get("num_hidden_layers")
    except (OSError, ValueError) as e:
        raise BertScoreModelError(f"{where}: no readable config.json ({type(e).__name__}); not a transformers "
                                  "model directory") from None
    if not isinstance(n, int) or n < 1:
        raise BertScoreModelError(f"{where}: config.json has no num_hidden_layers (not an encoder model BERTScore "
                                  "can use)")
    tok_files = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
    if not any(os.path.isfile(os.path.join(model_dir, t)) for t in tok_files):
        raise BertScoreModelError(f"{where}: no tokenizer files ({', '.join(tok_files)}); save the tokenizer "
                                  "with the model")
    return n


def bertscore(predictions: Sequence[str], references: Sequence, model_dir: str, *, num_layers: int | None = None,
              batch_size: int = 64, device: str = "cpu") -> dict:
    """BERTScore precision / recall / F1 (means over the queries) with the `bert-score` package and the model in
    the local directory `model_dir` (nothing is downloaded).

    references[q]: one string or a list (bert-score then keeps the best-matching reference per query). Scores
    are raw cosine-similarity BERTScores, not rescaled with a baseline (bert-score ships baselines only for its
    hub models), so they are comparable between runs of the same model, not with published rescaled figures.
    `num_layers`: the layer whose embeddings are compared (default: the last, `check_bertscore_model`).
    Returns {"P", "R", "F1", "num"}. Raises `BertScoreModelError` for a bad directory, ImportError naming the
    package when bert-score is not installed.
    """
    n_layers = check_bertscore_model(model_dir)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} referring queries")
    if not predictions:
        return {"P": 0.0, "R": 0.0, "F1": 0.0, "num": 0}
    try:
        from bert_score import BERTScorer
    except ImportError as e:
        raise ImportError("BERTScore needs the bert-score package: pip install bert-score==0.3.13") from e
    refs = [_refs(r) for r in references]
    refs = [r[0] for r in refs] if all(len(r) == 1 for r in refs) else refs
    try:
        scorer = BERTScorer(model_type=model_dir, num_layers=num_layers or n_layers, batch_size=batch_size,
                            device=device, lang=None, rescale_with_baseline=False)
    except (OSError, ValueError, KeyError) as e:  # no weights, an unknown architecture, a broken tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BertScoreModelError(f"BERTScore model directory {model_dir!r}: transformers cannot load it "
                                  f"({first[:200]})") from None
    tok = scorer._tokenizer  # a tokenizer saved without model_max_length says 1e30: bert-score would pass that on
    if tok.model_max_length > 1_000_000:
        with open(os.path.join(model_dir, "config.json")) as f:
            tok.model_max_length = int(json.load(f).get("max_position_embeddings", 512))
    P, R, F = scorer.score([str(p) for p in predictions], refs, verbose=False, batch_size=batch_size)
    return {"P": float(P.mean()), "R": float(R.mean()), "F1": float(F.mean()), "num": len(predictions)}
