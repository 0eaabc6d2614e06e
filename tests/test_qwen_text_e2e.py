"""`qwen_text` on a released-style, UNEXPANDED checkpoint: a tokenizer without any coordinate token and a tiny
Qwen3-VL HF directory with spare vocabulary rows after the tokenizer's ids (as Qwen3-VL's 151936 rows for 151669
ids). End to end: Stage-1 SFT through the training CLI, evaluation through the evaluation CLI, rollouts whose
parse gives the exact boxes; and the refusals (coordjson on that tokenizer, Stage-2 with qwen_text, coordinate
loss terms without coordinate tokens), each one line.

Independent references: `json` for the answer text (q / 1000 exactly), the tokenizer's own vocabulary lookups,
numpy for the pixel boxes.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coordexp_jax import evaluate as E
from coordexp_jax.coord import codec, protocols as P
from coordexp_jax.data import prompts, records, synthetic
from coordexp_jax.data import tokenizer as T
from coordexp_jax.data.image import ImageConfig
from coordexp_jax.rollout.constraints import protocol_constraint
from coordexp_jax.rollout.sampler import Rollout, Sampler, SamplerConfig
from coordexp_jax.train import build, config as C, optim, stage2
from coordexp_jax.train.config import ConfigError
from coordexp_jax.train.objective import Stage1Objective

SPARE = 42  # rows of the checkpoint after the tokenizer's ids (released checkpoints have such spare rows)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(tokenizer dir, HF checkpoint dir, tokenizer, ids): no coordinate tokens anywhere."""
    from coordexp_jax.model.config import ModelConfig
    from coordexp_jax.model.qwen3vl import Qwen3VL
    from coordexp_jax.weights.hf import save_hf_checkpoint

    root = tmp_path_factory.mktemp("released")
    tok_dir = str(root / "tok")
    T.build_small_tokenizer(tok_dir, with_coords=False)
    tok = T.load_tokenizer(tok_dir)
    ids = T.token_ids_from_tokenizer(tok, require_coords=False)
    mc = ModelConfig.preset("tiny").with_vocab_size(ids.vocab_size + SPARE)
    mc = mc.replace(image_token_id=ids.image_pad, video_token_id=ids.video_pad, vision_start_token_id=ids.vision_start,
                    vision_end_token_id=ids.vision_end)
    ck = str(root / "ck")
    save_hf_checkpoint(Qwen3VL(mc, rngs=nnx.Rngs(0)), mc, ck, tokenizer_dir=tok_dir)
    return tok_dir, ck, tok, ids


def test_tokenizer_without_coordinates(released):
    tok_dir, ck, tok, ids = released
    vocab = tok.get_vocab()
    assert not any(t.startswith("<|coord_") for t in vocab)  # really unexpanded
    assert ids.coord_start == ids.coord_wildcard == -1 and not ids.has_coords and ids.vocab_size == len(tok)
    for name, t in (("im_end", "<|im_end|>"), ("image_pad", "<|image_pad|>"), ("endoftext", "<|endoftext|>")):
        assert getattr(ids, name) == vocab[t]
    assert not ids.is_coord(np.arange(ids.vocab_size + SPARE)).any()  # no id is a bin (was: every id < 999)
    assert ids.coord_end == ids.coord_start  # the range [coord_start, coord_end) is empty
    with pytest.raises(ValueError, match="no coordinate tokens"):
        ids.coord_id(5)
    # required (coordjson, tags): one line naming the directory
    with pytest.raises(T.TokenizerError) as e:
        T.token_ids_from_tokenizer(T.load_tokenizer(ck))
    assert "\n" not in str(e.value) and ck in str(e.value) and "qwen_text" in str(e.value)
    # a tokenizer with only some of the coordinate tokens is refused in either mode
    part = T.load_tokenizer(tok_dir)
    part.add_tokens([T.plain_token(T.coord_token(k)) for k in range(10)])
    with pytest.raises(T.TokenizerError, match="only some coordinate tokens"):
        T.token_ids_from_tokenizer(part, require_coords=False)


