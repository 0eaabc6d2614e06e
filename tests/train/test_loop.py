"""The loop on the stand-in: NaN policy (stop naming the step / skip and count), resume equals an uninterrupted
run, an incompatible checkpoint in the workdir, a missing data path, CLI errors naming the key."""

import json
import os
import subprocess
import sys

import pytest

from coordexp_jax.train import build, checkpoint, config as C, loop

from standin import components, loop_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cfg(**kw):
    return loop_config(6, **kw)


def test_nan_stop_names_the_step(tmp_path):
    with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss nan .* at step 3;"):
        loop.train(_cfg(), str(tmp_path), components=components(bad={2}))


def test_nan_skip_counts_and_continues(tmp_path):
    res = loop.train(_cfg(**{"train.nan_policy": "skip"}), str(tmp_path), components=components(bad={1, 4}))
    assert res["skipped"] == 2 and res["step"] == 6
    recs = loop.read_metrics(str(tmp_path))
    assert [recs[s]["nonfinite"] for s in range(1, 7)] == [0, 1, 0, 0, 1, 0]
    assert recs[6]["skipped"] == 2


def test_resume_equals_uninterrupted_and_incompatible_checkpoint(tmp_path):
    full = loop.train(_cfg(), str(tmp_path / "a"), components=components())
    part = loop.train(_cfg(), str(tmp_path / "b"), components=components(), stop_after=3)
    assert part["step"] == 3
    rest = loop.train(_cfg(), str(tmp_path / "b"), components=components())  # resumes at 3 (data iterator too)
    assert rest["step"] == 6
    a, b = loop.read_metrics(str(tmp_path / "a")), loop.read_metrics(str(tmp_path / "b"))
    assert [a[s]["loss"] for s in range(1, 7)] == [b[s]["loss"] for s in range(1, 7)]
    # the same workdir with LoRA switched on holds an incompatible checkpoint: a clear error naming the key
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"lora\.enabled: checkpoint False, this run True"):
        loop.train(_cfg(**{"lora.enabled": True, "lora.targets": ("q_proj",)}), str(tmp_path / "b"),
                   components=components())


def test_missing_data_path_is_named():
    cfg = C.validate(_cfg(**{"data.kind": "jsonl", "data.path": "/nonexistent/train.jsonl"}))
    with pytest.raises(build.DataPathError, match=r"'data\.path': path '/nonexistent/train\.jsonl' does not exist"):
        build.data_specs(cfg)


def _cli(*args, timeout=120):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "coordexp_jax.train", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def test_cli_unknown_key_and_missing_data(tmp_path):
    r = _cli("--help")
    assert r.returncode == 0 and "--workdir" in r.stdout and "--config" in r.stdout
    r = _cli("--config", "configs/demo.py", "--config.optim.lrr=1e-3", "--workdir", str(tmp_path))
    assert r.returncode == 2 and "unknown config key 'optim.lrr'" in r.stderr and "'optim.lr'?" in r.stderr, \
        r.stderr[-2000:]
    r = _cli("--config", "configs/demo.py", "--config.data.kind=jsonl", "--config.data.path=/no/such.jsonl",
             "--workdir", str(tmp_path))
    assert r.returncode == 2 and "config key 'data.path': path '/no/such.jsonl' does not exist" in r.stderr, r.stderr[-2000:]
    # the resolved config was written before the failure
    assert json.load(open(tmp_path / "config.json"))["data"]["path"] == "/no/such.jsonl"


def test_fusion_preset_missing_source_is_named():
    cfg = C.validate(_cfg(**{"data.kind": "fusion", "data.path": os.path.join(ROOT, "configs/fusion/coco_refcoco.py")}))
    with pytest.raises(build.DataPathError, match=r"source 'coco'.*'data/coco/train2017\.jsonl' does not exist"):
        build.data_specs(cfg)
