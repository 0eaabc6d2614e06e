"""CoordExp's own counting (point tokens: `{"count": N, "points": [[<x>, <y>], ...]}`, the `counting` task) on the
synthetic counting set of configs/counting_demo.py, from the same detection demo model, at the same steps and batch:
the point-token side of benchmarks/counting_heads_vs_points.py (which writes the task-'counting' records first:
`python benchmarks/counting_heads_vs_points.py prepare`).

    python -m coordexp_jax.train --config configs/counting_points_demo.py --workdir runs/counting_points
"""

import os

from configs import counting_demo
from coordexp_jax.train.config import base_config, validate


def get_config():
    from coordexp_jax.train import counting_loop

    d = counting_loop.synthetic_dir(validate(counting_demo.get_config()))
    heads = counting_demo.get_config()
    c = base_config()
    c.name = "counting_points_demo"
    c.model.checkpoint = heads.model.checkpoint
    c.data.kind = "jsonl"
    c.data.path = os.path.join(d, "train_counting.jsonl")
    c.data.eval_path = os.path.join(d, "val_counting.jsonl")
    c.data.protocol = "coordjson"
    c.data.image_size = heads.data.image_size
    c.data.max_objects = heads.data.max_objects
    c.data.seq_len = 256  # 12 points x ~8 tokens + the prompt and 16 image tokens (128 drops 11-12 point answers)
    c.data.batch_size = heads.data.batch_size
    # the detection demo's objective (configs/demo.py) on the point tokens: CE + soft CE + W1 + gate
    c.loss.ce = 1.0
    c.loss.soft_ce = 0.5
    c.loss.w1 = 0.5
    c.loss.gate = 1.0
    c.loss.coord_positions = 2 * heads.data.max_objects
    c.optim.lr = heads.optim.lr
    c.optim.warmup_steps = heads.optim.warmup_steps
    c.optim.min_lr_ratio = heads.optim.min_lr_ratio
    c.optim.weight_decay = heads.optim.weight_decay
    c.train.steps = heads.train.steps
    c.train.max_minutes = 0.0  # the same number of steps as the heads run, however long they take
    c.train.log_every = 10
    c.train.ckpt_every = 500
    c.eval.at_end = False  # scored by benchmarks/counting_heads_vs_points.py
    c.eval.use_ema = False
    return c
