"""Human-object interaction on Qwen3-VL-8B with the spatial-linking module: the HOI seed's defaults (LoRA r 64 /
alpha 128 on every projection of the language model, lr 2e-5, vision tower frozen, the module always trainable,
batch 2 x 16 accumulation, 3 epochs' worth of steps on ~10K records), on HICO-DET referring and grounding records.

Prepare (once):
    # the released checkpoint, loaded as it is (the seed writes boxes as 0..1000 text: no coordinate vocabulary)
    # HOI records from the seed's simplified HICO-DET / SWIG-HOI JSON (docs/data.md, "Human-object interaction"):
    python tools/convert_dataset.py --format hico --input benchmarks_simplified/hico_action_referring_train.json \\
        --images data/hoi/images --out data/hoi/train_referring.jsonl
    (the same for the grounding file and the test files; then concatenate train_* into train.jsonl and test_* into
    val.jsonl)
Run:
    python -m coordexp_jax.train --config configs/hoi_qwen3vl_8b_lora.py --workdir runs/hoi_8b
The final model (LoRA merged, the module beside it) is WORKDIR/final_model; tools/export_hf.py writes the HF model
plus spatial_linking.safetensors / spatial_linking.json. Evaluation during training: greedy answers of up to 50
held-out records of each task (referring exact match / token F1, grounding AR), with attention heatmaps;
`--config.eval.bertscore_model=DIR` adds BERTScore with a local model directory (e.g. roberta-large saved with
save_pretrained; nothing is downloaded).
"""

from coordexp_jax.train.config import base_config


def get_config():
    c = base_config()
    c.name = "hoi_qwen3vl_8b_lora"
    c.model.preset = "8b"
    c.model.checkpoint = "/models/Qwen3-VL-8B-Instruct"
    c.model.dtype = "bfloat16"  # activations; params, the module and optimizer states stay float32
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.tokenizer.path = "/models/Qwen3-VL-8B-Instruct"
    c.model.spatial_linking.enabled = True
    c.model.spatial_linking.heads = 8  # the seed's SpatialLinkingModule(hidden_dim=4096, num_heads=8)
    c.model.spatial_linking.dim = 0  # attention width = the hidden size (4096)
    c.model.spatial_linking.dropout = 0.1
    c.model.spatial_linking.refine_mlp = True
    c.model.spatial_linking.max_boxes = 8
    c.model.spatial_linking.interaction_box = True  # person, object and their union box
    c.data.kind = "hoi"
    c.data.path = "data/hoi/train.jsonl"
    c.data.eval_path = "data/hoi/val.jsonl"
    c.data.protocol = "qwen_text"  # boxes as the released model writes them: 0..1000 integers in text
    c.data.hoi.box_text = "text"  # the seed's <|box_start|>(x1,y1),(x2,y2)<|box_end|>
    c.data.hoi.max_images = 2  # the tool-calling form: the image and its zoomed crop
    c.data.hoi.referring_weight = 1.0
    c.data.hoi.grounding_weight = 1.0
    c.data.image_size = 768
    c.data.seq_len = 2048
    c.data.batch_size = 2  # per_device_train_batch_size
    c.data.num_eval = 50
    c.loss.ce = 1.0  # text answers: cross-entropy on the assistant turns only
    c.loss.coord_ce = 0.0
    c.loss.soft_ce = 0.0
    c.loss.w1 = 0.0
    c.loss.gate = 0.0
    c.loss.l1 = 0.0
    c.loss.giou = 0.0
    c.loss.coord_positions = 0
    c.lora.enabled = True
    c.lora.rank = 64
    c.lora.alpha = 128.0
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # lora_target all
    c.lora.include_vision = False
    c.optim.lr = 2e-5
    c.optim.warmup_steps = 30
    c.optim.min_lr_ratio = 0.0
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.optim.vision.freeze = True  # freeze_vision_tower
    c.optim.linking.freeze = False  # train_spatial_linking: the module is always trainable
    c.optim.linking.lr_mult = 1.0
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.train.grad_accum = 16  # gradient_accumulation_steps: 32 rows per update
    c.train.steps = 940  # 3 epochs of ~10K records at 32 rows per update
    c.train.log_every = 10
    c.train.ckpt_every = 200
    c.train.ema_decay = 0.0
    c.eval.every = 200
    c.eval.num_images = 50  # per task
    c.eval.batch_size = 8
    c.eval.max_new_tokens = 64
    c.eval.num_pictures = 16
    c.eval.use_ema = False
    return c
