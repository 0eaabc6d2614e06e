"""The embedded default: a tiny Qwen3-VL-shaped model from random init, the project's small tokenizer, the
synthetic shapes set (generated on first use under ~/.cache/coordexp_jax or data.path), ~10 minutes on 2 CPU cores.

    python -m coordexp_jax.train --config configs/demo.py --workdir runs/demo
    python benchmarks/demo_curve.py runs/demo          # AP50 vs minutes from the run's evaluations

The task is the default synthetic one: 3 classes, 1-4 objects per 128x128 image, textured backgrounds, clutter
and partial occlusion. Choices measured on this machine (docs/demo.md, "What each choice buys", has the runs):
- protocol 'tags': ~13 answer tokens per object instead of ~30 for coordjson, so every sample fits the 128-token
  bucket (coordjson needs 256) -- same targets, half the sequence;
- objective ce + soft_ce 0.5 + w1 0.5 + gate 1, without the expectation L1/GIoU: at this budget adding l1 2 +
  giou 1 lowered AP50 from 0.68 to 0.28-0.41 (docs/training.md, loss ablation); the coordinate head runs only at
  the 16 coordinate positions (`loss.coord_positions`), so W1's cumsums over 1000 bins cost ~5% of the step;
- batch 16 (2.1x the updates per minute of batch 32 for 7% fewer images/s; the 10-minute run is update-limited),
  lr 1e-2 peak with a short warmup and cosine decay over the steps that fit in 10 minutes; sinusoidal
  coordinate-token rows (neighbouring bins start alike);
- weights initialised with std 0.1 (`initializer_range`, HF's 0.02 is tuned for wide models): with 0.02 the
  outcome hung on the seed (AP50 0.09 vs 0.41 for seeds 0 and 1 at batch 16), with 0.1 seed 0 reached 0.41;
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
    # 0.32 and rows 0.56 rad (docs/demo.md).
    # initializer_range 0.1 instead of HF's 0.02: at 0.02 this 64-wide model hung on the seed (docs/demo.md).
    c.model.overrides = ml_collections.ConfigDict({
        "text": {"head_dim": 32, "mrope_section": (4, 6, 6), "initializer_range": 0.1},
        "vision": {"initializer_range": 0.1}})
    c.data.kind = "synthetic"
    c.data.image_size = 128
    c.data.num_classes = 3
    c.data.min_objects = 1
    c.data.max_objects = 4
    c.data.num_train = 4096
    c.data.num_eval = 64
    c.data.protocol = "tags"
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.loss.ce = 1.0
    c.loss.coord_ce = 0.0
    c.loss.soft_ce = 0.5
    c.loss.w1 = 0.5
    c.loss.gate = 1.0
    c.loss.l1 = 0.0  # the expectation L1/GIoU cost AP at this budget (docs/training.md, loss ablation)
    c.loss.giou = 0.0
    c.loss.tau = 1.0
    c.loss.coord_positions = 16  # 4 objects x 4 coordinates: the coordinate head runs only there
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.05
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    # 3800 steps of 16 on both cores of the idle 2-core CPU: AP50 (log-prob) 0.468 at 4.2 min and 0.646 at 8.3
    # min, AP 0.482, F1 0.717 on the 64 held-out images (README command in a fresh clone, commit ea1abb4;
    # docs/demo.md). On a loaded machine train.max_minutes stops it earlier.
    c.train.steps = 3800
    c.train.log_every = 10
    c.train.ckpt_every = 800
    c.train.ema_decay = 0.0
    c.train.max_minutes = 10.0
    c.eval.every = 1900  # one mid-run point of the AP50-vs-minutes curve (each evaluation ~15 s of the 10 minutes)
    c.eval.at_end = True
    c.eval.use_ema = False
    return c
