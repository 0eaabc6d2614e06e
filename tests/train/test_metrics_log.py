"""The loggers beside metrics.jsonl (train/metrics_log.py): TensorBoard tags valid for every name the evaluator
produces, the evaluation pictures as TensorBoard images, Weights & Biases in offline mode (its run file read back:
metrics, config, captioned pictures, a resumed run), nothing imported or written without W&B, and one error line
when W&B is configured but not installed.

W&B runs offline with no network: WANDB_MODE=offline, WANDB_SILENT=true, WANDB_DIR in the test's tmp folder. The
offline run is read from its `run-<id>.wandb` file, W&B's transaction log (a leveldb-style log of
`wandb_internal_pb2.Record` protobufs; wandb 0.31 no longer ships its Python reader, the former
wandb/sdk/internal/datastore.py, and its wandb-core writes the same format); `wandb.Api` reads only runs on a
server."""

import dataclasses
import glob
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from coordexp_jax.errors import CoordExpError
from coordexp_jax.train import config as C, loop, metrics_log as ML

from standin import components, loop_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

wandb = pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_default"))
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no stdout/stderr capture (pytest owns them)


# ----------------------------------------------------------------------------------------- readers of the logs


def _read_wandb_records(path: str):
    """Every `Record` of a `.wandb` file: a 7-byte header (':W&B', magic 0xBEE1, version 0), then 32 KiB blocks
    of chunks (crc32 of type+data: uint32, length: uint16, type: uint8 FULL=1/FIRST=2/MIDDLE=3/LAST=4, data);
    a block tail shorter than a chunk header is zero padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + n > len(data):  # a chunk still being written
            break
        chunk = data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind == 0 and n == 0:  # preallocated, unwritten tail
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, "corrupt .wandb chunk"
        buf += chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            out.append(r)
            buf = b""
    return out


def _wandb_run(run_dir: str, timeout_s: float = 60.0) -> dict:
    """{'run': RunRecord, 'history': [{key: value}], 'summary': {key: value}} of one offline run directory.
    `run.finish()` returns before wandb-core has written the file out: wait (up to `timeout_s`) for its `exit`
    record."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    t0 = time.time()
    while True:
        records = _read_wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.time() - t0 > timeout_s:
            break
        time.sleep(0.2)
    out = {"run": None, "history": [], "summary": {}}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in r.summary.update})
    return out


