"""Stage-2 target construction on hand-made rollouts, routing, and gradient isolation of false positives."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coordexp_jax.coord import codec, protocols
from coordexp_jax.data import prompts, records, synthetic
from coordexp_jax.data.image import ImageConfig
from coordexp_jax.data.tokenizer import decode_ids, small_tokenizer, token_ids_from_tokenizer
from coordexp_jax.rollout.sampler import Rollout
from coordexp_jax.train import stage2 as S2
from coordexp_jax.train.objective import Stage1Objective


def test_routing_is_deterministic_and_has_the_ratio():
    steps = [s for s in range(1000) if S2.is_rollout_step(s, 0.05)]
    assert len(steps) == 50 and steps[:3] == [19, 39, 59]
    assert all(S2.is_rollout_step(s, 1.0) for s in range(10))
    assert not any(S2.is_rollout_step(s, 0.0) for s in range(10))
    assert sum(S2.is_rollout_step(s, 1 / 3) for s in range(300)) == 100


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("syn"))
    cfg = synthetic.SyntheticConfig(image_size=(64, 64), min_objects=3, max_objects=3, clutter=0)
    recs, _ = records.read_jsonl(synthetic.write_split(d, "train", 3, seed=5, cfg=cfg)["jsonl"])
    tok = small_tokenizer()
    ids = token_ids_from_tokenizer(tok)
    pcfg = prompts.PromptConfig(image=ImageConfig(min_pixels=64 * 64, max_pixels=64 * 64), max_objects=6,
                                text_bucket=256)
    enc = prompts.SampleEncoder(pcfg, tokenizer=tok)
    batch = prompts.Collator(pcfg, ids, prompts.released_model_config(pcfg, ids))([enc(r) for r in recs])
    return recs, tok, ids, enc, batch


def _rollout(rows, T=160):
    B = len(rows)
    tok = np.zeros((B, T), np.int32)
    for b, r in enumerate(rows):
        tok[b, :len(r)] = r
    ids = token_ids_from_tokenizer(small_tokenizer())
    # A one-hot coordinate distribution's expectation is the emitted bin / 999 (NaN off coordinate tokens).
    coord = np.where(ids.is_coord(tok), (tok - ids.coord_start) / 999.0, np.nan).astype(np.float32)
    return Rollout(tokens=tok, logprobs=np.zeros((B, T), np.float32), sample_logprobs=np.zeros((B, T), np.float32),
                   coord_expectation=coord,
                   lengths=np.array([len(r) for r in rows], np.int32), finished=np.ones(B, bool))


def _gt(rec):
    order = protocols.object_order(codec.box_to_bins(rec.boxes()))
    return [(rec.objects[i].desc, rec.boxes()[i]) for i in order]


def test_left_padded_prompts_equal_the_prompt_encoder(setup):
    recs, tok, ids, enc, batch = setup
    lp = S2.left_padded_prompts(batch, ids.pad)
    ref = prompts.encode_prompts(recs, enc, model_config=prompts.released_model_config(enc.cfg, ids))
    L = lp["input_ids"].shape[1]
    for k in ("input_ids", "attention_mask", "visual_index"):
        np.testing.assert_array_equal(lp[k], ref[k][:, -L:])
    np.testing.assert_array_equal(lp["positions"], ref["positions"][:, :, -L:])
    np.testing.assert_array_equal(lp["rope_deltas"], ref["rope_deltas"])


def test_targets_from_a_hand_made_rollout(setup):
    recs, tok, ids, enc, batch = setup
    gt0 = _gt(recs[0])
    # Row 0: the second gt object missed (FN), the third emitted first with bins 3 off (matched), the first exact
    # (matched), and a false positive "star" in between.
    off = codec.box_to_bins(gt0[2][1]) + np.array([3, -3, 3, -3])
    objs = [protocols.AnswerObject(gt0[2][0], bins=tuple(int(v) for v in np.clip(off, 0, 999))),
            protocols.AnswerObject("star", box=(0.0, 0.0, 0.1, 0.1)),
            protocols.AnswerObject(gt0[0][0], box=tuple(gt0[0][1]))]
    row0 = protocols.serialize(objs, tok, ids, order="given").ids + [ids.eos]
    row1 = [ids.coord_start + 7] * 5 + [ids.eos]  # garbage: falls back to Stage-1
    row2 = protocols.serialize([protocols.AnswerObject(d, box=tuple(b)) for d, b in _gt(recs[2])], tok, ids).ids \
        + [ids.eos]
    new, m = S2.rollout_batch(batch, _rollout([row0, row1, row2]), tok, ids, S2.Stage2Config())
    assert m["stage2/fallback_malformed"] == 1 and m["stage2/parse_rate"] == pytest.approx(2 / 3)
    assert m["stage2/matched"] == pytest.approx((2 + 3) / 3) and m["stage2/fn"] == pytest.approx(1 / 3)
    assert m["stage2/fp"] == pytest.approx(1 / 3)

    # Row 1 is the untouched Stage-1 row.
    for k in ("input_ids", "targets", "loss_mask", "box_pos", "box_target", "box_valid", "positions"):
        np.testing.assert_array_equal(np.asarray(new[k])[..., 1, :] if k == "positions" else new[k][1],
                                      np.asarray(batch[k])[..., 1, :] if k == "positions" else batch[k][1])

    # Row 0: the answer is the rollout's objects in rollout order, then the FN appended, then the closing.
    P = int(S2.prompt_lengths(batch)[0])
    n = int(new["attention_mask"][0].sum())
    answer = decode_ids(tok, new["input_ids"][0, P:n])
    parsed = protocols.parse(list(new["input_ids"][0, P:n]), tok, ids)
    assert parsed.descs() == [gt0[2][0], "star", gt0[0][0], gt0[1][0]], answer
    assert answer.endswith("]}<|im_end|>")
    np.testing.assert_array_equal(new["input_ids"][0, :P], batch["input_ids"][0, :P])
    # Inputs at the matched object's coordinates are the emitted bins; its targets are the ground-truth bins.
    pos0 = P + parsed.objects[0].positions
    np.testing.assert_array_equal(new["input_ids"][0, pos0] - ids.coord_start, np.clip(off, 0, 999))
    np.testing.assert_array_equal(new["targets"][0, pos0 - 1] - ids.coord_start, codec.box_to_bins(gt0[2][1]))
    # The false positive (and the separator that opened it) carries no loss; everything else does.
    fp = parsed.objects[1].positions
    lm = new["loss_mask"][0]
    assert lm[P + fp - 1].sum() == 0
    assert lm[P + parsed.objects[0].positions - 1].all() and lm[P + parsed.objects[2].positions - 1].all()
    sup = np.where(lm > 0)[0]
    assert sup[-1] == n - 2  # the position predicting <|im_end|>
    assert new["targets"][0, n - 2] == ids.eos
    # Box slots: the two matched (at rollout coordinates, gt boxes) and the FN (its appended coordinates).
    assert new["box_valid"][0].sum() == 3
    np.testing.assert_array_equal(new["box_pos"][0, 0], pos0 - 1)
    # normalised boxes in [0, 1] stored as float32: within half an ulp (6e-8); atol 1e-6 of the unit range
    np.testing.assert_allclose(new["box_target"][0, 0], gt0[2][1], atol=1e-6)
    np.testing.assert_array_equal(new["box_pos"][0, 2], P + parsed.objects[3].positions - 1)
    np.testing.assert_allclose(new["box_target"][0, 2], gt0[1][1], atol=1e-6)
    # M-RoPE positions of the new answer continue the prompt's text positions.
    d = int(batch["rope_deltas"][0])
    np.testing.assert_array_equal(new["positions"][:, 0, P:n], np.broadcast_to(np.arange(P, n) + d, (3, n - P)))
    assert (new["coord_mask"][0] == (ids.is_coord(new["targets"][0]) & (lm > 0))).all()

    # Row 2 (a perfect rollout) equals its Stage-1 row.
    for k in ("input_ids", "targets", "loss_mask", "box_pos", "box_valid"):
        np.testing.assert_array_equal(new[k][2], batch[k][2])
    np.testing.assert_allclose(new["box_target"][2], batch["box_target"][2], atol=1e-6)  # [0, 1], as above


class _FreeHidden:
    """A 'model' whose hidden states are a free array (to perturb single positions) over a fixed output matrix."""

    def __init__(self, hidden, emb):
        self.hidden, self.emb = hidden, emb

    def __call__(self, *a, **k):
        return self.hidden

    def lm_logits(self, h):
        return h @ self.emb.T

    def coord_logits(self, h, coord_start, num_bins=1000):
        return h @ self.emb[coord_start:coord_start + num_bins].T


def test_false_positive_span_gets_no_gradient(setup):
    recs, tok, ids, enc, batch = setup
    gt0 = _gt(recs[0])
    objs = [protocols.AnswerObject(gt0[0][0], box=tuple(gt0[0][1])),
            protocols.AnswerObject("star", box=(0.5, 0.5, 0.6, 0.6)),
            protocols.AnswerObject(gt0[1][0], box=tuple(gt0[1][1])),
            protocols.AnswerObject(gt0[2][0], box=tuple(gt0[2][1]))]
    row0 = protocols.serialize(objs, tok, ids, order="given").ids + [ids.eos]
    new, _ = S2.rollout_batch(batch, _rollout([row0, [ids.eos], [ids.eos]]), tok, ids, S2.Stage2Config())
    weights = {"ce": 1.0, "coord_ce": 1.0, "soft_ce": 1.0, "w1": 1.0, "gate": 1.0, "text_gate": 1.0, "l1": 1.0,
               "giou": 1.0}
    obj = Stage1Objective(weights=weights, coord_start=ids.coord_start, vocab_size=ids.vocab_size)
    B, S = new["input_ids"].shape
    rng = np.random.default_rng(0)
    emb = jnp.asarray(rng.normal(size=(ids.vocab_size, 16)), jnp.float32)
    hidden = jnp.asarray(rng.normal(size=(B, S, 16)), jnp.float32)
    jb = {k: jnp.asarray(v) for k, v in new.items()}
    grad = jax.grad(lambda h: sum(obj.sums(_FreeHidden(h, emb), jb).values()))(hidden)
    g = np.abs(np.asarray(grad[0])).sum(-1)
    P = int(S2.prompt_lengths(batch)[0])
    n = int(new["attention_mask"][0].sum())
    s = protocols.serialize(objs, tok, ids, order="given")
    fp_positions = np.arange(P + s.spans[0, 1], P + s.spans[1, 1]) - 1  # separator + the FP object's tokens
    assert np.all(g[fp_positions] == 0.0)
    assert np.all(g[P - 1:n - 1][np.isin(np.arange(P - 1, n - 1), fp_positions, invert=True)] > 0)


def test_loop_routes_rollout_steps_and_compiles_once(tmp_path):
    """The real loop with stage2.ratio 0.5 on the tiny Qwen3-VL: Stage-2 metrics are logged on exactly the routed
    steps, the train step compiles once for both kinds of step, the losses stay finite, and the detection evaluation at
    the end writes its metrics and pictures."""
    from coordexp_jax.train import config as C, loop

    cfg = C.base_config()
    cfg.data.path = str(tmp_path / "syn")
    cfg.data.num_train, cfg.data.num_eval, cfg.data.batch_size, cfg.data.max_objects = 8, 2, 2, 4
    cfg.data.image_size = 64
    cfg.loss.l1, cfg.loss.giou, cfg.loss.soft_ce = 1.0, 1.0, 0.5
    cfg.train.steps, cfg.train.log_every, cfg.train.ckpt_every = 4, 1, 0
    cfg.train.progress = cfg.train.tensorboard = cfg.train.async_checkpoint = False
    cfg.eval.num_images, cfg.eval.max_new_tokens, cfg.eval.num_pictures = 2, 48, 2
    cfg.stage2.ratio = 0.5
    cfg.stage2.max_new_tokens = 48
    res = loop.train(C.validate(cfg), str(tmp_path / "run"))
    assert res["compiles"] == 1 and res["step"] == 4
    # The end-of-run detection evaluation (eval.kind 'detection'): metrics logged, pictures and page written.
    ev = loop.read_metrics(str(tmp_path / "run"), kind="eval")[4]
    assert {"det/AP50_logprob", "det/f1@0.5", "det/parse_failure_rate", "minutes"} <= set(ev)
    assert len(os.listdir(tmp_path / "run" / "eval" / "step_4" / "pictures")) == 2
    assert os.path.exists(tmp_path / "run" / "eval" / "step_4" / "index.html")
    s2 = loop.read_metrics(str(tmp_path / "run"), kind="stage2")
    assert sorted(s2) == [s + 1 for s in range(4) if S2.is_rollout_step(s, 0.5)] == [2, 4]
    for m in s2.values():
        assert 0.0 <= m["stage2/parse_rate"] <= 1.0 and m["stage2/rollout_s"] > 0
    train = loop.read_metrics(str(tmp_path / "run"))
    assert all(np.isfinite(train[s]["loss"]) for s in range(1, 5))


def test_match_rows_equals_per_row_matching():
    from coordexp_jax.coord import matching

    rng = np.random.default_rng(0)
    rows = []
    for n, m in [(0, 2), (3, 0), (1, 1), (5, 3), (2, 6)]:
        g = rng.uniform(0, 0.6, (m, 2))
        gt = np.concatenate([g, g + rng.uniform(0.1, 0.4, (m, 2))], 1)
        p = rng.uniform(0, 0.6, (n, 2))
        pred = np.concatenate([p, p + rng.uniform(0.1, 0.4, (n, 2))], 1)
        if n and m:
            pred[0] = gt[0] + 0.01
        rows.append(([str(x) for x in rng.choice(["a", "b"], n)], pred, [str(x) for x in rng.choice(["a", "b"], m)], gt))
    cfg = S2.Stage2Config()
    got = S2.match_rows(rows, cfg)
    for (pd, pb, gd, gb), p2g in zip(rows, got):
        want = np.full(len(pd), -1)
        if len(pd) and len(gd):
            want = np.asarray(matching.match(pb, gb, desc_cost=matching.desc_mismatch(pd, gd), desc_weight=cfg.desc_weight,
                                             iou_threshold=cfg.iou_threshold).pred_to_gt)
        np.testing.assert_array_equal(p2g, want)


def test_false_positives_are_dropped_to_fit_the_row(setup):
    recs, tok, ids, enc, batch = setup
    gt0 = _gt(recs[0])
    fps = [protocols.AnswerObject("star", box=(0.05 * i, 0.9, 0.05 * i + 0.04, 0.95)) for i in range(6)]
    objs = [protocols.AnswerObject(d, box=tuple(b)) for d, b in gt0] + fps
    row0 = protocols.serialize(objs, tok, ids, order="given").ids + [ids.eos]
    assert S2.prompt_lengths(batch)[0] + len(row0) > batch["input_ids"].shape[1]  # would not fit as it is
    new, m = S2.rollout_batch(batch, _rollout([row0, [ids.eos], [ids.eos]], T=320), tok, ids, S2.Stage2Config())
    assert m["stage2/fallback_too_long"] == 0 and m["stage2/fp_dropped_to_fit"] >= 1
    P = int(S2.prompt_lengths(batch)[0])
    n = int(new["attention_mask"][0].sum())
    kept = protocols.parse(list(new["input_ids"][0, P:n]), tok, ids).descs()
    assert kept[:3] == [d for d, _ in gt0] and 0 < len(kept) - 3 < 6 and set(kept[3:]) == {"star"}
