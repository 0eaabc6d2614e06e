"""HOI metrics against independent references: a brute-force grounding AR (scalar IoU, "take the best remaining
candidate" loop, sizes counted by hand), SQuAD token F1 worked by hand, and BERTScore recomputed from a tiny BERT's
hidden states with torch (the paper's greedy cosine matching)."""
import itertools
import json
import os

import numpy as np
import pytest

from coordexp_jax import metrics_hoi as H


# ------------------------------------------------------------------------------------------------ grounding AR
def _iou(a, b):
    """Scalar IoU written from the definition (no shared code with coord.boxes)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _brute_matched(pred, gt, t):
    """Set of matched gt indices: repeatedly take the eligible (both IoUs >= t), untaken candidate with the highest
    mean IoU (ties: lowest pred, then lowest gt index)."""
    cands = {}
    for i, p in enumerate(pred):
        for j, g in enumerate(gt):
            ip, io = _iou(p[0], g[0]), _iou(p[1], g[1])
            if ip >= t and io >= t:
                cands[(i, j)] = (ip + io) / 2
    taken_p, taken_g = set(), set()
    while True:
        ok = [(-v, i, j) for (i, j), v in cands.items() if i not in taken_p and j not in taken_g]
        if not ok:
            return taken_g
        _, i, j = min(ok)
        taken_p.add(i)
        taken_g.add(j)


def _brute_ar(preds, gts):
    ts = [0.5 + 0.05 * k for k in range(10)]
    qs = [(p, g) for p, g in zip(preds, gts) if len(g)]

    def mean_recall(t):
        return float(np.mean([len(_brute_matched(p, g, t)) / len(g) for p, g in qs])) if qs else 0.0

    out = {"AR": float(np.mean([mean_recall(t) for t in ts])), "AR@0.5": mean_recall(0.5),
           "AR@0.75": mean_recall(0.75)}
    for name, lo, hi in (("s", 0, 1024), ("m", 1024, 9216), ("l", 9216, 1e18)):
        members = [(qi, j) for qi, (_, g) in enumerate(qs) for j, b in enumerate(g)
                   if lo <= (b[1][2] - b[1][0]) * (b[1][3] - b[1][1]) < hi]
        if members:
            rec = []
            for t in ts:
                hit = {(qi, j) for qi, (p, g) in enumerate(qs) for j in _brute_matched(p, g, t)}
                rec.append(sum((m in hit) for m in members) / len(members))
            out[f"AR{name}"] = float(np.mean(rec))
    return out


def _box(rng, lo, hi):
    w, h = rng.uniform(lo, hi, 2)
    x, y = rng.uniform(0, 300, 2)
    return [x, y, x + w, y + h]


def _jitter(rng, b, s):
    return [v + rng.normal(0, s) for v in b]


def _random_queries(rng, n=12):
    preds, gts = [], []
    for _ in range(n):
        g = [[_box(rng, 10, 160), _box(rng, 5, 160)] for _ in range(rng.integers(0, 4))]
        p = [[_jitter(rng, a, rng.uniform(0, 12)), _jitter(rng, b, rng.uniform(0, 12))] for a, b in g
             if rng.random() < 0.8]
        p += [[_box(rng, 10, 160), _box(rng, 5, 160)] for _ in range(rng.integers(0, 3))]  # spurious pairs
        if len(g) > 1 and rng.random() < 0.5:  # a pair mixing two true pairs' boxes: must not match either
            p.append([g[0][0], g[1][1]])
        rng.shuffle(p)
        preds.append(p)
        gts.append(g)
    return preds, gts


@pytest.mark.parametrize("seed", range(6))
def test_grounding_recall_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    preds, gts = _random_queries(rng)
    got = H.grounding_recall(preds, gts)
    want = _brute_ar(preds, gts)
    # the same decisions on the same float64 IoUs: equal up to the order of summing <= 10 recalls in [0, 1]
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    assert set(got) - {"num_queries", "num_pairs"} == set(want)
    assert got["num_pairs"] == sum(len(g) for g in gts)


def test_pair_needs_both_boxes():
    person, obj = [0, 0, 100, 100], [200, 200, 240, 240]
    gt = [[person, obj]]
    only_person = [[person, [0, 0, 10, 10]]]
    only_object = [[[300, 300, 310, 310], obj]]
    assert H.grounding_recall([only_person], [gt])["AR@0.5"] == 0.0
    assert H.grounding_recall([only_object], [gt])["AR@0.5"] == 0.0
    # swapped roles: the person box is compared with the true person box only
    assert H.grounding_recall([[[obj, person]]], [gt])["AR@0.5"] == 0.0
    assert H.grounding_recall([[[person, obj]]], [gt])["AR"] == 1.0


def test_recall_per_threshold_by_hand():
    # object IoU exactly 0.6 (60x100 inside 100x100): counted at 0.50, 0.55, 0.60 (>=; linspace's 0.6 is the
    # double nearest 0.6, as 60 / 100 is), not at 0.65 .. 0.95
    gt = [[[0, 0, 100, 100], [0, 0, 100, 100]]]
    pred = [[[0, 0, 100, 100], [0, 0, 60, 100]]]
    m = H.grounding_recall([pred], [gt])
    assert m["AR@0.5"] == 1.0 and m["AR@0.75"] == 0.0
    assert m["AR"] == pytest.approx(0.3, abs=1e-15)  # 3 of 10 thresholds; mean of ten 0/1 values
    assert m["ARl"] == pytest.approx(0.3, abs=1e-15) and "ARs" not in m and "ARm" not in m


def test_one_to_one_and_query_mean():
    a = [[0, 0, 50, 50], [60, 0, 110, 50]]
    b = [[0, 100, 50, 150], [60, 100, 110, 150]]
    # query 1: one prediction for two identical-looking true pairs -> recall 1/2; query 2: 1/1; a query without
    # true pairs is left out: AR@0.5 = (0.5 + 1) / 2
    m = H.grounding_recall([[a], [b], [a]], [[a, a], [b], []])
    assert m["AR@0.5"] == 0.75 and m["num_queries"] == 2 and m["num_pairs"] == 3
    # sizes pooled over pairs by the OBJECT box (50x50 = 2500 px²: medium): 2 of 3 pairs matched
    assert m["ARm"] == pytest.approx(2 / 3, abs=1e-15)


def test_greedy_prefers_higher_mean_iou():
    g = [[[0, 0, 100, 100], [0, 0, 100, 100]], [[10, 0, 110, 100], [10, 0, 110, 100]]]
    p = [[[5, 0, 105, 100], [5, 0, 105, 100]]]  # IoU 0.905 with both true pairs: equal -> the lower gt index
    assert list(H.match_pairs(p, g, 0.5)) == [0]
    p = [[[9, 0, 109, 100], [9, 0, 109, 100]], [[0, 0, 100, 100], [0, 0, 100, 100]]]
    assert list(H.match_pairs(p, g, 0.5)) == [1, 0]


def test_greedy_never_beats_maximum_matching():
    """Greedy recall <= the largest one-to-one matching (brute force over all assignments)."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        preds, gts = _random_queries(rng, 1)
        p, g = preds[0], gts[0]
        if not g:
            continue
        ok = [[_iou(a[0], b[0]) >= 0.5 and _iou(a[1], b[1]) >= 0.5 for b in g] for a in p]
        best = 0
        for perm in itertools.permutations(range(max(len(p), len(g))), len(g)):
            best = max(best, sum(1 for j, i in enumerate(perm) if i < len(p) and ok[i][j]))
        assert (H.match_pairs(p, g, 0.5) >= 0).sum() <= best