def _read_tb_events(tb_dir: str):
    """Every tensorboardX `Event` of the event files in `tb_dir` (TFRecord: uint64 length, uint32 masked crc,
    data, uint32 masked crc)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            e = event_pb2.Event()
            e.ParseFromString(data[pos + 12:pos + 12 + n])
            out.append(e)
            pos += 12 + n + 4
    return out


# ------------------------------------------------------------------------- a real evaluation output folder


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """`evaluate_records` over 6 synthetic images with scripted answers (exact boxes, one shifted box, one garbage
    answer; one grounding and one counting record): (metrics, the output folder with per_image.json and
    pictures)."""
    from coordexp_jax import evaluate as E
    from coordexp_jax.coord import protocols
    from coordexp_jax.data import prompts, records, synthetic
    from coordexp_jax.data.image import ImageConfig
    from coordexp_jax.data.tokenizer import small_tokenizer, token_ids_from_tokenizer
    from coordexp_jax.rollout.sampler import Rollout

    d = str(tmp_path_factory.mktemp("eval"))
    paths = synthetic.write_split(d, "val", 6, seed=3, cfg=synthetic.SyntheticConfig(image_size=(64, 64)))
    recs = list(records.read_jsonl(paths["jsonl"])[0])
    recs[4] = dataclasses.replace(recs[4], task="grounding", objects=recs[4].objects[:1])
    recs[5] = dataclasses.replace(recs[5], task="counting")
    tok = small_tokenizer()
    ids = token_ids_from_tokenizer(tok)
    enc = prompts.SampleEncoder(prompts.PromptConfig(image=ImageConfig(min_pixels=64 * 64, max_pixels=64 * 64)),
                                tokenizer=tok)

    def answer(r, shift=0.0):
        objs = [protocols.AnswerObject(o.desc, box=tuple(np.clip(np.asarray(b) + shift, 0, 1)))
                for o, b in zip(r.objects, r.boxes())]
        return protocols.serialize(objs, tok, ids).ids + [ids.eos]

    answers = [answer(r, 0.3 if i == 1 else 0.0) for i, r in enumerate(recs)]
    answers[2] = [ids.coord_start + 5] * 7 + [ids.eos]

    class Scripted:
        calls = 0

        def generate(self, batch):
            B = batch["input_ids"].shape[0]
            rows = answers[self.calls:self.calls + B]
            self.calls += B
            T = max(map(len, rows))
            tokens = np.zeros((B, T), np.int32)
            for b, r in enumerate(rows):
                tokens[b, :len(r)] = r
            lp = np.full((B, T), -0.1, np.float32)
            return Rollout(tokens=tokens, logprobs=lp, sample_logprobs=lp, coord_expectation=np.full((B, T), np.nan),
                           lengths=np.array([len(r) for r in rows], np.int32), finished=np.ones(B, bool))

    out = os.path.join(d, "out")
    m = E.evaluate_records(Scripted(), recs, enc, model_config=prompts.released_model_config(enc.cfg, ids),
                           config=E.EvalConfig(batch_size=4), out_dir=out, progress=False)
    m = {k: float(v) for k, v in m.items()}
    m["minutes"] = 1.0  # added by the training loop's eval hook
    return m, out


def _worst_order(per_image):
    """The report's "worst first", written out independently: failed parses first, then FP + FN (counting:
    |stated - true count|), then the lower mean IoU (none last), then the index."""
    def key(e):
        err = abs((e["n_pred"] or 0) - e["n_gt"]) if e["tp"] is None else e["fp"] + e["fn"]
        return (-(err + (1000 if e["parse"] == "failed" else 0)),
                e["mean_iou"] if e["mean_iou"] is not None else 2.0, e["index"])
    return sorted(per_image, key=key)


def _pixels(src):
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"))


def _copy_eval(evaluated, workdir, step):
    dst = ML.eval_dir(str(workdir), step)
    shutil.copytree(evaluated[1], dst)
    return dst


def _wandb_cfg(tmp_path, **kw):
    return loop_config(4, **{"log.wandb.project": "coordexp-test", "log.wandb.mode": "offline",
                             "log.wandb.dir": str(tmp_path / "wb"), **kw})


# ------------------------------------------------------------------------------------------------------ tests


def test_tag_name():
    assert ML.tag_name("det/f1@0.5") == "det/f1_at_0.5"
    assert ML.tag_name("grounding/acc@0.5") == "grounding/acc_at_0.5"
    assert ML.tag_name("train/loss") == "train/loss"
    assert ML.tag_name("/a b:c") == "a_b_c"


def test_every_evaluator_name_is_a_valid_tensorboard_tag(evaluated, tmp_path, caplog):
    """tensorboardX renames (and logs "Summary name ... is illegal") any tag outside [-/\\w.]: with the raw names
    the evaluator's '@' keys would trigger it; through the writer no tag is renamed and nothing is logged."""
    from tensorboardX.summary import _clean_tag

    metrics, out = evaluated
    assert any(_clean_tag(f"eval/{k}") != f"eval/{k}" for k in metrics)  # the raw names are illegal
    assert {"det/f1@0.5", "grounding/acc@0.5", "counting/mae"} <= set(metrics)
    _copy_eval(evaluated, tmp_path, 5)
    w = ML.MetricsWriter(str(tmp_path), True, cfg=C.validate(loop_config(4)))
    with caplog.at_level(logging.DEBUG, logger="tensorboardX"):
        w.write(5, metrics, kind="eval")
        w.write(5, {"loss": 1.0, "grad_norm": 2.0}, kind="train")
    w.close()
    assert not [r for r in caplog.records if "illegal" in r.getMessage()], caplog.text
    events = _read_tb_events(str(tmp_path / "tb"))
    tags = {v.tag for e in events for v in e.summary.value}
    for k in metrics:
        assert ML.tag_name(f"eval/{k}") in tags and _clean_tag(ML.tag_name(f"eval/{k}")) == ML.tag_name(f"eval/{k}")
    # metrics.jsonl keeps the names as written
    rec = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert rec["det/f1@0.5"] == metrics["det/f1@0.5"] and rec["kind"] == "eval"
    # the pictures: every one of the 6 images has one, so min(6, log.num_pictures=16) images, worst first
    images = [(v.tag, v.image) for e in events for v in e.summary.value if v.HasField("image")]
    assert [t for t, _ in images] == [f"eval/pictures/{i:02d}" for i in range(6)]
    order = _worst_order(json.load(open(os.path.join(out, "per_image.json"))))
    assert order[0]["parse"] == "failed"
    for (_, tb_image), e in zip(images, order):  # PNG both ways: the pixels are equal
        np.testing.assert_array_equal(_pixels(io.BytesIO(tb_image.encoded_image_string)),
                                      _pixels(os.path.join(out, e["picture"])))
    texts = [v for e in events for v in e.summary.value if v.tag.startswith("eval/picture_captions/")]
    assert [v.tag for v in texts] == [f"eval/picture_captions/{i:02d}/text_summary" for i in range(6)]
    assert [v.tensor.string_val[0].decode() for v in texts] == [
        ML.picture_caption(e).replace("\n", "  \n") for e in order]


