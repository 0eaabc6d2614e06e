"""Stage-1 SFT of Qwen3-VL-4B with LoRA (rank 64) on the language model, the coordinate-token rows fully
trainable, the vision tower frozen, on the COCO + RefCOCO fusion. Prepare the checkpoint as in sft_qwen3vl_2b.py.

    python -m coordexp_jax.train --config configs/sft_qwen3vl_4b_lora.py --workdir runs/sft_4b_lora
The final model (LoRA merged) is written to WORKDIR/final_model; tools/export_hf.py turns it into an HF directory.
"""

from coordexp_jax.train.config import base_config


def get_config():
    c = base_config()
    c.name = "sft_qwen3vl_4b_lora"
    c.model.checkpoint = "checkpoints/qwen3vl_4b_coord"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.tokenizer.path = "checkpoints/qwen3vl_4b_coord"
    c.data.kind = "fusion"
    c.data.path = "configs/fusion/coco_refcoco.py"
    c.data.eval_path = "data/coco/val2017.jsonl"
    c.data.image_size = 768
    c.data.max_objects = 64
    c.data.seq_len = 2048
    c.data.batch_size = 32
    c.data.worker_count = 8
    c.loss.ce = 1.0
    c.loss.coord_ce = 1.0
    c.loss.soft_ce = 1.0
    c.loss.w1 = 1.0
    c.loss.gate = 2.0
    c.loss.l1 = 1.0
    c.loss.giou = 1.0
    c.loss.tau = 0.7
    c.loss.ce_chunk = 512
    c.lora.enabled = True
    c.lora.rank = 64
    c.lora.alpha = 128.0
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 300
    c.optim.min_lr_ratio = 0.1
    c.optim.weight_decay = 0.0
    c.optim.vision.freeze = True
    c.optim.merger.lr_mult = 0.5  # the merger is not LoRA-adapted: with LoRA on it stays frozen (base weights)
    c.optim.coord_rows.lr_mult = 1.0
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.train.steps = 15000
    c.train.log_every = 20
    c.train.ckpt_every = 1000
    c.eval.every = 2000
    c.eval.num_images = 500
    c.eval.max_new_tokens = 1024
    return c
