"""The training config schema: every key a config file may set, its type and its allowed range.

A config file (`configs/*.py`) defines `get_config()` returning `base_config()` with some values changed. At start-up
`validate(cfg)` checks the result against `base_config()`: an unknown key, a value of the wrong type or a value out of
range raises `ConfigError` naming the dotted key (`optim.lr`). The resolved config is written to the workdir.

Keys whose value is a free-form mapping (`model.overrides`: fields of `model.config.ModelConfig`) are listed in
`FREE_KEYS`; their contents are checked where they are used.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from coordexp_jax.errors import CoordExpError

# Logical parameter axis names -> mesh axes. `None` replicates. The first matching rule wins; a mesh axis is used at
# most once per array (a later dimension that would reuse it is replicated).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("norm", None),
    ("lora_rank", None),
)

# Parameter groups: the first regex (re.search on the '/'-joined parameter path) that matches names the group;
# parameters matching none belong to 'lm'.
DEFAULT_GROUP_PATTERNS = (
    ("merger", r"(^|/)(merger|deepstack_merger\w*)(/|$)"),
    ("vision", r"(^|/)(vision|visual)\w*(/|$)"),
)

FREE_KEYS = ("model.overrides",)


def _group(lr_mult: float = 1.0, freeze: bool = False) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"lr_mult": lr_mult, "freeze": freeze})


def base_config() -> ml_collections.ConfigDict:
    """Every key a training config may set, with its default value (which also fixes its type)."""
    c = ml_collections.ConfigDict()
    c.name = "run"

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # a preset of model.config ('tiny', '2b', '4b', ...)
    c.model.checkpoint = ""  # '' = random init; else a local HF dir or one of our orbax checkpoints
    c.model.dtype = "float32"  # compute dtype of activations
    c.model.param_dtype = "float32"
    c.model.remat = False
    # self-attention implementation (ModelConfig.attention, model/attention.py): 'dense' (reference), 'blockwise'
    # (memory-efficient, any backend), 'cudnn' (GPU flash attention, bf16/fp16 compute), 'splash' (TPU Pallas kernel)
    c.model.attention = "dense"
    c.model.overrides = ml_collections.ConfigDict()  # ModelConfig fields (free-form, checked by ModelConfig)
    c.model.coord_init = "random"  # 'random' | 'sinusoidal': init of the coordinate-token embedding rows
    c.model.vision_pos_init = "random"  # 'random' | 'sinusoidal': init of the ViT's position table (random init)
    c.model.vision_pos_std = 0.5  # per-element std of the sinusoidal position table
    # Spatial linking (model/spatial_linking.py, the HOI seed): each box-end token cross-attends to the visual tokens
    # inside its box before the decoder. Disabled: the model is exactly Qwen3-VL (no extra parameters).
    c.model.spatial_linking = ml_collections.ConfigDict()
    c.model.spatial_linking.enabled = False
    c.model.spatial_linking.heads = 8  # attention heads (divide the width)
    c.model.spatial_linking.dim = 0  # attention width D; 0 = the model's hidden size (the seed's module)
    c.model.spatial_linking.dropout = 0.1  # attention-weight dropout (training steps only)
    c.model.spatial_linking.refine_mlp = True  # residual MLP after the attention (the seed's use_refine_mlp)
    c.model.spatial_linking.zero_init = True  # output projection starts at 0 (training starts at Qwen3-VL)
    c.model.spatial_linking.max_boxes = 8  # N: box slots per sample (static shape of the batch's link_* arrays)
    c.model.spatial_linking.interaction_box = True  # the data adds the person-object union box where asked

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # '' = the project's small tokenizer

    c.data = ml_collections.ConfigDict()
    c.data.kind = "synthetic"  # 'synthetic' | 'jsonl' | 'fusion'
    c.data.path = ""  # records file/dir (jsonl), fusion preset/yaml (fusion), cache dir (synthetic; '' = workdir)
    c.data.eval_path = ""
    c.data.protocol = "coordjson"
    c.data.image_size = 128  # longest side in pixels after smart_resize (max_pixels = image_size**2)
    c.data.max_objects = 8
    c.data.seq_len = 256  # text bucket (power of two)
    c.data.batch_size = 8  # global batch per micro-batch
    c.data.num_train = 2048  # synthetic set size
    c.data.num_eval = 64
    c.data.num_classes = 3
    c.data.min_objects = 1
    c.data.seed = 0
    c.data.worker_count = 0
    c.data.synthetic_task = "detection"  # synthetic records read: 'detection' or 'grounding' (one per unique phrase)
    # Human-object interaction (data.kind = 'hoi', data/hoi.py): data.path '' = the synthetic HOI set (cached under
    # ~/.cache/coordexp_jax), else an HOI records file (JSONL or a JSON list; data.eval_path likewise). N (link slots)
    # and the interaction box come from model.spatial_linking (max_boxes, interaction_box).
    c.data.hoi = ml_collections.ConfigDict()
    c.data.hoi.referring_weight = 1.0  # share of referring rows in the mix (0 = none)
    c.data.hoi.grounding_weight = 1.0  # share of grounding rows (0 = none); records without task_type weigh 1
    c.data.hoi.box_text = "text"  # boxes written as 'text' (the seed's (x1,y1),(x2,y2), 0..1000) or 'tokens' (coords)
    c.data.hoi.max_images = 1  # image slots per row (2 for the tool-calling form: the image and the zoomed crop)
    c.data.hoi.refer_format = "qwen1000"  # units of records' refer_boxes: 'qwen1000' (the seed) or 'pixel'
    c.data.hoi.system_prompt = ""  # system turn for records without one ('' = none)
    c.data.hoi.min_pairs = 2  # synthetic set: (person, object) pairs per image
    c.data.hoi.max_pairs = 3
    c.data.hoi.tool_ratio = 0.0  # synthetic set: fraction of referring records in the tool-calling form

    c.loss = ml_collections.ConfigDict()
    c.loss.ce = 1.0
    c.loss.coord_ce = 0.0
    c.loss.soft_ce = 0.0
    c.loss.w1 = 0.0
    c.loss.gate = 0.0
    c.loss.text_gate = 0.0
    c.loss.l1 = 0.0
    c.loss.giou = 0.0
    c.loss.smooth_l1 = 0.0
    c.loss.ciou = 0.0
    c.loss.tau = 1.0
    c.loss.sigma = 1.0
    c.loss.truncate = 8
    c.loss.ce_chunk = 0  # sequence chunk of the chunked CE (0 = whole sequence)
    c.loss.coord_positions = 0  # K > 0: coord_ce/soft_ce/w1 at the first K coordinate targets per row (0 = all)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "cosine"  # 'cosine' | 'constant'
    c.optim.min_lr_ratio = 0.0  # final lr of the cosine as a fraction of lr
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0  # global-norm clipping of the trainable gradients (0 = off)
    c.optim.lm = _group()
    c.optim.vision = _group()
    c.optim.merger = _group()
    c.optim.coord_rows = _group()  # rows of the coordinate tokens in the embedding (and an untied lm_head)
    c.optim.heads = _group(lr_mult=5.0)  # regression heads (train.kind 'counting_regression'); trainable under LoRA
    c.optim.linking = _group()  # spatial-linking module (model.spatial_linking); trainable under LoRA
    c.optim.group_patterns = DEFAULT_GROUP_PATTERNS
    c.optim.coord_row_params = (r"embed_tokens", r"lm_head")  # regexes of params whose rows are vocabulary rows

    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = False
    c.lora.rank = 8
    c.lora.alpha = 16.0
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    c.lora.include_vision = False

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = DEFAULT_RULES

    c.train = ml_collections.ConfigDict()
    c.train.kind = "sft"  # 'sft' (Stage-1, with Stage-2 steps when stage2.ratio > 0) | 'grpo' (train/grpo_loop.py)
    # | 'counting_regression' (train/counting_loop.py)
    c.train.steps = 100
    c.train.grad_accum = 1
    c.train.seed = 0
    c.train.log_every = 10
    c.train.ckpt_every = 100
    c.train.keep_n = 3
    c.train.async_checkpoint = True
    c.train.nan_policy = "stop"  # 'stop' | 'skip'
    c.train.ema_decay = 0.0  # 0 = no EMA
    c.train.max_minutes = 0.0  # stop (and checkpoint) after this many minutes of training (0 = no limit)
    c.train.progress = True
    c.train.tensorboard = True

    c.eval = ml_collections.ConfigDict()
    c.eval.kind = "detection"  # 'detection' (rollouts + COCO AP) | 'loss' (teacher-forced validation loss)
    c.eval.every = 0  # steps between evaluations (0 = only at the end, if eval.at_end)
    c.eval.at_end = True
    c.eval.num_images = 64
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 128
    c.eval.num_pictures = 0  # pictures in the evaluation report (worst images first); 0 = one for every image
    c.eval.use_ema = True
    # HOI referring (data.kind 'hoi'): BERTScore with this local transformers model directory ('' = off;
    # metrics_hoi.bertscore, nothing is downloaded)
    c.eval.bertscore_model = ""

    # Loggers beside metrics.jsonl and TensorBoard (train/metrics_log.py).
    c.log = ml_collections.ConfigDict()
    c.log.num_pictures = 16  # evaluation pictures (worst first) sent to TensorBoard and W&B per evaluation
    c.log.wandb = ml_collections.ConfigDict()
    c.log.wandb.project = ""  # '' = no Weights & Biases (wandb is not imported)
    c.log.wandb.entity = ""  # '' = the logged-in user's default entity
    c.log.wandb.mode = "online"  # 'online' | 'offline' (written under log.wandb.dir; `wandb sync` later) | 'disabled'
    c.log.wandb.name = ""  # run name; '' = the workdir's name
    c.log.wandb.group = ""  # run group (a sweep's name)
    c.log.wandb.dir = ""  # where wandb writes its run directory; '' = the workdir

    # Stage-2 rollout training (train/stage2.py): step s is a rollout step iff floor((s+1)*ratio) > floor(s*ratio).
    c.stage2 = ml_collections.ConfigDict()
    c.stage2.ratio = 0.0  # 0 = plain Stage-1
    c.stage2.method = "hungarian"  # 'hungarian' | 'sinkhorn'
    c.stage2.iou_threshold = 0.5  # matched pairs below this IoU are not accepted
    c.stage2.l1_weight = 1.0
    c.stage2.giou_weight = 1.0
    c.stage2.desc_weight = 8.0  # matching cost of a description mismatch
    c.stage2.use_expectation = True  # match with the rollout's expectation boxes
    c.stage2.max_new_tokens = 0  # rollout length; 0 = eval.max_new_tokens

    # GRPO (train.kind = 'grpo', train/grpo_loop.py): G sampled answers per prompt, rewards, group advantages,
    # PPO-clip objective with a k3 KL to the starting weights (coordexp_method.md §8). train.steps counts rollout
    # batches; each is used for `mu` optimizer updates.
    c.grpo = ml_collections.ConfigDict()
    c.grpo.num_generations = 8  # G: samples per prompt (a step rolls out data.batch_size x G answers)
    c.grpo.temperature = 1.0  # sampling temperature (> 0); log-probs are taken at the same temperature
    c.grpo.top_k = 0  # 0 = off
    c.grpo.top_p = 1.0  # 1 = off
    c.grpo.max_new_tokens = 0  # rollout length; 0 = eval.max_new_tokens
    c.grpo.rewards = _reward_weights()  # reward name (rl/rewards.py REWARDS) -> weight; 0 = not computed
    c.grpo.advantage = "grpo"  # rl/advantages.py kind
    c.grpo.advantage_eps = 1e-4  # (r - mean) / (std + eps)
    c.grpo.epsilon = 0.2  # PPO clip: ratio in [1 - epsilon, 1 + epsilon_high]
    c.grpo.epsilon_high = 0.2
    c.grpo.beta = 0.04  # weight of the k3 KL to the reference (the starting weights; with LoRA: adapters off)
    c.grpo.mu = 1  # optimizer updates per rollout batch (old log-probs recorded before the first)
    c.grpo.aggregation = "seq_mean_token_mean"  # train/grpo.py AGGREGATIONS (this one: DeepSeekMath's GRPO form)
    c.grpo.protocol = ""  # answer protocol of prompts and rollouts; '' = data.protocol (else it replaces it)
    c.grpo.logp_chunk = 256  # sequence chunk of the log-prob head (no [B, T, V] logits)

    # Sequential counting with regression heads (train.kind = 'counting_regression', train/counting_loop.py,
    # model/regression.py): two MLP heads read the final hidden states at the prompt's <x> and <y> tokens.
    c.counting = ml_collections.ConfigDict()
    c.counting.head_layers = 3  # Linear layers per head (the last maps to 1 output, then tanh)
    c.counting.head_width = 0  # hidden width of the heads; 0 = the model's hidden size
    c.counting.loss = "l1"  # 'l1' | 'mse' | 'smooth_l1' on x and y (normalised [-1, 1] units)
    c.counting.smooth_l1_beta = 0.1  # transition point of smooth L1 (normalised units)
    c.counting.order = "reading"  # counting order of the objects (data/counting.py orderings; 'random': set target)
    c.counting.target = "ordered"  # 'ordered' (the (k+1)-th object) | 'set' (loss vs the nearest unmarked object)
    c.counting.set_band = 0.0  # set target, left to right: candidates within this of the next x (0: all unmarked)
    c.counting.mark_jitter = 0.0  # training marks at a random point of the object's box shrunk by this (0: centre)
    c.counting.done_prob = 0.0  # fraction of "all counted" samples (target (-1, -1)); 0 as in the seed recipe
    c.counting.max_count = 16  # sequential inference stops after this many points
    c.counting.template = ""  # user prompt template ending in "<x> <y>" (data/counting.py fields); '' = the seed's
    c.counting.system_prompt = True  # the seed's system turn ("You are a vision assistant that locates ...")
    c.counting.grad_check = True  # first step: gradients must reach the heads and the LoRA weights (else an error)
    c.counting.point_tokens = False  # also train CoordExp's point-token answer (task 'counting') on the same images
    c.counting.qk_scale = 1.0  # at the start: the language model's q_norm scales x this (attention logits x this)
    return c


# The reward set of the MMKD-RL-Grounding multi-box recipe (format + Gaussian point + Gaussian plane); every other
# registered reward is listed with weight 0 so that a config may turn it on (and a typo is an unknown key).
_DEFAULT_REWARDS = {"multi_box_format": 1.0, "multi_gaussian_point": 1.0, "multi_gaussian_plane": 1.0}


def _reward_weights() -> ml_collections.ConfigDict:
    from coordexp_jax.rl.rewards import REWARDS

    return ml_collections.ConfigDict({k: float(_DEFAULT_REWARDS.get(k, 0.0)) for k in sorted(REWARDS)})


class ConfigError(CoordExpError, ValueError):
    """A config value that is unknown, of the wrong type or out of range; the message names the key."""


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _mesh_size(v):
    return v == -1 or v >= 1


def _prob(v):
    return 0.0 <= v < 1.0


def _one_of(*choices) -> Callable[[Any], bool]:
    f = lambda v: v in choices  # noqa: E731
    f.__doc__ = f"one of {choices}"
    return f


_DTYPES = ("float32", "bfloat16", "float16")

# Range checks: dotted key (or '*.suffix' for every group) -> (predicate, description).
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.dtype": (_one_of(*_DTYPES), f"one of {_DTYPES}"),
    "model.param_dtype": (_one_of(*_DTYPES), f"one of {_DTYPES}"),
    "model.coord_init": (_one_of("random", "sinusoidal"), "'random' or 'sinusoidal'"),
    "model.vision_pos_init": (_one_of("random", "sinusoidal"), "'random' or 'sinusoidal'"),
    "model.vision_pos_std": (_positive, "> 0"),
    "model.attention": (_one_of("dense", "blockwise", "cudnn", "splash"), "'dense', 'blockwise', 'cudnn' or 'splash'"),
    "model.spatial_linking.heads": (_positive, "> 0"),
    "model.spatial_linking.dim": (_non_negative, ">= 0"),
    "model.spatial_linking.dropout": (_prob, "in [0, 1)"),
    "model.spatial_linking.max_boxes": (_positive, "> 0"),
    "data.kind": (_one_of("synthetic", "jsonl", "fusion", "hoi"), "'synthetic', 'jsonl', 'fusion' or 'hoi'"),
    "data.hoi.referring_weight": (_non_negative, ">= 0"),
    "data.hoi.grounding_weight": (_non_negative, ">= 0"),
    "data.hoi.box_text": (_one_of("text", "tokens"), "'text' or 'tokens'"),
    "data.hoi.max_images": (_positive, "> 0"),
    "data.hoi.refer_format": (_one_of("qwen1000", "pixel"), "'qwen1000' or 'pixel'"),
    "data.hoi.min_pairs": (lambda v: 1 <= v <= 4, "in 1..4"),
    "data.hoi.max_pairs": (lambda v: 1 <= v <= 4, "in 1..4"),
    "data.hoi.tool_ratio": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "data.image_size": (_positive, "> 0"),
    "data.max_objects": (_positive, "> 0"),
    "data.seq_len": (lambda v: v > 0 and (v & (v - 1)) == 0, "a power of two"),
    "data.batch_size": (_positive, "> 0"),
    "data.num_train": (_positive, "> 0"),
    "data.num_eval": (_non_negative, ">= 0"),
    "data.num_classes": (_positive, "> 0"),
    "data.min_objects": (_non_negative, ">= 0"),
    "data.worker_count": (_non_negative, ">= 0"),
    "loss.tau": (_positive, "> 0"),
    "loss.sigma": (_positive, "> 0"),
    "loss.truncate": (_non_negative, ">= 0"),
    "loss.ce_chunk": (_non_negative, ">= 0"),
    "loss.coord_positions": (_non_negative, ">= 0"),
    "optim.lr": (_non_negative, ">= 0"),
    "optim.warmup_steps": (_non_negative, ">= 0"),
    "optim.schedule": (_one_of("cosine", "constant"), "'cosine' or 'constant'"),
    "optim.min_lr_ratio": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "optim.b1": (_prob, "in [0, 1)"),
    "optim.b2": (_prob, "in [0, 1)"),
    "optim.eps": (_positive, "> 0"),
    "optim.weight_decay": (_non_negative, ">= 0"),
    "optim.clip_norm": (_non_negative, ">= 0"),
    "optim.*.lr_mult": (_non_negative, ">= 0"),
    "lora.rank": (_positive, "> 0"),
    "lora.alpha": (_positive, "> 0"),
    "mesh.data": (_mesh_size, "-1 or >= 1"),
    "mesh.fsdp": (_mesh_size, "-1 or >= 1"),
    "mesh.tensor": (_mesh_size, "-1 or >= 1"),
    "train.steps": (_positive, "> 0"),
    "train.grad_accum": (_positive, "> 0"),
    "train.log_every": (_positive, "> 0"),
    "train.ckpt_every": (_non_negative, ">= 0"),
    "train.keep_n": (_positive, "> 0"),
    "train.nan_policy": (_one_of("stop", "skip"), "'stop' or 'skip'"),
    "train.ema_decay": (_prob, "in [0, 1)"),
    "train.max_minutes": (_non_negative, ">= 0"),
    "eval.every": (_non_negative, ">= 0"),
    "eval.kind": (_one_of("detection", "loss"), "'detection' or 'loss'"),
    "eval.num_images": (_non_negative, ">= 0"),
    "eval.batch_size": (_positive, "> 0"),
    "eval.max_new_tokens": (_positive, "> 0"),
    "eval.num_pictures": (_non_negative, ">= 0"),
    "log.num_pictures": (_non_negative, ">= 0"),
    "log.wandb.mode": (_one_of("online", "offline", "disabled"), "'online', 'offline' or 'disabled'"),
    "stage2.ratio": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "stage2.method": (_one_of("hungarian", "sinkhorn"), "'hungarian' or 'sinkhorn'"),
    "stage2.iou_threshold": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "stage2.l1_weight": (_non_negative, ">= 0"),
    "stage2.giou_weight": (_non_negative, ">= 0"),
    "stage2.desc_weight": (_non_negative, ">= 0"),
    "stage2.max_new_tokens": (_non_negative, ">= 0"),
    "data.synthetic_task": (_one_of("detection", "grounding"), "'detection' or 'grounding'"),
    "train.kind": (_one_of("sft", "grpo", "counting_regression"), "'sft', 'grpo' or 'counting_regression'"),
    "counting.head_layers": (_positive, ">= 1"),
    "counting.head_width": (_non_negative, ">= 0"),
    "counting.loss": (_one_of("l1", "mse", "smooth_l1"), "'l1', 'mse' or 'smooth_l1'"),
    "counting.smooth_l1_beta": (_positive, "> 0"),
    "counting.order": (_one_of("reading", "left_to_right", "nearest_neighbour", "random"),
                       "'reading', 'left_to_right', 'nearest_neighbour' or 'random'"),
    "counting.target": (_one_of("ordered", "set"), "'ordered' or 'set'"),
    "counting.mark_jitter": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "counting.set_band": (_non_negative, ">= 0"),
    "counting.done_prob": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "counting.max_count": (_positive, "> 0"),
    "grpo.num_generations": (lambda v: v >= 2, ">= 2 (advantages compare samples of one prompt)"),
    "grpo.temperature": (_positive, "> 0"),
    "grpo.top_k": (_non_negative, ">= 0"),
    "grpo.top_p": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "grpo.max_new_tokens": (_non_negative, ">= 0"),
    "grpo.advantage_eps": (_non_negative, ">= 0"),
    "grpo.epsilon": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    "grpo.epsilon_high": (_non_negative, ">= 0"),
    "grpo.beta": (_non_negative, ">= 0"),
    "grpo.mu": (_positive, ">= 1"),
    "grpo.logp_chunk": (_positive, "> 0"),
    "grpo.rewards.*": (_non_negative, ">= 0"),
}

_LOSS_WEIGHTS = ("ce", "coord_ce", "soft_ce", "w1", "gate", "text_gate", "l1", "giou", "smooth_l1", "ciou")
for _k in _LOSS_WEIGHTS:
    RANGES[f"loss.{_k}"] = (_non_negative, ">= 0")


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return True


def _type_name(default: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", tuple: "tuple", list: "tuple"}.get(
        type(default), type(default).__name__
    )


def _range_check(key: str, value: Any) -> None:
    check = RANGES.get(key)
    if check is None and key.count(".") == 2:  # optim.<group>.lr_mult, grpo.rewards.<name>
        head, mid, leaf = key.split(".")
        check = RANGES.get(f"{head}.*.{leaf}") or RANGES.get(f"{head}.{mid}.*")
    if check is not None and not check[0](value):
        raise ConfigError(f"config key '{key}' = {value!r} is out of range: must be {check[1]}")


def _walk(cfg: Any, schema: Any, prefix: str) -> None:
    for key in cfg.keys():
        dotted = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema.keys()), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        value, default = cfg[key], schema[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, (ml_collections.ConfigDict, dict)):
                raise ConfigError(f"config key '{dotted}' must be a section (ConfigDict), got {value!r}")
            if dotted in FREE_KEYS:
                continue
            _walk(value, default, dotted + ".")
            continue
        if not _type_ok(value, default):
            raise ConfigError(
                f"config key '{dotted}' must be {_type_name(default)}, got {type(value).__name__} {value!r}"
            )
        _range_check(dotted, value)


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks `cfg` against `base_config()` and cross-key constraints; returns a copy with every default filled in.

    Raises:
      ConfigError: naming the dotted key that is unknown, of the wrong type or out of range.
    """
    schema = base_config()
    _walk(cfg, schema, "")
    full = base_config()
    with full.unlocked():
        _merge(full, cfg)
    for name, rule in full.mesh.rules:
        if not isinstance(name, str):
            raise ConfigError(f"config key 'mesh.rules': logical name {name!r} must be a string")
        axes = rule if isinstance(rule, (tuple, list)) else (rule,)
        for ax in axes:
            if ax not in (None, "data", "fsdp", "tensor"):
                raise ConfigError(f"config key 'mesh.rules': rule for '{name}' names unknown mesh axis {ax!r}")
    groups = {"lm", "vision", "merger"}
    for g, pattern in full.optim.group_patterns:
        if g not in groups:
            raise ConfigError(f"config key 'optim.group_patterns': unknown group {g!r} (groups: {sorted(groups)})")
    sl = full.model.spatial_linking
    if sl.dim and sl.dim % sl.heads:
        raise ConfigError(f"config key 'model.spatial_linking.heads' = {sl.heads} must divide "
                          f"model.spatial_linking.dim = {sl.dim}")
    if full.data.eval_path and (full.data.kind == "synthetic" or (full.data.kind == "hoi" and not full.data.path)):
        raise ConfigError(f"config key 'data.eval_path' = {full.data.eval_path!r} is set, but the data is a generated "
                          "synthetic set (data.kind 'synthetic', or 'hoi' with data.path '') that uses its own held-out "
                          "split; set data.path too, or leave data.eval_path ''")
    if full.data.min_objects > full.data.max_objects:
        raise ConfigError("config key 'data.min_objects' must be <= data.max_objects")
    if full.data.hoi.min_pairs > full.data.hoi.max_pairs:
        raise ConfigError("config key 'data.hoi.min_pairs' must be <= data.hoi.max_pairs")
    if full.data.kind == "hoi" and full.data.hoi.referring_weight + full.data.hoi.grounding_weight <= 0:
        raise ConfigError("config keys 'data.hoi.referring_weight' and 'data.hoi.grounding_weight' are both 0")
    if full.train.kind == "grpo":
        _check_grpo(full)
    return full


