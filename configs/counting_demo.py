"""Sequential counting with regression heads on CPU: the detection demo's tiny Qwen3-VL-shaped model, the small
tokenizer with `<x>` `<y>`, a synthetic counting set (one shape class, 1-12 circles per 128x128 image on textured
backgrounds with clutter), generated on first use under ~/.cache/coordexp_jax (or data.path).

NEEDS THE DETECTION DEMO'S FINAL MODEL FIRST: run configs/demo.py (about 10 minutes on the idle 2-core CPU), which
writes runs/demo/final_model, then this config (5000 steps: 9 min 45 s at 8.9 steps/s on the 2-core CPU, 29
minutes when other jobs loaded it to 7-12; counting MAE 1.77 on 64 held-out images against the mean-count
baseline's 2.92, hit rate 0.82, docs/training.md "The CPU demo"; train.max_minutes 60 stops it on a slower
machine):

    python -m coordexp_jax.train --config configs/demo.py --workdir runs/demo
    python -m coordexp_jax.train --config configs/counting_demo.py --workdir runs/counting_demo

Each training row is one counting step: the first k circles in left-to-right order carry numbered marks, the prompt
ends in `<x> <y>` (a short form of the recipe's, to fit 64 tokens), and the heads regress the (k+1)-th centre or any
unmarked circle within 0.1 (6.4 px) of its x (`counting.target` 'set' with `counting.set_band` 0.1: near-ties in x
are not forced into one order); 10% of the rows are "all counted" samples (target (-1, -1)) so that the sequential
loop learns to stop. The model is trained in full; the heads at 5x the learning rate. Evaluation counts the held-out
images one circle at a time (docs/counting.md) and reports counting MAE next to the "predict the training mean
count" baseline (`baseline_mae`).

Why left to right, and why the band (docs/training.md, "The CPU demo"): the heads learn the coordinate the order
sorts by (the extreme of the unmarked circles) first and answer about the mean of the unmarked circles for the
other one. Left to right, x is that extreme and `<y>` comes after `<x>`, so the y head can read the chosen x (in
reading order x would have to be chosen before the row is known: causal attention). With the strict order (the
recipe's `ordered` target) two circles of nearly the same x have to be told apart by a few pixels, and the y head
answers between them: that 5000-step run reached MAE 3.42, worse than the baseline. With the band it is 1.77.
"""

from coordexp_jax.train.config import base_config


def get_config():
    c = base_config()
    c.name = "counting_demo"
    c.train.kind = "counting_regression"
    # Initialised from the detection demo's final model (configs/demo.py, run first: it writes
    # runs/demo/final_model): a "pretrained" VLM that already finds shapes, as the recipe starts from Qwen3-VL. Its
    # vocabulary lacks <x> <y>; the two rows are added (mean of the base rows). From random init the loss stayed at
    # the constant-prediction level (~1.0 = 2 x 0.5) for the 620 steps that fit in 10 minutes (docs/training.md).
    c.model.checkpoint = "runs/demo/final_model"
    c.data.kind = "synthetic"
    c.data.image_size = 128
    c.data.num_classes = 1
    c.data.min_objects = 1
    c.data.max_objects = 12
    c.data.num_train = 2048
    c.data.num_eval = 64
    c.data.seq_len = 64
    c.data.batch_size = 16
    c.counting.head_layers = 3
    c.counting.head_width = 0
    c.counting.loss = "l1"
    c.counting.order = "left_to_right"
    c.counting.target = "set"
    c.counting.set_band = 0.1
    c.counting.done_prob = 0.1
    c.counting.max_count = 16
    # A short prompt: the seed's template and system turn are ~240 tokens with the small byte-level tokenizer
    # (a 512-token row); this one is ~30, so a row fits 64 tokens with the 16 image tokens.
    c.counting.template = "Count the {plural}. {marked} marked. Next: <x> <y>"
    c.counting.system_prompt = False
    c.optim.lr = 2e-3
    c.optim.heads.lr_mult = 5.0
    c.optim.warmup_steps = 50
    c.optim.min_lr_ratio = 0.05
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.train.steps = 5000
    c.train.log_every = 10
    c.train.ckpt_every = 500
    c.train.max_minutes = 60.0
    c.eval.every = 1250
    c.eval.at_end = True
    c.eval.num_images = 64
    c.eval.num_pictures = 8
    c.eval.use_ema = False
    return c
