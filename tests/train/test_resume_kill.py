"""kill -9 in the middle of training, restart with the same command: the losses after the restart equal those of
an uninterrupted run (real CLI, tiny Qwen3-VL, synthetic data, async orbax checkpoints, Grain iterator state)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from coordexp_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8


def _cmd(workdir, data, export=False):
    return [sys.executable, "-m", "coordexp_jax.train", "--config", "configs/demo.py", "--workdir", str(workdir),
            f"--config.train.steps={STEPS}", "--config.train.ckpt_every=3", "--config.train.log_every=1",
            "--config.train.max_minutes=0", "--config.train.progress=False", "--config.train.tensorboard=False",
            "--config.data.num_train=48", "--config.data.num_eval=4", "--config.data.batch_size=4",
            f"--config.data.path={data}", "--config.eval.at_end=False", "--config.optim.warmup_steps=2",
            f"--export={export}"]


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


@pytest.mark.slow
def test_kill9_then_restart_matches_uninterrupted(tmp_path):
    data = tmp_path / "synthetic"
    a, b = tmp_path / "a", tmp_path / "b"
    r = subprocess.run(_cmd(a, data, export=True), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    p = subprocess.Popen(_cmd(b, data), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    killed_at = None
    while time.time() < deadline and p.poll() is None:
        path = b / "metrics.jsonl"
        if path.exists() and (b / "checkpoints" / "3").exists():
            steps = loop.read_metrics(str(b))
            if max(steps, default=0) >= 5:
                p.send_signal(signal.SIGKILL)
                killed_at = max(steps)
                break
        time.sleep(0.05)
    p.wait(timeout=60)
    assert killed_at is not None and killed_at < STEPS, "run finished before it could be killed"
    assert p.returncode == -signal.SIGKILL
    r = subprocess.run(_cmd(b, data), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step" in r.stderr
    ra, rb = loop.read_metrics(str(a)), loop.read_metrics(str(b))
    assert sorted(ra) == sorted(rb) == list(range(1, STEPS + 1))
    assert [ra[s]["loss"] for s in ra] == [rb[s]["loss"] for s in ra]  # bitwise equal
    assert ra[STEPS]["loss"] != ra[1]["loss"]

    # the model of the run's last checkpoint (rebuilt from config.json, restored, LoRA merged) is the exported one,
    # and the export chain to an HF directory works on it
    import jax
    import numpy as np
    from flax import nnx

    from coordexp_jax.train.export import load_trained_model
    from coordexp_jax.weights.checkpoint import load_checkpoint

    _, model, step = load_trained_model(str(a))
    assert os.path.isfile(a / "final_model" / "preprocessing.json")  # predict takes its image settings from it
    _, final = load_checkpoint(str(a / "final_model"))
    assert step == STEPS
    for x, y in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(final, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    r = subprocess.run([sys.executable, "-m", "coordexp_jax.train.export", "--workdir", str(a), "--step", "6",
                        "--out", str(tmp_path / "m6")], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0 and "step 6" in r.stdout, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "tools/export_hf.py", "--checkpoint", str(tmp_path / "m6"), "--out",
                        str(tmp_path / "hf")], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "hf" / "config.json").exists()