def test_grounding_errors_and_empty():
    assert H.grounding_recall([], [])["AR"] == 0.0
    assert H.grounding_recall([None], [[[[0, 0, 1, 1], [0, 0, 1, 1]]]])["AR"] == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1"):
        H.grounding_recall([[], []], [[]])
    with pytest.raises(ValueError, match=r"\[N, 2, 4\]"):
        H.grounding_recall([[[0, 0, 1, 1]]], [[[[0, 0, 1, 1], [0, 0, 1, 1]]]])


def test_size_classes_are_coco_ranges():
    assert [H.size_of(a) for a in (0, 1023.9, 1024, 9215.9, 9216, 1e9)] == ["s", "s", "m", "m", "l", "l"]


# ------------------------------------------------------------------------------------------------ referring
def test_squad_normalisation_and_f1_by_hand():
    assert H.normalize_answer("  The Riding,   a HORSE! ") == "riding horse"
    assert H.exact_match("Riding the horse.", "riding horse") == 1.0
    assert H.exact_match("riding", "riding horse") == 0.0
    # prediction "riding horse fast", reference "riding horse": overlap 2, P 2/3, R 1, F1 0.8
    assert H.token_f1("riding horse fast", "riding horse") == pytest.approx(0.8, abs=1e-15)
    # multiset overlap: "ball ball kick" vs "kick ball": overlap {ball: 1, kick: 1} = 2, P 2/3, R 1
    assert H.token_f1("ball ball kick", "kick ball") == pytest.approx(0.8, abs=1e-15)
    assert H.token_f1("the", "a") == 1.0  # both empty after normalisation
    assert H.token_f1("", "riding") == 0.0


