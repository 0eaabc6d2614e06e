"""The embedded default: a tiny Qwen3-VL-shaped model from random init, the project's small tokenizer, the
synthetic shapes set (generated on first use under ~/.cache/coordexp_jax or data.path), ~10 minutes on 2 CPU cores.

    python -m coordexp_jax.train --config configs/demo.py --workdir runs/demo
"""

from coordexp_jax.train.config import base_config


def get_config():
    c = base_config()
    c.name = "demo"
    c.model.preset = "tiny"
    c.model.coord_init = "sinusoidal"
    c.data.kind = "synthetic"
    c.data.image_size = 128
    c.data.num_classes = 3
    c.data.min_objects = 1
    c.data.max_objects = 4
    c.data.num_train = 4096
    c.data.num_eval = 64
    c.data.seq_len = 256
    c.data.batch_size = 16
    c.loss.ce = 1.0
    c.loss.coord_ce = 0.0
    c.loss.soft_ce = 0.5
    c.loss.w1 = 0.5
    c.loss.gate = 1.0
    c.loss.l1 = 2.0
    c.loss.giou = 1.0
    c.loss.tau = 1.0
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 50
    c.optim.min_lr_ratio = 0.05
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.train.steps = 1500
    c.train.log_every = 10
    c.train.ckpt_every = 250
    c.train.ema_decay = 0.99
    c.train.max_minutes = 10.0
    c.eval.every = 0
    c.eval.at_end = True
    return c
