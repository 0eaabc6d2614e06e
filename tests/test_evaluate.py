"""The evaluation glue (prompts -> rollout -> parse -> pixels -> metrics -> files) with a scripted sampler:
answers serialised from the ground truth must score AP 1; known corruptions lower exactly what they should."""
import json
import os

import numpy as np
import pytest

from coordexp_jax import evaluate as E
from coordexp_jax.coord import protocols
from coordexp_jax.data import prompts, records, synthetic
from coordexp_jax.data.image import ImageConfig
from coordexp_jax.data.tokenizer import small_tokenizer, token_ids_from_tokenizer
from coordexp_jax.rollout.sampler import Rollout


class ScriptedSampler:
    """Stands in for rollout.sampler.Sampler: emits pre-made answers (token ids) with given log-probs."""

    def __init__(self, answers, logprob=-0.1):
        self.answers, self.logprob, self.calls = answers, logprob, 0

    def generate(self, batch):
        B = batch["input_ids"].shape[0]
        rows = [self.answers[self.calls + b] for b in range(B)]
        self.calls += B
        T = max(len(r) for r in rows)
        tok = np.zeros((B, T), np.int32)
        lp = np.zeros((B, T), np.float32)
        for b, r in enumerate(rows):
            tok[b, :len(r)] = r
            lp[b, :len(r)] = self.logprob
        return Rollout(tokens=tok, logprobs=lp, sample_logprobs=lp, coord_expectation=np.full((B, T), np.nan),
                       lengths=np.array([len(r) for r in rows], np.int32), finished=np.ones(B, bool))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("syn"))
    paths = synthetic.write_split(d, "val", 6, seed=3, cfg=synthetic.SyntheticConfig(image_size=(64, 64)))
    recs, _ = records.read_jsonl(paths["jsonl"])
    tok = small_tokenizer()
    ids = token_ids_from_tokenizer(tok)
    enc = prompts.SampleEncoder(prompts.PromptConfig(image=ImageConfig(min_pixels=64 * 64, max_pixels=64 * 64)),
                                tokenizer=tok)
    return recs, tok, ids, enc, prompts.released_model_config(enc.cfg, ids)


def _answer(rec, tok, ids, boxes=None):
    objs = [protocols.AnswerObject(o.desc, box=tuple(b)) for o, b in
            zip(rec.objects, rec.boxes() if boxes is None else boxes)]
    return protocols.serialize(objs, tok, ids).ids + [ids.eos]


def test_perfect_answers_score_one_and_files_are_written(setup, tmp_path):
    recs, tok, ids, enc, mc = setup
    sampler = ScriptedSampler([_answer(r, tok, ids) for r in recs])
    m = E.evaluate_records(sampler, recs, enc, model_config=mc, config=E.EvalConfig(batch_size=4), out_dir=str(tmp_path),
                           progress=False)
    # Bins quantise to 1/999 of the side: IoU stays far above 0.95, so every threshold is met.
    assert m["det/AP_constant"] == pytest.approx(1.0) and m["det/AP_logprob"] == pytest.approx(1.0)
    assert m["det/f1@0.5"] == 1.0 and m["det/parse_failure_rate"] == 0.0 and m["det/duplicate_rate"] == 0.0
    assert m["num_records"] == len(recs)
    lines = [json.loads(x) for x in open(tmp_path / "predictions.jsonl")]
    assert len(lines) == len(recs)
    got = np.array(lines[0]["objects"][0]["bbox"])
    # Each predicted box is within half a bin of a ground-truth box, in pixels of the original image.
    gt = recs[0].boxes_px()
    assert np.min(np.abs(gt - got).max(1)) <= 0.5 * 64 / 999 + 1e-6
    assert lines[0]["objects"][0]["score"] == pytest.approx(np.exp(-0.1), rel=1e-5)
    assert json.load(open(tmp_path / "metrics.json"))["det/AP_logprob"] == pytest.approx(1.0)
    assert os.path.exists(tmp_path / "index.html") and os.listdir(tmp_path / "pictures")


def test_corrupted_answers(setup):
    recs, tok, ids, enc, mc = setup
    answers = [_answer(r, tok, ids) for r in recs]
    answers[0] = answers[0][: len(answers[0]) // 2]  # truncated: parses partially or fails
    answers[1] = [ids.coord_start + 5] * 7 + [ids.eos]  # garbage
    shifted = recs[2].boxes() + np.array([0.5, 0.0, 0.5, 0.0])  # pushed half an image to the right
    answers[2] = _answer(recs[2], tok, ids, np.clip(shifted, 0, 1))
    m = E.evaluate_records(ScriptedSampler(answers), recs, enc, model_config=mc, config=E.EvalConfig(batch_size=3), progress=False)
    assert m["det/parse_failure_rate"] == pytest.approx(1 / len(recs))  # only the garbage one yields nothing
    assert 0.0 < m["det/AP50_constant"] < 1.0
    assert m["det/recall@0.5"] < 1.0


def test_cli_bad_inputs(tmp_path, capsys):
    assert E.main(["--config", str(tmp_path / "nope.py"), "--checkpoint", str(tmp_path), "--out",
                   str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # one line naming the flag and the file
    assert len(err) == 1 and err[0].startswith("error: --config ") and "nope.py: file not found" in err[0], err
    assert E.main(["--config", "configs/demo.py", "--checkpoint", str(tmp_path / "missing"), "--out",
                   str(tmp_path / "o")]) == 2
    assert "error: --checkpoint " in (err := capsys.readouterr().err) and "missing: directory not found" in err
