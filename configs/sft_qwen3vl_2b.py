"""Stage-1 SFT of Qwen3-VL-2B (full fine-tuning) on the COCO + RefCOCO fusion.

Prepare (once): add the coordinate vocabulary to the local HF checkpoint (no network is used)
    python tools/expand_coord_vocab.py --src /models/Qwen3-VL-2B-Instruct --dst checkpoints/qwen3vl_2b_coord
Run (one GPU/TPU host; several hosts: see docs/training.md):
    python -m coordexp_jax.train --config configs/sft_qwen3vl_2b.py --workdir runs/sft_2b
"""

from coordexp_jax.train.config import base_config


def get_config():
    c = base_config()
    c.name = "sft_qwen3vl_2b"
    c.model.checkpoint = "checkpoints/qwen3vl_2b_coord"
    c.model.dtype = "bfloat16"  # activations; params and optimizer states stay float32
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.model.overrides.scan_layers = True  # decoder layers and ViT blocks stacked under lax.scan (docs/model.md)
    c.tokenizer.path = "checkpoints/qwen3vl_2b_coord"
    c.data.kind = "fusion"
    c.data.path = "configs/fusion/coco_refcoco.py"
    c.data.eval_path = "data/coco/val2017.jsonl"
    c.data.image_size = 768
    c.data.max_objects = 64
    c.data.seq_len = 2048
    c.data.batch_size = 32
    c.data.worker_count = 8
    # CoordExp's known-good Stage-1 weights (coordexp_method.md §5) + the expectation-box geometry of this project
    c.loss.ce = 1.0
    c.loss.coord_ce = 1.0
    c.loss.soft_ce = 1.0
    c.loss.w1 = 1.0
    c.loss.gate = 2.0
    c.loss.l1 = 1.0
    c.loss.giou = 1.0
    c.loss.tau = 0.7
    c.loss.sigma = 1.0
    c.loss.truncate = 8
    c.loss.ce_chunk = 512  # never materialise [B, S, 152k] logits
    c.optim.lr = 2e-5
    c.optim.warmup_steps = 500
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.05
    c.optim.clip_norm = 1.0
    c.optim.vision.lr_mult = 0.1
    c.optim.merger.lr_mult = 1.0
    c.optim.coord_rows.lr_mult = 5.0
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.train.steps = 20000
    c.train.grad_accum = 1
    c.train.log_every = 20
    c.train.ckpt_every = 1000
    c.train.keep_n = 3
    c.eval.every = 2000
    c.eval.num_images = 500
    c.eval.max_new_tokens = 1024
    return c