def _cfg_file(tmp_path, released, **over) -> str:
    """A training config file: the released-style checkpoint, synthetic data, qwen_text, CE only, 3 steps."""
    tok_dir, ck, _, _ = released
    body = {"model.checkpoint": ck, "tokenizer.path": ck, "data.path": str(tmp_path / "syn"),
            "data.image_size": 64, "data.num_train": 16, "data.num_eval": 4, "data.max_objects": 3,
            "data.protocol": "qwen_text", "data.seq_len": 256, "data.batch_size": 4, "train.steps": 3,
            "train.log_every": 1, "train.ckpt_every": 100, "train.progress": False, "train.tensorboard": False,
            "train.async_checkpoint": False, "optim.lr": 1e-3, "eval.at_end": True, "eval.num_images": 4,
            "eval.batch_size": 4, "eval.max_new_tokens": 24, "eval.num_pictures": 1, "eval.use_ema": False}
    body.update(over)
    lines = ["from coordexp_jax.train.config import base_config", "", "", "def get_config():",
             "    c = base_config()", "    c.name = 'qwen_text_e2e'"]
    lines += [f"    c.{k} = {v!r}" for k, v in body.items()]
    lines += ["    return c", ""]
    path = tmp_path / "cfg.py"
    path.write_text("\n".join(lines))
    return str(path)


@pytest.fixture(scope="module")
def trained(released, tmp_path_factory):
    """Three Stage-1 steps through `python -m coordexp_jax.train` (in process) on the unexpanded checkpoint."""
    from coordexp_jax.train.__main__ import main

    d = tmp_path_factory.mktemp("run")
    cfg_path = _cfg_file(d, released)
    wd = str(d / "wd")
    assert main(["train", "--config", cfg_path, "--workdir", wd]) == 0
    return cfg_path, wd


def test_sft_steps_on_unexpanded_checkpoint(trained, released):
    cfg_path, wd = trained
    rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    # CE only: the loss is the text cross-entropy, finite, and no coordinate term was computed
    assert all(math.isfinite(r["loss"]) for r in train)
    assert not any(k.startswith(("coord_ce", "soft_ce", "w1", "gate", "l1", "giou")) for r in train for k in r)
    # every supervised answer token (the digits included) is a CE target: none is taken for a coordinate token.
    # The first batch again, from the same seeded pipeline: its answers are the records' qwen_text answers.
    cfg = C.validate(C.load_config_file(cfg_path))
    comps = build.build_components(cfg)
    batch = next(comps.data_iter)
    lm = np.asarray(batch["loss_mask"]) > 0
    assert not np.asarray(batch["coord_mask"]).any() and not np.asarray(batch["box_valid"]).any()
    assert train[0]["count/ce"] == lm.sum()
    tok, ids = released[2], released[3]
    for b in range(lm.shape[0]):
        tgt = np.asarray(batch["targets"])[b][lm[b]]
        assert tgt[-1] == ids.eos
        answer = json.loads(T.decode_ids(tok, tgt[:-1]))  # json: the written answer
        assert all(set(o) == {"bbox_2d", "label"} and all(0 <= q <= 1000 for q in o["bbox_2d"]) for o in answer)
    ev = [r for r in rows if r.get("kind") == "eval"]  # the evaluation at the end, during training
    assert len(ev) == 1 and "det/AP_constant" in ev[0] and not [k for k in ev[0] if k.endswith("_logprob")]
    # the exported model keeps the checkpoint's vocabulary (spare rows included) and records the protocol
    fm = os.path.join(wd, "final_model")
    assert json.load(open(os.path.join(fm, "preprocessing.json")))["protocol"] == "qwen_text"
    from coordexp_jax.weights.checkpoint import checkpoint_config

    assert checkpoint_config(fm).vocab_size == released[3].vocab_size + SPARE


def test_evaluate_cli_constant_score_only(trained, tmp_path):
    cfg_path, wd = trained
    out = str(tmp_path / "eval")
    assert E.main(["--config", cfg_path, "--checkpoint", wd, "--out", out]) == 0
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["num_records"] == 4
    for k in ("det/AP_constant", "det/AP50_constant", "det/AP75_constant", "det/f1@0.5", "det/parse_failure_rate"):
        assert k in m
    nums = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    assert all(math.isfinite(v) for v in nums.values()), nums
    # no coordinate tokens: neither expectation boxes nor log-prob scores
    assert not [k for k in m if k.startswith("det/exp_") or k.endswith("_logprob")]
    for line in open(os.path.join(out, "predictions.jsonl")):
        x = json.loads(line)
        assert "objects_expectation" not in x and all("score" not in o for o in x["objects"])