def test_pictures_worst_first_and_captions(evaluated):
    _, out = evaluated
    per_image = json.load(open(os.path.join(out, "per_image.json")))
    pics = ML.read_pictures(out, 3)
    assert len(pics) == 3 and ML.read_pictures(out, 0) == []
    expect = _worst_order(per_image)[:3]
    assert [p for p, _ in pics] == [os.path.join(out, e["picture"]) for e in expect]
    for (_, cap), e in zip(pics, expect):
        assert f"#{e['index']} {os.path.basename(e['image'])}" in cap
        assert "prompt: " + e["prompt"] in cap and "answer: " in cap


def test_wandb_offline_run_has_metrics_config_pictures_and_resumes(evaluated, tmp_path):
    work = tmp_path / "run7"
    cfg = C.validate(_wandb_cfg(tmp_path, **{"log.num_pictures": 4, "log.wandb.group": "sweep1"}))
    _copy_eval(evaluated, work, 3)
    w = ML.MetricsWriter(str(work), False, cfg=cfg)
    for s in (1, 2, 3):
        w.write(s, {"loss": 1.0 / s, "lr": 0.01})
    w.write(3, evaluated[0], kind="eval")
    w.event(3, "stop", reason="steps", message="stopped at step 3 of 3", steps_run=3)
    w.close()
    rid = json.load(open(work / ML.WANDB_RUN_FILE))["id"]
    (run_dir,) = glob.glob(str(tmp_path / "wb" / "wandb" / f"offline-run-*-{rid}"))
    assert not os.path.exists(tmp_path / "wandb_default")  # log.wandb.dir, not WANDB_DIR
    run = _wandb_run(run_dir)
    assert run["run"].run_id == rid and run["run"].project == "coordexp-test" and run["run"].run_group == "sweep1"
    assert run["run"].display_name == "run7"  # the workdir's name
    config = {u.key: json.loads(u.value_json) for u in run["run"].config.update}
    assert config["optim"] == C.to_dict(cfg)["optim"] and config["log"]["num_pictures"] == 4
    train = [h for h in run["history"] if "train/loss" in h]
    assert [(h["step"], h["train/loss"]) for h in train] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    (ev,) = [h for h in run["history"] if "eval/det/f1_at_0.5" in h]
    assert ev["step"] == 3 and ev["eval/det/f1_at_0.5"] == pytest.approx(evaluated[0]["det/f1@0.5"])
    assert ev["eval/grounding/acc_at_0.5"] == pytest.approx(evaluated[0]["grounding/acc@0.5"])
    (pic,) = [h for h in run["history"] if "eval/pictures/00/_type" in h]
    expect = ML.read_pictures(ML.eval_dir(str(work), 3), 4)
    assert pic["step"] == 3 and not any(k.startswith("eval/pictures/04/") for k in pic)
    for i, (path, caption) in enumerate(expect):  # each picture under its rank, its file in the run's media
        assert pic[f"eval/pictures/{i:02d}/_type"] == "image-file" and pic[f"eval/pictures/{i:02d}/caption"] == caption
        np.testing.assert_array_equal(_pixels(os.path.join(run_dir, "files", pic[f"eval/pictures/{i:02d}/path"])),
                                      _pixels(path))
    assert run["summary"]["stop/reason"] == "steps"
    # a second writer on the same workdir (a resumed training run) resumes the same W&B run
    w = ML.MetricsWriter(str(work), False, cfg=cfg)
    w.write(4, {"loss": 0.25})
    w.close()
    runs = sorted(glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith(rid) for r in runs)
    second = _wandb_run([r for r in runs if r != run_dir][0])
    assert second["run"].run_id == rid and second["run"].resume
    assert [(h["step"], h["train/loss"]) for h in second["history"] if "train/loss" in h] == [(4, 0.25)]


