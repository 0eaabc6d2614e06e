"""GRPO of the released Qwen3-VL-2B-Instruct with LoRA, answering in Qwen's own text format (`qwen_text`: no added
coordinate tokens, so the checkpoint is used as released), on grounding records (the mmkd converter's output).

Prepare the records once (MMKD-RL-Grounding JSON -> the project's JSONL; see docs/data.md):
    python tools/convert_dataset.py --format mmkd --input data/mmkd/train.json --images data/mmkd/images \
        --out data/mmkd/train.jsonl
Run (one GPU/TPU host):
    python -m coordexp_jax.train --config configs/grpo_qwen3vl_2b.py --workdir runs/grpo_2b
Several sources (e.g. mmkd + RefCOCO) are fused by weight with `--config.data.kind=fusion
--config.data.path=<a fusion config in configs/fusion/>`.

The recipe of the MMKD-RL-Grounding seed (coordexp_method.md §8): G = 8 samples per prompt at temperature 1,
multi-box format + Gaussian point + Gaussian plane rewards, advantages (r - mean) / (std + 1e-4), PPO clip 0.2,
k3 KL with beta 0.04 to the reference - here the base model with the adapters switched off (no second copy).
"""

from coordexp_jax.train.config import base_config


def get_config():
    c = base_config()
    c.name = "grpo_qwen3vl_2b"
    c.train.kind = "grpo"
    c.model.checkpoint = "/models/Qwen3-VL-2B-Instruct"  # the released HF directory, unexpanded
    c.tokenizer.path = "/models/Qwen3-VL-2B-Instruct"
    c.model.dtype = "bfloat16"  # activations; the LoRA adapters and their optimizer state stay float32
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.model.overrides.scan_layers = True  # decoder layers and ViT blocks stacked under lax.scan (docs/model.md)
    c.lora.enabled = True
    c.lora.rank = 64
    c.lora.alpha = 128.0
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    c.optim.vision.freeze = True
    c.optim.coord_rows.freeze = True  # qwen_text writes coordinates as text: no coordinate rows to train
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 20
    c.optim.schedule = "constant"
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.data.kind = "jsonl"
    c.data.path = "data/mmkd/train.jsonl"
    c.data.eval_path = "data/mmkd/val.jsonl"
    c.data.image_size = 768
    c.data.max_objects = 16
    c.data.seq_len = 2048
    c.data.batch_size = 8  # prompts per step: 8 x G = 64 rollouts
    c.data.worker_count = 4
    c.grpo.protocol = "qwen_text"
    c.grpo.num_generations = 8
    c.grpo.temperature = 1.0
    c.grpo.top_k = 0
    c.grpo.top_p = 1.0
    c.grpo.max_new_tokens = 256
    c.grpo.rewards.multi_box_format = 1.0
    c.grpo.rewards.multi_gaussian_point = 1.0
    c.grpo.rewards.multi_gaussian_plane = 1.0
    c.grpo.advantage = "grpo"
    c.grpo.advantage_eps = 1e-4
    c.grpo.epsilon = 0.2
    c.grpo.epsilon_high = 0.2
    c.grpo.beta = 0.04
    c.grpo.mu = 1
    c.grpo.logp_chunk = 512  # never [B, T, 152k] logits
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.train.steps = 1000
    c.train.log_every = 5
    c.train.ckpt_every = 100
    c.eval.every = 200
    c.eval.num_images = 200
    c.eval.max_new_tokens = 256
    return c