def test_referring_scores_best_reference_and_mean():
    m = H.referring_scores(["riding a bicycle", "holding cup", "kicking"],
                           [["straddling bicycle", "riding bicycle"], "holding a cup", "kicking ball"])
    assert m["exact_match"] == pytest.approx(2 / 3, abs=1e-15)
    assert m["token_f1"] == pytest.approx((1 + 1 + 2 / 3) / 3, abs=1e-15)  # kicking vs kicking ball: P 1, R 1/2
    assert H.referring_scores([], []) == {"exact_match": 0.0, "token_f1": 0.0, "num": 0}
    with pytest.raises(ValueError, match="1 predictions for 2"):
        H.referring_scores(["a"], ["a", "b"])


# ------------------------------------------------------------------------------------------------ BERTScore
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "riding", "holding", "kicking", "looking", "at", "horse",
         "ball", "cup", "bicycle", "person", "straddling"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT with random weights and a 16-word vocabulary, saved to a tmp dir (no hub)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("bert_score")
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = str(tmp_path_factory.mktemp("tiny_bert"))
    BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}, model_max_length=64).save_pretrained(d)
    torch.manual_seed(0)
    # initializer_range 0.5: the 32-wide random model's token states then differ clearly between words
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.5)
    BertModel(cfg).save_pretrained(d)
    return d


def _reference_bertscore(model_dir, cands, refs):
    """BERTScore by its definition (Zhang et al. 2020, eq. 1-3, no idf, no rescaling) as bert-score 0.3.13 applies
    it: last-layer token states, L2-normalised; R = mean over the reference's word tokens (not [CLS]/[SEP]) of the
    best cosine with any candidate token ([CLS]/[SEP] included: the package's max runs over the whole padded
    row), P the other way round, F = 2PR / (P + R)."""
    import torch
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BertModel.from_pretrained(model_dir).eval()

    def states(text):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0].double()
        return h / h.norm(dim=-1, keepdim=True)

    out = []
    for c, r in zip(cands, refs):
        sim = states(c) @ states(r).T  # [candidate tokens, reference tokens], [CLS] first, [SEP] last
        p, rr = sim[1:-1].max(1).values.mean().item(), sim[:, 1:-1].max(0).values.mean().item()
        out.append((p, rr, 2 * p * rr / (p + rr)))
    return np.array(out)


def test_bertscore_against_definition(tiny_bert):
    cands = ["riding horse", "holding cup", "kicking ball at person", "looking at bicycle"]
    refs = ["riding horse", "kicking ball", "kicking ball", "straddling bicycle"]
    got = H.bertscore(cands, refs, tiny_bert)
    want = _reference_bertscore(tiny_bert, cands, refs).mean(0)
    # float32 cosines of unit vectors (bert-score) vs float64 (reference): |error| ~1e-7 per cosine on any x86 CPU
    assert [got["P"], got["R"], got["F1"]] == pytest.approx(list(want), abs=1e-5)
    assert got["num"] == 4
    assert H.bertscore(["riding horse"], ["riding horse"], tiny_bert)["F1"] == pytest.approx(1.0, abs=1e-5)
    # several references: bert-score keeps the best one per query
    multi = H.bertscore(["riding horse"], [["kicking ball", "riding horse"]], tiny_bert)
    assert multi["F1"] == pytest.approx(1.0, abs=1e-5)


def test_bertscore_bad_directory_is_one_line(tmp_path, tiny_bert):
    with pytest.raises(H.BertScoreModelError, match="not found") as e:
        H.bertscore(["a"], ["a"], str(tmp_path / "missing"))
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(H.BertScoreModelError, match="config.json"):
        H.bertscore(["a"], ["a"], str(tmp_path / "empty"))
    bad = tmp_path / "noweights"
    bad.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # everything but the weights
        if os.path.exists(os.path.join(tiny_bert, f)):
            (bad / f).write_bytes(open(os.path.join(tiny_bert, f), "rb").read())
    with pytest.raises(H.BertScoreModelError, match="cannot load") as e:
        H.bertscore(["a"], ["a"], str(bad))
    assert "\n" not in str(e.value)
    (tmp_path / "nolayers").mkdir()
    (tmp_path / "nolayers" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(H.BertScoreModelError, match="num_hidden_layers"):
        H.check_bertscore_model(str(tmp_path / "nolayers"))