def test_wandb_configured_but_missing_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ML.WandbUnavailableError) as e:
        ML.MetricsWriter(str(tmp_path), True, cfg=C.validate(_wandb_cfg(tmp_path)))
    assert isinstance(e.value, CoordExpError) and "\n" not in str(e.value)
    assert "pip install wandb" in str(e.value) and "log.wandb.project" in str(e.value)
    assert not os.listdir(tmp_path)  # nothing written (no TensorBoard, no run id)
    # the training loop says so before it builds or writes anything
    with pytest.raises(ML.WandbUnavailableError, match=r"pip install wandb"):
        loop.train(_wandb_cfg(tmp_path), str(tmp_path / "work"), components=components())
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_without_wandb_nothing_is_imported_or_written(evaluated, tmp_path):
    """In a fresh interpreter: a training run on the stand-in with TensorBoard and an evaluation with pictures, W&B
    not configured: `wandb` is never imported and the workdir has no W&B files."""
    work = tmp_path / "w"
    _copy_eval(evaluated, work, 2)
    code = f"""
import json, sys
sys.path.insert(0, {os.path.join(ROOT, 'tests', 'train')!r})
from standin import components, loop_config
from coordexp_jax.train import loop
cfg = loop_config(2, **{{"train.tensorboard": True, "eval.at_end": True}})
loop.train(cfg, {str(work)!r}, components=components(), eval_hook=lambda m, s, w: {{"det/f1@0.5": 0.5}})
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'wandb')))
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_DIR=str(tmp_path / "wbdir"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
    names = set(os.listdir(work))
    assert {"metrics.jsonl", "tb", "config.json"} <= names
    assert not names & {"wandb", ML.WANDB_RUN_FILE} and not os.path.exists(tmp_path / "wbdir")
    # TensorBoard still got the evaluation pictures
    assert any(v.HasField("image") for e in _read_tb_events(str(work / "tb")) for v in e.summary.value)


@pytest.mark.slow
def test_training_run_with_wandb_offline(evaluated, tmp_path):
    """The stand-in training loop with W&B offline and an eval hook that writes the evaluator's folder: the run
    holds every logged train record of metrics.jsonl, the eval metrics and pictures at each evaluation, the stop
    reason; a continued run (more steps) resumes the same W&B run."""
    work = tmp_path / "train"

    def hook(model, step, workdir):
        _copy_eval(evaluated, workdir, step)
        return {"det/f1@0.5": 0.25 * step}

    cfg = _wandb_cfg(tmp_path, **{"eval.every": 2, "log.num_pictures": 2})
    res = loop.train(cfg, str(work), components=components(), eval_hook=hook)
    assert res["step"] == 4
    rid = json.load(open(work / ML.WANDB_RUN_FILE))["id"]
    (run_dir,) = glob.glob(str(tmp_path / "wb" / "wandb" / f"offline-run-*-{rid}"))
    run = _wandb_run(run_dir)
    jsonl = loop.read_metrics(str(work))
    train = {h["step"]: h for h in run["history"] if "train/loss" in h}
    assert sorted(train) == sorted(jsonl) == [1, 2, 3, 4]
    for s, rec in jsonl.items():  # float32 losses through JSON both ways: equal
        assert train[s]["train/loss"] == pytest.approx(rec["loss"], rel=1e-12)
    evals = [(h["step"], h["eval/det/f1_at_0.5"]) for h in run["history"] if "eval/det/f1_at_0.5" in h]
    assert evals == [(2, 0.5)]  # eval.at_end is off in the stand-in config: step 4 is the end, no eval there
    pics = [(h["step"], sorted(k for k in h if k.endswith("/_type"))) for h in run["history"]
            if any(k.startswith("eval/pictures/") for k in h)]
    assert pics == [(2, ["eval/pictures/00/_type", "eval/pictures/01/_type"])]
    assert run["summary"]["stop/reason"] == "steps"
    cfg.train.steps = 6
    res = loop.train(cfg, str(work), components=components(), eval_hook=hook)
    assert res["step"] == 6 and json.load(open(work / ML.WANDB_RUN_FILE))["id"] == rid
    runs = [r for r in glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*")) if r != run_dir]
    (second,) = [_wandb_run(r) for r in runs]
    assert second["run"].run_id == rid and second["run"].resume
    assert sorted(h["step"] for h in second["history"] if "train/loss" in h) == [5, 6]
