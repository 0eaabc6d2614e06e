"""Stage-2 rollout training on the demo's synthetic set, continuing the demo's Stage-1 model.

    python -m coordexp_jax.train --config configs/demo.py --workdir runs/demo                 # Stage-1 first
    python -m coordexp_jax.train --config configs/stage2_demo.py --workdir runs/demo_stage2 \
        --config.model.checkpoint=runs/demo/final_model

A quarter of the steps roll the current model out on the batch's images, match its objects to the ground truth and
train on the canonicalised rollout (coordexp_method.md §7); the rest are ordinary Stage-1 steps. The comparison
against continued Stage-1 for the same number of steps is in docs/training.md.
"""

from configs import demo


def get_config():
    c = demo.get_config()
    c.name = "demo_stage2"
    c.model.checkpoint = "runs/demo/final_model"
    c.data.batch_size = 32  # as measured in docs/training.md (the 10-minute demo has since changed these)
    c.loss.w1, c.loss.l1, c.loss.giou = 0.0, 2.0, 1.0
    c.optim.lr = c.optim.lr * 0.3
    c.optim.warmup_steps = 20
    c.train.steps = 300
    c.train.max_minutes = 0.0
    c.train.ckpt_every = 100
    c.stage2.ratio = 0.25
    c.stage2.method = "hungarian"
    c.stage2.iou_threshold = 0.5
    return c
