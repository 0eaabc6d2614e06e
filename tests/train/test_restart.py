"""Restarts on the stand-in: a stop by train.max_minutes on a checkpoint step, its resume, a re-run of a finished
run (each once raised orbax's StepAlreadyExistsError), the stop reason in metrics.jsonl, and a resume with another
data.worker_count refused naming both counts."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from coordexp_jax.train import checkpoint, config as C, loop

from standin import components, loop_config


def _cfg(**kw):
    return loop_config(5, **kw)


def _stops(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "stop"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("full"))
    res = loop.train(_cfg(), d, components=components())
    return d, res


def test_max_minutes_stop_on_checkpoint_step_then_resume(tmp_path, uninterrupted, caplog):
    ref_dir, _ = uninterrupted
    wd = str(tmp_path)
    # any positive limit is over after the first step; step 1 is a checkpoint step (ckpt_every=1), so the periodic
    # save and the save at the stop fall on the same step
    with caplog.at_level("INFO", logger="coordexp_jax.train.loop"):
        part = loop.train(_cfg(**{"train.max_minutes": 1e-9, "train.ckpt_every": 1}), wd, components=components())
    assert part["step"] == 1 and part["stop_reason"] == "max_minutes" and part["steps_run"] == 1
    assert any("stopped at step 1 of 5: train.max_minutes=1e-09 reached" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1"]

    rest = loop.train(_cfg(), wd, components=components())  # the same command without the limit resumes at 1
    assert rest["step"] == 5 and rest["stop_reason"] == "steps" and rest["steps_run"] == 4
    a, b = loop.read_metrics(ref_dir), loop.read_metrics(wd)
    # same data order and updates: the resumed run's losses are the uninterrupted run's, bit for bit
    assert [a[s]["loss"] for s in range(1, 6)] == [b[s]["loss"] for s in range(1, 6)]
    stops = _stops(wd)
    assert [(r["step"], r["reason"], r["steps_run"]) for r in stops] == [(1, "max_minutes", 1), (5, "steps", 4)]
    assert "run the same command again to resume" in stops[0]["message"]


def test_rerun_of_finished_run(tmp_path, uninterrupted):
    ref_dir, ref = uninterrupted
    wd = str(tmp_path / "run")
    shutil.copytree(ref_dir, wd)
    again = loop.train(_cfg(), wd, components=components())  # nothing to train: restores the final checkpoint
    assert again["step"] == 5 and again["stop_reason"] == "complete" and again["steps_run"] == 0
    for x, y in zip(jax.tree.leaves(ref["state"].params), jax.tree.leaves(again["state"].params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the restored final state, unchanged
    assert [(r["step"], r["reason"]) for r in _stops(wd)] == [(5, "steps"), (5, "complete")]
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == sorted(os.listdir(os.path.join(ref_dir,
                                                                                                "checkpoints")))


def test_stop_after_on_checkpoint_step(tmp_path):
    # stop_after=2 ends the call on the checkpoint step 2: the step is saved once, and the rest resumes from it
    part = loop.train(_cfg(), str(tmp_path), components=components(), stop_after=2)
    assert part["step"] == 2 and part["stop_reason"] == "stop_after"
    assert loop.train(_cfg(), str(tmp_path), components=components())["step"] == 5


def test_nonfinite_stop_is_recorded(tmp_path):
    with pytest.raises(loop.NonFiniteLossError, match="at step 2;"):
        loop.train(_cfg(), str(tmp_path), components=components(bad={1}))
    assert [(r["step"], r["reason"]) for r in _stops(str(tmp_path))] == [(2, "nonfinite")]


def test_resume_with_another_worker_count_names_both(tmp_path):
    loop.train(_cfg(), str(tmp_path), components=components(), stop_after=1)
    with pytest.raises(checkpoint.IncompatibleCheckpointError,
                       match=r"data\.worker_count=0, but this run has data\.worker_count=2.*worker_count=0"):
        loop.train(_cfg(**{"data.worker_count": 2}), str(tmp_path), components=components())


TINY_CONFIG = """
from coordexp_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model.preset = "tiny"
    c.data.kind = "jsonl"
    c.data.path = {path!r}
    c.data.image_size = 64
    c.data.seq_len = 128
    c.data.batch_size = 2
    c.data.num_eval = 0
    c.train.steps = 2
    c.train.ckpt_every = 1
    c.train.progress = False
    c.train.tensorboard = False
    c.train.async_checkpoint = False
    c.eval.at_end = False
    return c
