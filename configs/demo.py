"""The embedded default: a tiny Qwen3-VL-shaped model from random init, the project's small tokenizer, the
synthetic shapes set (generated on first use under ~/.cache/coordexp_jax or data.path), ~10 minutes on 2 CPU cores.

    python -m coordexp_jax.train --config configs/demo.py --workdir /tmp/demo
    python benchmarks/demo_curve.py /tmp/demo          # AP50 vs minutes from the run's evaluations

The task is the default synthetic one: 3 classes, 1-4 objects per 128x128 image, textured backgrounds, clutter
and partial occlusion. Choices measured on this machine (docs/demo.md has the table of runs):
- protocol 'tags': ~12 answer tokens per object instead of ~28 for coordjson, so every sample fits the 128-token
  bucket (coordjson needs 256) -- same targets, half the sequence;
- no `w1`: the objective computes the coordinate terms over all B x S positions, and the W1 cumsum over 1000
  bins took ~45% of the step (0.89 s -> 0.50 s per batch of 16); soft_ce + the expectation L1/GIoU remain;
- batch 32 (more images/s than 16 on 2 cores), lr 1e-2 peak with a short warmup and cosine decay over the steps
  that fit in 10 minutes; sinusoidal coordinate-token rows (neighbouring bins start alike);
- text head_dim 32 with mrope_section (4, 6, 6): the rotary frequencies then separate the columns of the 4x4
  visual-token grid (with the preset's head_dim 16 x was never read from the image): AP50 0.04 -> 0.25 at 1200
  steps.
"""

import ml_collections

from coordexp_jax.train.config import base_config


def get_config():
    c = base_config()
    c.name = "demo"
    c.model.preset = "tiny"
    c.model.coord_init = "sinusoidal"
    # The tiny preset's head_dim 16 leaves the column axis of M-RoPE 0.1 rad per visual-token column (rows 0.32):
    # columns were indistinguishable and x was never learned. head_dim 32 with section (4, 6, 6) gives columns
    # 0.32 and rows 0.56 rad (docs/demo.md §3).
    c.model.overrides = ml_collections.ConfigDict({"text": {"head_dim": 32, "mrope_section": (4, 6, 6)}})
    c.data.kind = "synthetic"
    c.data.image_size = 128
    c.data.num_classes = 3
    c.data.min_objects = 1
    c.data.max_objects = 4
    c.data.num_train = 4096
    c.data.num_eval = 64
    c.data.protocol = "tags"
    c.data.seq_len = 128
    c.data.batch_size = 32
    c.loss.ce = 1.0
    c.loss.coord_ce = 0.0
    c.loss.soft_ce = 0.5
    c.loss.w1 = 0.0
    c.loss.gate = 1.0
    c.loss.l1 = 2.0
    c.loss.giou = 1.0
    c.loss.tau = 1.0
    c.loss.coord_positions = 16  # 4 objects x 4 coordinates: the coordinate head runs only there
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 50
    c.optim.min_lr_ratio = 0.05
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    # 1650 steps at ~3.2 steps/s (coordinate head gathered): 7.9 minutes here at load 1-2, evaluations included;
    # AP50 0.237 on 64 held-out images (docs/demo.md run v3). The goal of 0.3 in 10 minutes is not reached yet.
    c.train.steps = 1650
    c.train.log_every = 10
    c.train.ckpt_every = 400
    c.train.ema_decay = 0.0
    c.train.max_minutes = 10.0
    c.eval.every = 825  # points of the AP50-vs-minutes curve (each ~15 s of the 10 minutes)
    c.eval.at_end = True
    c.eval.use_ema = False
    return c