def _check_grpo(full: ml_collections.ConfigDict) -> None:
    """Cross-key checks of a GRPO config; `grpo.protocol`, when set, becomes `data.protocol` (prompts and parsing
    must agree)."""
    from coordexp_jax.coord.protocols import PROTOCOLS
    from coordexp_jax.rl.advantages import KINDS
    from coordexp_jax.train.grpo import AGGREGATIONS

    g = full.grpo
    if g.aggregation not in AGGREGATIONS:
        raise ConfigError(f"config key 'grpo.aggregation' = {g.aggregation!r} is out of range: must be one of "
                          f"{AGGREGATIONS}")
    if g.advantage not in KINDS:
        raise ConfigError(f"config key 'grpo.advantage' = {g.advantage!r} is out of range: must be one of {KINDS}")
    if full.stage2.ratio > 0:
        raise ConfigError("config key 'stage2.ratio' must be 0 with train.kind='grpo' (GRPO steps are all rollouts)")
    if g.protocol:
        if g.protocol not in PROTOCOLS:
            raise ConfigError(f"config key 'grpo.protocol' = {g.protocol!r} is out of range: must be one of "
                              f"{PROTOCOLS}")
        full.data.protocol = g.protocol
    if not any(float(w) > 0 for w in g.rewards.values()):
        raise ConfigError("config key 'grpo.rewards': every reward weight is 0 (set at least one > 0)")
    if g.epsilon_high < g.epsilon:
        raise ConfigError(f"config key 'grpo.epsilon_high' = {g.epsilon_high} must be >= grpo.epsilon = {g.epsilon}")


def _merge(dst: ml_collections.ConfigDict, src: Any) -> None:
    for key in src.keys():
        if isinstance(dst.get(key), ml_collections.ConfigDict) and isinstance(src[key], (dict, ml_collections.ConfigDict)):
            if not src[key].keys() and not dst[key].keys():
                continue
            with dst[key].unlocked():
                _merge(dst[key], src[key])
        else:
            dst[key] = src[key]


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    """A plain JSON-able dict of `cfg` (tuples become lists)."""
    return json.loads(cfg.to_json())


def write_resolved(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Writes the resolved config as `workdir/config.json`; returns the path."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    with open(path, "w") as f:
        json.dump(to_dict(cfg), f, indent=2, sort_keys=True)
    return path


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Imports a `get_config()` file and returns its config (not yet validated)."""
    import importlib.util

    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist")
    spec = importlib.util.spec_from_file_location(f"_coordexp_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file '{path}' defines no get_config()")
    return module.get_config()
