"""Stage-1 SFT of Qwen3-VL-4B with LoRA (rank 64) on the language model, the coordinate-token rows fully
trainable, the vision tower frozen, on the COCO + RefCOCO fusion. Prepare the checkpoint as in sft_qwen3vl_2b.py.

    python -m coordexp_jax.train --config configs/sft_qwen3vl_4b_lora.py --workdir runs/sft_4b_lora
The final model (LoRA merged) is written to WORKDIR/final_model; tools/export_hf.py turns it into an HF directory.
Data, losses and evaluation are those of sft_qwen3vl_2b.py; what differs is below.
"""

from configs import sft_qwen3vl_2b


def get_config():
    c = sft_qwen3vl_2b.get_config()
    c.name = "sft_qwen3vl_4b_lora"
    c.model.checkpoint = "checkpoints/qwen3vl_4b_coord"
    c.tokenizer.path = "checkpoints/qwen3vl_4b_coord"
    c.lora.enabled = True
    c.lora.rank = 64
    c.lora.alpha = 128.0
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 300
    c.optim.weight_decay = 0.0
    c.optim.vision.freeze = True
    c.optim.vision.lr_mult = 1.0
    c.optim.merger.lr_mult = 0.5  # the merger is not LoRA-adapted: with LoRA on it stays frozen (base weights)
    c.optim.coord_rows.lr_mult = 1.0
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.train.steps = 15000
    return c
