"""The counting recipe's hyper-parameter grid on the counting demo (configs/counting_demo.py) at demo scale: 4
learning rates x 3 LoRA ranks x 2 LoRA alphas x 3 regression-head depths = 72 runs, the grid of the sequential
counting recipe's SLURM search (its lr 1e-3, 5e-4, 1e-4, 5e-5; LoRA r 8, 16, 32; alpha 16, 32; MLP heads of 2, 3, 4
layers), each run 300 steps with LoRA on and one counting evaluation (MAE) at its end.

    python -m coordexp_jax.sweep --config configs/counting_demo_sweep.py --out runs/counting_sweep --parallel 1
    python -m coordexp_jax.sweep report runs/counting_sweep --metric mae --mode min

On a cluster, the same grid as one SLURM job array (docs/sweeps.md):

    python -m coordexp_jax.sweep --config configs/counting_demo_sweep.py --out /shared/runs/counting_sweep \
        --executor slurm --slurm_partition gpu --gpus_per_node 1 --time_min 60 \
        --slurm_setup "source $PWD/.venv/bin/activate"

Like the counting demo, every run starts from the detection demo's final model (`model.checkpoint =
runs/demo/final_model`: train configs/demo.py first, or pass `--config.model.checkpoint=DIR`), here with LoRA
adapters on it and the regression heads at 5x the learning rate; with a Qwen3-VL checkpoint and the full step
count it is the recipe's search. A subset: `--sweep optim.lr=1e-3,1e-4 --sweep lora.rank=16 --sweep
lora.alpha=32.0` (those axes replaced). Each run is a few minutes on 2 CPU cores; docs/training.md has a measured
4-run example.
"""

import os

from coordexp_jax.train.config import load_config_file


def _counting_demo():
    return load_config_file(os.path.join(os.path.dirname(__file__), "counting_demo.py"))


def get_config():
    c = _counting_demo()
    c.name = "counting_demo_sweep"
    c.lora.enabled = True  # the recipe trains LoRA adapters + the heads
    c.train.steps = 300
    c.train.max_minutes = 0.0  # equal runs: every run trains its 300 steps
    c.train.ckpt_every = 100
    c.optim.warmup_steps = 30
    c.eval.every = 0
    c.eval.at_end = True
    return c


def get_sweep():
    return {
        "optim.lr": [1e-3, 5e-4, 1e-4, 5e-5],
        "lora.rank": [8, 16, 32],
        "lora.alpha": [16.0, 32.0],
        "counting.head_layers": [2, 3, 4],
    }
