"""Restarts on the stand-in: a stop by train.max_minutes on a checkpoint step, its resume, a re-run of a finished
run (each once raised orbax's StepAlreadyExistsError), the stop reason in metrics.jsonl, and a resume with another
data.worker_count refused naming both counts."""

import json
import os

import jax
import numpy as np
import pytest

from coordexp_jax.train import checkpoint, config as C, loop

from standin import components


def _cfg(**kw):
    cfg = C.base_config()
    cfg.optim.lr = 1e-2
    cfg.train.steps = 5
    cfg.train.log_every = 1
    cfg.train.ckpt_every = 2
    cfg.train.progress = False
    cfg.train.tensorboard = False
    cfg.train.async_checkpoint = False
    cfg.eval.at_end = False
    for k, v in kw.items():
        node = cfg
        *head, leaf = k.split(".")
        for h in head:
            node = node[h]
        node[leaf] = v
    return cfg


def _stops(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "stop"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("full"))
    res = loop.train(_cfg(), d, components=components())
    return d, res


def test_max_minutes_stop_on_checkpoint_step_then_resume_and_rerun(tmp_path, uninterrupted, caplog):
    ref_dir, ref = uninterrupted
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

    again = loop.train(_cfg(), wd, components=components())  # re-run of the finished run: nothing to train
    assert again["step"] == 5 and again["stop_reason"] == "complete" and again["steps_run"] == 0
    for x, y in zip(jax.tree.leaves(ref["state"].params), jax.tree.leaves(again["state"].params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the restored final state, unchanged
    stops = _stops(wd)
    assert [(r["step"], r["reason"], r["steps_run"]) for r in stops] == [(1, "max_minutes", 1), (5, "steps", 4),
                                                                       (5, "complete", 0)]
    assert "run the same command again to resume" in stops[0]["message"]
    assert loop.read_metrics(wd, "stop")[5]["reason"] == "complete"


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
