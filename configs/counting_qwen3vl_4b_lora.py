"""Sequential counting with regression heads on Qwen3-VL-4B with LoRA: the defaults of the VLM-regression counting
recipe (LoRA r 16, alpha 32 on the language model, 3-layer MLP heads on <x> / <y> with tanh, lr 1e-3 and 5e-3 for
the heads, batch 4, L1 on x and y, no "all counted" samples, 10 epochs of 200 steps with an evaluation after each).

Prepare (once): add <x> <y> (and the coordinate tokens) to the local HF checkpoint, and counting records (FSC-147 or
OmniCount-191 through tools/convert_dataset.py, or one class of a COCO file):
    python tools/expand_coord_vocab.py --src /models/Qwen3-VL-4B-Instruct --dst checkpoints/qwen3vl_4b_counting \\
        --with_regression
Run:
    python -m coordexp_jax.train --config configs/counting_qwen3vl_4b_lora.py --workdir runs/counting_4b
The final model (LoRA merged, heads beside it) is WORKDIR/final_model; tools/export_hf.py writes the HF model plus
regression_heads.safetensors / regression_heads.json.
"""

from coordexp_jax.train.config import base_config


def get_config():
    c = base_config()
    c.name = "counting_qwen3vl_4b_lora"
    c.train.kind = "counting_regression"
    c.model.checkpoint = "checkpoints/qwen3vl_4b_counting"
    c.model.dtype = "bfloat16"  # activations; params, heads and optimizer states stay float32
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.model.overrides.scan_layers = True  # decoder layers and ViT blocks stacked under lax.scan (docs/model.md)
    c.tokenizer.path = "checkpoints/qwen3vl_4b_counting"
    c.data.kind = "jsonl"
    c.data.path = "data/fsc147/train.jsonl"
    c.data.eval_path = "data/fsc147/val.jsonl"
    c.data.image_size = 768
    c.data.seq_len = 1024  # the recipe's system + user prompt (~150 tokens) and up to 576 image tokens at 768 px
    c.data.batch_size = 4
    c.data.num_eval = 50
    c.counting.head_layers = 3
    c.counting.head_width = 0  # the model's hidden size (2560)
    c.counting.loss = "l1"
    c.counting.order = "reading"
    c.counting.done_prob = 0.0  # no "all counted" samples (the recipe avoids the collapse to (-1, -1))
    c.counting.max_count = 200
    c.lora.enabled = True
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    c.lora.include_vision = False
    c.optim.lr = 1e-3
    c.optim.heads.lr_mult = 5.0  # 5e-3 for the heads
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.optim.vision.freeze = True
    c.optim.coord_rows.freeze = True  # the coordinate tokens are not used by this task
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.train.steps = 2000  # 10 epochs of 200 steps
    c.train.log_every = 10
    c.train.ckpt_every = 200
    c.eval.every = 200
    c.eval.num_images = 50
    c.eval.num_pictures = 16
    c.eval.use_ema = False
    return c
