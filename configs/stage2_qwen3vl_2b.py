"""Stage-2 rollout training of a Stage-1 CoordExp Qwen3-VL-2B (CoordExp's sparse mixing: 5% rollout steps).

    python -m coordexp_jax.train --config configs/stage2_qwen3vl_2b.py --workdir runs/stage2_2b \
        --config.model.checkpoint=runs/sft_2b/final_model
"""

from configs import sft_qwen3vl_2b


def get_config():
    c = sft_qwen3vl_2b.get_config()
    c.name = "stage2_qwen3vl_2b"
    c.model.checkpoint = "runs/sft_2b/final_model"
    c.optim.lr = 2e-6
    c.optim.warmup_steps = 50
    c.train.steps = 2000
    c.stage2.ratio = 0.05
    c.stage2.method = "hungarian"
    c.stage2.iou_threshold = 0.5
    c.stage2.max_new_tokens = 1024
    return c
