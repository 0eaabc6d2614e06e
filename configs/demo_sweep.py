"""A hyper-parameter sweep of the detection demo (configs/demo.py) at demo scale: learning rate x soft-CE/W1 sigma
(`loss.sigma`, the width in bins of the Gaussian target around the true coordinate bin) x batch size, 3 x 3 x 2 =
18 runs of 600 steps, each evaluated once at its end (AP50 on the 64 held-out images).

    python -m coordexp_jax.sweep --config configs/demo_sweep.py --out runs/demo_sweep --parallel 1
    python -m coordexp_jax.sweep status runs/demo_sweep
    python -m coordexp_jax.sweep report runs/demo_sweep --metric det/AP50_logprob

A smaller sweep from the same file: `--sweep optim.lr=3e-3,1e-2 --sweep loss.sigma=0.5,2.0` replaces those axes
(batch size stays swept unless `--sweep data.batch_size=16`); `--config.train.steps=300` shortens every run.
Each run is ~3 minutes on 2 CPU cores (600 steps of batch 16 plus start-up and one evaluation), so the full grid
is about an hour with `--parallel 1`; docs/sweeps.md has a measured example.
"""

import os

from coordexp_jax.train.config import load_config_file


def _demo():
    return load_config_file(os.path.join(os.path.dirname(__file__), "demo.py"))


def get_config():
    c = _demo()
    c.name = "demo_sweep"
    c.train.steps = 600
    c.train.max_minutes = 0.0  # every run trains its 600 steps (the demo's 10-minute cap would make runs unequal)
    c.train.ckpt_every = 200
    c.optim.warmup_steps = 50
    c.eval.every = 0  # one evaluation, at the end
    c.eval.at_end = True
    return c


def get_sweep():
    return {
        "optim.lr": [3e-3, 1e-2, 3e-2],
        "loss.sigma": [0.5, 1.0, 2.0],
        "data.batch_size": [8, 16],
    }