"""


@pytest.mark.slow
def test_cli_restarts_keep_final_model(tmp_path, capsys):
    """The real CLI (tiny Qwen3-VL): a max_minutes stop on a checkpoint step writes final_model and exits 0, the
    same command resumes and finishes, and a third run of it reports the run complete and keeps final_model."""
    from coordexp_jax.train import __main__ as train_cli
    from coordexp_jax.train.export import load_trained_model
    from coordexp_jax.weights.checkpoint import load_checkpoint

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copy(os.path.join(root, "fixtures", "data", "bad_inputs", "good.png"), tmp_path / "good.png")  # 64x48
    rec = {"images": ["good.png"], "width": 64, "height": 48, "objects": [{"desc": "cat", "bbox_2d": [4, 5, 30, 40]}]}
    (tmp_path / "d.jsonl").write_text((json.dumps(rec) + "\n") * 4)
    (tmp_path / "tiny.py").write_text(TINY_CONFIG.format(path=str(tmp_path / "d.jsonl")))
    wd = tmp_path / "run"
    final = wd / "final_model" / "model_config.json"
    argv = ["train", "--config", str(tmp_path / "tiny.py"), "--workdir", str(wd)]

    assert train_cli.main(argv + ["--config.train.max_minutes=1e-9"]) == 0
    assert "done: step 1 of 2 (max_minutes)" in capsys.readouterr().out
    assert final.is_file()
    assert train_cli.main(argv) == 0
    assert "done: step 2 of 2 (steps)" in capsys.readouterr().out
    written = final.stat().st_mtime_ns
    assert train_cli.main(argv) == 0
    assert "done: step 2 of 2 (complete)" in capsys.readouterr().out
    assert final.stat().st_mtime_ns == written  # the finished run's final_model is kept, not rewritten
    assert [r["reason"] for r in _stops(str(wd))] == ["max_minutes", "steps", "complete"]
    _, model, step = load_trained_model(str(wd))
    _, exported = load_checkpoint(str(wd / "final_model"))
    assert step == 2
    for x, y in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(exported, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_runs_the_evaluation_a_stop_between_checkpoint_and_evaluation_missed(tmp_path):
    """Step 2 is a checkpoint step and an evaluation step; the checkpoint is written before the evaluation, so a
    kill in between (simulated: the eval record removed) resumes at step 2 past its evaluation. The resumed call
    runs it first, and every evaluation step is in metrics.jsonl exactly once."""
    calls = []

    def hook(model, step, workdir):
        calls.append(step)
        return {"val": float(step)}

    wd = str(tmp_path)
    cfg = _cfg(**{"eval.every": 2})
    part = loop.train(cfg, wd, components=components(), eval_hook=hook, stop_after=2)
    assert part["step"] == 2 and calls == [2]
    path = os.path.join(wd, "metrics.jsonl")
    with open(path) as f:
        kept = [ln for ln in f if json.loads(ln)["kind"] != "eval"]
    with open(path, "w") as f:
        f.writelines(kept)
    calls.clear()
    loop.train(cfg, wd, components=components(), eval_hook=hook)
    assert calls == [2, 4]  # the missed one first, then the run's own (5 steps: 2 and 4 are evaluation steps)
    with open(path) as f:
        evals = [r["step"] for r in map(json.loads, f) if r["kind"] == "eval"]
    assert evals == [2, 4]
