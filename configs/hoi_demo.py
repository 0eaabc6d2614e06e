"""Human-object interaction on the CPU: the detection demo's tiny model from random init with the spatial-linking
module, on the synthetic HOI set (stick figures and objects, actions defined by geometry, 2-3 pairs per image;
generated on first use under ~/.cache/coordexp_jax). Referring (person and object boxes -> "kicking ball") and
grounding ("Who is kicking a ball?" -> the person and ball boxes) rows are mixed 1:1 and trained with the Stage-1
objective (CE on the assistant turns, the coordinate losses on the answer's coordinate tokens).

    python -m coordexp_jax.train --config configs/hoi_demo.py --workdir runs/hoi_demo
    # variants (docs/training.md, "Human-object interaction"):
    #   --config.model.spatial_linking.enabled=False          the plain model (the boxes only as prompt tokens)
    #   --config.model.spatial_linking.interaction_box=False  no union box: person and object boxes only

Settings:
- the demo's tiny model and its overrides (head_dim 32 with mrope_section (4, 6, 6), initializer_range 0.1:
  configs/demo.py says why), full training (no LoRA: the weights start random);
- spatial linking on: 4 heads over the 64-wide embeddings, the refine MLP, no attention dropout (at this size the
  box tokens see 1-6 visual tokens; dropping one of them is most of the signal), at most 8 boxes per row;
- boxes written as coordinate tokens (`data.hoi.box_text = 'tokens'`: 4 tokens a box instead of ~13 for the
  0..1000 text), so the grounding answers (two labelled boxes) fit the 128-token bucket and get soft CE / W1;
- 160 px images (5 x 5 merged visual tokens of 32 px); evaluation on 32 held-out records of each task with the
  16 worst pictures of each and the attention heatmaps of the referring ones.
"""

import os

from coordexp_jax.train.config import base_config, load_config_file


def get_config():
    c = base_config()
    c.name = "hoi_demo"
    c.model = load_config_file(os.path.join(os.path.dirname(__file__), "demo.py")).model  # the demo's tiny model
    c.model.spatial_linking.enabled = True
    c.model.spatial_linking.heads = 4
    c.model.spatial_linking.dropout = 0.0
    c.model.spatial_linking.refine_mlp = True
    c.model.spatial_linking.max_boxes = 8
    c.model.spatial_linking.interaction_box = True
    c.data.kind = "hoi"
    c.data.path = ""  # '' = the synthetic HOI set
    c.data.image_size = 160
    c.data.num_train = 2048  # images (2-3 pairs each: one referring and one grounding record per pair)
    c.data.num_eval = 32
    c.data.hoi.box_text = "tokens"
    c.data.hoi.min_pairs = 2
    c.data.hoi.max_pairs = 3
    c.data.hoi.referring_weight = 1.0
    c.data.hoi.grounding_weight = 1.0
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.loss.ce = 1.0
    c.loss.coord_ce = 0.0
    c.loss.soft_ce = 0.5
    c.loss.w1 = 0.5
    c.loss.gate = 1.0
    c.loss.l1 = 0.0
    c.loss.giou = 0.0
    c.loss.tau = 1.0
    c.loss.coord_positions = 8  # a grounding answer: 2 boxes x 4 coordinates
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 100
    c.optim.min_lr_ratio = 0.05
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.train.steps = 2000
    c.train.log_every = 10
    c.train.ckpt_every = 500
    c.train.ema_decay = 0.0
    c.train.max_minutes = 10.0
    c.eval.every = 0
    c.eval.at_end = True
    c.eval.num_images = 32  # per task: every held-out record the run keeps (data.num_eval = 32 of each task)
    c.eval.batch_size = 32
    c.eval.max_new_tokens = 32
    c.eval.num_pictures = 16
    c.eval.use_ema = False
    return c