def test_coordjson_on_unexpanded_tokenizer_is_one_line(trained, released, tmp_path, capsys):
    from coordexp_jax.train.__main__ import main

    _, ck, _, _ = released
    cfg = C.validate(C.load_config_file(_cfg_file(tmp_path, released, **{"data.protocol": "coordjson"})))
    with pytest.raises(ConfigError) as e:
        build.token_ids(cfg)
    assert "\n" not in str(e.value) and ck in str(e.value) and "'tokenizer.path'" in str(e.value)
    # through the CLI: exit 2, one `error:` line naming the tokenizer directory
    rc = main(["train", "--config", _cfg_file(tmp_path, released, **{"data.protocol": "coordjson"}), "--workdir",
               str(tmp_path / "wd")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(err) == 1 and ck in err[0] and "coordinate tokens" in err[0]
    # evaluating the qwen_text-trained model under a coordjson config is refused the same way
    cfg_cj = _cfg_file(tmp_path, released, **{"data.protocol": "coordjson"})
    assert E.main(["--config", cfg_cj, "--checkpoint", trained[1], "--out", str(tmp_path / "e")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "coordinate tokens" in err[0]


def test_stage2_and_coordinate_losses_are_refused(released, tmp_path):
    cfg = C.validate(C.load_config_file(_cfg_file(tmp_path, released, **{"stage2.ratio": 0.5})))
    with pytest.raises(ConfigError, match=r"^config key 'stage2\.ratio' = 0\.5: .*'qwen_text'") as e:
        build.build_components(cfg)  # before anything is built
    assert "\n" not in str(e.value)
    cfg = C.validate(C.load_config_file(_cfg_file(tmp_path, released, **{"loss.soft_ce": 0.5, "loss.giou": 1.0})))
    with pytest.raises(ConfigError, match=r"^config key 'loss\.soft_ce' = 0\.5: .*loss\.soft_ce, loss\.giou to 0$"):
        Stage1Objective.from_config(cfg.loss, -1, 100)
    # with coordinate tokens the same loss config is accepted
    assert set(Stage1Objective.from_config(cfg.loss, 5, 2000).weights) == {"ce", "soft_ce", "giou"}


def test_no_coordinate_rows_in_the_optimizer():
    """LoRA freezes the vocabulary rows except the coordinate rows: without coordinate tokens no row may move (the
    old rule read coord_start -1 as rows [-1, 999))."""
    cfg = C.base_config()
    cfg.lora.enabled = True
    V, H = 1200, 4
    params = {"language_model": {"embed_tokens": {"embedding": jnp.ones((V, H))}}}
    tx, _ = optim.make_optimizer(cfg, params, 10, V, -1)
    upd, _ = tx.update(params, tx.init(params), params)
    assert float(jnp.abs(upd["language_model"]["embed_tokens"]["embedding"]).max()) == 0.0
    tx, _ = optim.make_optimizer(cfg, params, 10, V, 100)  # with coordinate tokens their rows do move
    upd, _ = tx.update(params, tx.init(params), params)
    moved = np.asarray(jnp.abs(upd["language_model"]["embed_tokens"]["embedding"]).max(-1) > 0)
    np.testing.assert_array_equal(np.nonzero(moved)[0], np.arange(100, 1100))


# ---------------------------------------------------------------------------------------------- rollouts
class ScriptedDecoder(nnx.Module):
    """Rollout-interface stand-in whose greedy output is `script [B, T]` (logit 8 on the scripted id, 0 elsewhere),
    over a vocabulary of `vocab` ids (smaller than 1000: a coordinate slice of 1000 logits cannot exist)."""

    def __init__(self, script, vocab: int):
        self.script = nnx.Variable(jnp.asarray(script, jnp.int32))
        self.vocab = vocab

    def _logits(self, t):
        script = self.script[...]
        tok = script[:, jnp.minimum(t, script.shape[1] - 1)]
        return jnp.where(jnp.arange(self.vocab)[None] == tok[:, None], 8.0, 0.0)

    def init_cache(self, batch_size, max_len):
        return {"t": jnp.zeros((), jnp.int32)}

    def prefill(self, input_ids, positions, attention_mask, vision=None, *, cache):
        return self._logits(0), {"t": jnp.ones((), jnp.int32)}

    def decode_step(self, tokens, positions, cache):
        return self._logits(cache["t"]), {"t": cache["t"] + 1}


def test_rollout_parses_to_exact_boxes(released):
    _, _, tok, ids = released
    boxes = [[(0.1234, 0.5, 0.6789, 0.9999)], [(0.0, 0.3333, 1.0, 0.6667), (0.25, 0.125, 0.5, 0.875)]]
    answers = [P.serialize([P.AnswerObject(f"red circle {i}", box=b) for i, b in enumerate(bs)], tok, ids,
                           "qwen_text", order="given").ids + [ids.eos] for bs in boxes]
    T_ = max(map(len, answers))
    script = np.full((2, T_), ids.pad, np.int32)
    for b, a in enumerate(answers):
        script[b, :len(a)] = a
    prompt = {"input_ids": np.full((2, 4), ids.im_start, np.int32), "attention_mask": np.ones((2, 4), np.int32),
              "positions": np.broadcast_to(np.arange(4), (3, 2, 4)).astype(np.int32)}
    model = ScriptedDecoder(script, ids.vocab_size)
    for constraint in (None, protocol_constraint("qwen_text", tok, ids, ids.vocab_size)):
        ro = Sampler(model, ids, SamplerConfig(max_new_tokens=T_ + 2), constraint=constraint,
                     vocab_size=ids.vocab_size).generate(prompt)
        assert np.isnan(ro.coord_expectation).all()  # no coordinate logits to take an expectation over
        # the model log-prob of the scripted id: 8 - log(e^8 + V - 1) (float32 log-softmax: ~1e-6 absolute)
        want_lp = 8.0 - np.log(np.exp(8.0) + ids.vocab_size - 1)
        for b, a in enumerate(answers):
            assert ro.row(b) == a and ro.finished[b]
            np.testing.assert_allclose(ro.logprobs[b, :len(a)], want_lp, atol=1e-5)
            res = P.parse(ro.row(b), tok, ids, "qwen_text")
            assert res.closed and not res.dropped
            q = [d["bbox_2d"] for d in json.loads(T.decode_ids(tok, a[:-1]))]  # json: the written integers
            np.testing.assert_array_equal(res.boxes(), np.asarray(q, np.float64) / 1000)  # exact, not bins / 999
            np.testing.assert_array_equal(np.asarray(q), np.round(np.asarray(boxes[b]) * 1000))


def test_qwen_text_constraint_forbids_coordinate_tokens():
    """On an expanded tokenizer the qwen_text constraint allows everything but the bins and the wildcard; every
    qwen_text answer is allowed."""
    tok = T.small_tokenizer()
    ids = T.token_ids_from_tokenizer(tok)
    dfa = protocol_constraint("qwen_text", tok, ids)
    coord = {tok.convert_tokens_to_ids(t) for t in T.coord_tokens()}
    np.testing.assert_array_equal(np.nonzero(~dfa.allowed[0])[0], sorted(coord))
    a = P.serialize([P.AnswerObject("blue star", box=(0.1, 0.2, 0.3, 0.4))], tok, ids, "qwen_text").ids
    assert dfa.accepts_prefix(a + [ids.eos]) and not dfa.accepts_prefix(a[:3] + [ids.coord_start + 7])
    with pytest.raises(ValueError, match="needs the coordinate tokens"):
        protocol_constraint("coordjson", tok, dataclasses_replace(ids, coord_start=-1, coord_wildcard=-1))


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_stage2_ground_truth_is_exact(released):
    """Stage-2 / GRPO read the ground truth back from the row's answer: q / 1000 as written for qwen_text."""
    _, _, tok, ids = released
    boxes = [(0.1234, 0.5, 0.6789, 0.9999), (0.001, 0.002, 0.998, 0.997)]
    s = P.serialize([P.AnswerObject(f"cat {i}", box=b) for i, b in enumerate(boxes)], tok, ids, "qwen_text",
                    order="given")
    prompt = [ids.im_start, 5, 6, ids.im_end]
    row = prompt + s.ids + [ids.eos]
    batch = {"input_ids": np.asarray([row]), "attention_mask": np.ones((1, len(row)), np.int32),
             "box_valid": np.zeros((1, 2), bool), "box_target": np.zeros((1, 2, 4), np.float32)}
    descs, gt = stage2._gt_objects(batch, 0, len(prompt), tok, ids, "qwen_text")
    assert descs == ["cat 0", "cat 1"]
    np.testing.assert_array_equal(gt, np.round(np.asarray(boxes) * 1000) / 1000)


# ------------------------------------------------------------------------------------------- evaluation
class ScriptedSampler:
    """Stands in for the Sampler: answers given as token ids; coordinate expectation NaN (no coordinate tokens)."""

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def generate(self, batch):
        B = batch["input_ids"].shape[0]
        rows = self.answers[self.calls:self.calls + B]
        self.calls += B
        T_ = max(len(r) for r in rows)
        tok = np.zeros((B, T_), np.int32)
        for b, r in enumerate(rows):
            tok[b, :len(r)] = r
        lp = np.full((B, T_), -0.1, np.float32)
        return Rollout(tokens=tok, logprobs=lp, sample_logprobs=lp, coord_expectation=np.full((B, T_), np.nan),
                       lengths=np.array([len(r) for r in rows], np.int32), finished=np.ones(B, bool))


def test_evaluate_records_uses_exact_boxes(released, tmp_path):
    _, _, tok, ids = released
    paths = synthetic.write_split(str(tmp_path), "val", 4, seed=5, cfg=synthetic.SyntheticConfig(image_size=(64, 64)))
    recs, _ = records.read_jsonl(paths["jsonl"])
    enc = prompts.SampleEncoder(prompts.PromptConfig(protocol="qwen_text",
                                                     image=ImageConfig(min_pixels=64 * 64, max_pixels=64 * 64)),
                                tokenizer=tok)
    assert enc.token_ids.coord_start == -1
    answers = [P.serialize([P.AnswerObject(o.desc, box=tuple(b)) for o, b in zip(r.objects, r.boxes())], tok, ids,
                           "qwen_text", order="given").ids + [ids.eos] for r in recs]
    m = E.evaluate_records(ScriptedSampler(answers), recs, enc, model_config=prompts.released_model_config(enc.cfg, ids),
                           config=E.EvalConfig(batch_size=2), out_dir=str(tmp_path / "out"), progress=False)
    # q = round(1000 c): IoU with the truth far above 0.95, so every threshold is met under the constant rule
    assert m["det/AP_constant"] == pytest.approx(1.0) and m["det/f1@0.5"] == 1.0
    assert not [k for k in m if k.startswith("det/exp_") or k.endswith("_logprob")]
    assert all(math.isfinite(v) for v in m.values() if isinstance(v, float))
    first = json.loads(open(tmp_path / "out" / "predictions.jsonl").readline())
    q = np.round(np.asarray([recs[0].boxes()[0]]) * 1000) / 1000  # the written box, q / 1000
    want = np.asarray(codec.norm_to_pixels(q, recs[0].width, recs[0].height, enc.cfg.pixel_mode))[0]
    # bbox is rounded to 3 decimals in the output: within 5e-4 px of q / 1000 in pixels (the k / 999 decode of
    # the nearest bin would be off by up to 0.5 / 999 of 64 px = 0.03 px)
    np.testing.assert_allclose(first["objects"][0]["bbox"], want, atol=5e-4 + 1e-9)


def test_predict_objects_and_protocol_choices(released):
    from coordexp_jax import predict

    _, _, tok, ids = released
    args = predict._parser().parse_args(["--checkpoint", "c", "--image", "i", "--out", "o", "--protocol", "qwen_text"])
    assert args.protocol == "qwen_text"
    a = P.serialize([P.AnswerObject("cat", box=(0.1234, 0.25, 0.5, 0.9876))], tok, ids, "qwen_text").ids
    parsed = P.parse(a + [ids.eos], tok, ids, "qwen_text")
    n = len(a) + 1
    objs = predict.objects_from_rollout(parsed, np.full(n, -0.1), np.full(n, np.nan), 200, 100, "continuous",
                                        coord_tokens=False)
    # pixels of q / 1000 (continuous: c * W), rounded to 2 decimals by the writer; no expectation box, no score
    assert objs == [{"desc": "cat", "bbox": [24.6, 25.0, 100.0, 98.8]}]
