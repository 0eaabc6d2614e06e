"""Qwen3-VL configuration: frozen dataclasses that read and write HF `config.json` (spec §1).

`ModelConfig.from_hf` accepts a dict, a `config.json` path or a directory holding one; both the legacy
`rope_theta` + `rope_scaling` form and `rope_parameters`; the vision aliases `num_attention_heads`/`num_hidden_layers`.
A config that is not dense Qwen3-VL raises `ConfigError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from coordexp_jax.errors import CoordExpError

VOCAB_PAD_MULTIPLE = 256
ATTENTION_IMPLEMENTATIONS = ("dense", "blockwise", "cudnn", "splash")  # ModelConfig.attention (model/attention.py)

# ModelConfig.remat_policy values: "full" saves nothing (jax.checkpoint's default); the others name
# jax.checkpoint_policies members that take no arguments.
REMAT_POLICIES = ("full", "nothing_saveable", "everything_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")


class ConfigError(CoordExpError, ValueError):
    """A config.json that this port cannot represent; the message names the key."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    hidden_act: str = "gelu_pytorch_tanh"
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Flat features per patch: C*T*p*p (1536 for the releases)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def pos_side(self) -> int:
        return int(self.num_position_embeddings ** 0.5)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 500000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    max_position_embeddings: int = 128000
    attention_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    pad_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    # Execution options (not part of the HF config.json, not compared by ==). scan_layers: the decoder layers and the
    # ViT blocks are one stacked module each, run under `jax.lax.scan` (compile time nearly flat in depth); their
    # parameters get a leading 'layers' axis (docs/model.md, "Scanned layers").
    scan_layers: bool = dataclasses.field(default=False, compare=False)
    # What the backward pass keeps when remat is on (`Qwen3VL(remat=True)`, train config `model.remat`): "full"
    # (nothing: recompute the whole layer) or a name in `jax.checkpoint_policies` from REMAT_POLICIES.
    remat_policy: str = dataclasses.field(default="full", compare=False)
    # Self-attention implementation (model/attention.py; train config `model.attention`): "dense" (the reference),
    # "blockwise" (memory-efficient, pure JAX, any backend), "cudnn" (GPU flash attention), "splash" (TPU Pallas).
    attention: str = dataclasses.field(default="dense", compare=False)

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"key 'remat_policy' is {self.remat_policy!r}; choose one of {list(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"key 'attention' is {self.attention!r}; choose one of {list(ATTENTION_IMPLEMENTATIONS)}")

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rows inside the JAX model: vocab_size rounded up to a multiple of 256 (padded ids get -inf-like logits)."""
        m = VOCAB_PAD_MULTIPLE
        return -(-self.text.vocab_size // m) * m

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def with_vocab_size(self, vocab_size: int) -> "ModelConfig":
        return dataclasses.replace(self, text=dataclasses.replace(self.text, vocab_size=int(vocab_size)))

    # ------------------------------------------------------------------ HF in/out
    @classmethod
    def from_hf(cls, src: dict | str | os.PathLike) -> "ModelConfig":
        """From an HF Qwen3-VL config dict, a config.json path, or a directory holding config.json."""
        where = "config"
        if not isinstance(src, dict):
            path = os.fspath(src)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"config.json not found: {path}")
            where = path
            try:
                with open(path) as f:
                    src = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return _from_hf_dict(src, where)

    def to_hf(self) -> dict:
        """The HF `config.json` dict (transformers 5.x form, `rope_parameters`)."""
        t, v = self.text, self.vision
        text = {
            "model_type": "qwen3_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "hidden_act": t.hidden_act,
            "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
            "attention_bias": t.attention_bias,
            "attention_dropout": 0.0,
            "initializer_range": t.initializer_range,
            "use_cache": True,
            "pad_token_id": t.pad_token_id,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": list(t.mrope_section),
                "mrope_interleaved": True,
            },
        }
        vision = {
            "model_type": "qwen3_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "hidden_act": v.hidden_act,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "out_hidden_size": v.out_hidden_size,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            "initializer_range": v.initializer_range,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
        }
        return {
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """Released sizes "2b", "4b", "8b", "32b" (spec §1.4) and "tiny" (tests)."""
        key = str(name).lower().replace("-", "").replace("qwen3vl", "")
        if key not in _PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
        return _PRESETS[key]()


def _small_vision(out: int) -> VisionConfig:
    return VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=out,
                        deepstack_visual_indexes=(5, 11, 17))


def _big_vision(out: int) -> VisionConfig:
    return VisionConfig(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=out,
                        deepstack_visual_indexes=(8, 16, 24))


def _release_text(h, layers, heads, kv, inter) -> TextConfig:
    return TextConfig(vocab_size=151936, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, rope_theta=5000000.0,
                      mrope_section=(24, 20, 20), max_position_embeddings=262144)


def tiny_config(*, tie_word_embeddings: bool = False, vocab_size: int = 1000) -> ModelConfig:
    """A tiny config for tests (text 64 wide, 3 layers, 4/2 heads, hd 16; vision 2 blocks, 32 wide, DeepStack [0,1])."""
    text = TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                      mrope_section=(2, 3, 3), max_position_embeddings=4096)
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          num_position_embeddings=64, deepstack_visual_indexes=(0, 1))
    return ModelConfig(text=text, vision=vision, image_token_id=vocab_size - 10, video_token_id=vocab_size - 9,
                       vision_start_token_id=vocab_size - 12, vision_end_token_id=vocab_size - 11,
                       tie_word_embeddings=tie_word_embeddings)


# The released sizes run scanned (scan_layers=True); "tiny" keeps the per-layer loop.
_PRESETS = {
    "2b": lambda: ModelConfig(text=_release_text(2048, 28, 16, 8, 6144), vision=_small_vision(2048),
                              tie_word_embeddings=True, scan_layers=True),
    "4b": lambda: ModelConfig(text=_release_text(2560, 36, 32, 8, 9728), vision=_small_vision(2560),
                              tie_word_embeddings=True, scan_layers=True),
    "8b": lambda: ModelConfig(text=_release_text(4096, 36, 32, 8, 12288), vision=_big_vision(4096),
                              tie_word_embeddings=False, scan_layers=True),
    "32b": lambda: ModelConfig(text=_release_text(5120, 64, 64, 8, 25600), vision=_big_vision(5120),
                               tie_word_embeddings=False, scan_layers=True),
    "tiny": tiny_config,
}


def _get(d: dict, key: str, where: str, default=dataclasses.MISSING):
    if key in d and d[key] is not None:
        return d[key]
    if default is dataclasses.MISSING:
        raise ConfigError(f"{where}: missing key {key!r}")
    return default


def _from_hf_dict(d: dict, where: str) -> ModelConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a JSON object")
    mt = d.get("model_type")
    if mt != "qwen3_vl":
        raise ConfigError(f"{where}: key 'model_type' is {mt!r}, expected 'qwen3_vl' (only dense Qwen3-VL is supported)")
    tc = d.get("text_config")
    vc = d.get("vision_config")
    if not isinstance(tc, dict):
        raise ConfigError(f"{where}: key 'text_config' missing or not an object")
    if not isinstance(vc, dict):
        raise ConfigError(f"{where}: key 'vision_config' missing or not an object")
    tw = f"{where}: text_config"
    vw = f"{where}: vision_config"

    # Text rope: rope_parameters (5.x) or legacy rope_theta + rope_scaling.
    rp = dict(tc.get("rope_parameters") or {})
    legacy = tc.get("rope_scaling") or {}
    if not isinstance(legacy, dict):
        raise ConfigError(f"{tw}: key 'rope_scaling' is not an object")
    for k, val in legacy.items():
        rp.setdefault(k, val)
    if "rope_theta" not in rp and tc.get("rope_theta") is not None:
        rp["rope_theta"] = tc["rope_theta"]
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"{tw}: key 'rope_parameters.rope_type' is {rope_type!r}; only 'default' is supported")
    section = tuple(int(x) for x in rp.get("mrope_section", (24, 20, 20)))
    if len(section) != 3:
        raise ConfigError(f"{tw}: key 'rope_parameters.mrope_section' must have 3 entries, got {list(section)}")
    heads = int(_get(tc, "num_attention_heads", tw, 32))
    hd = int(_get(tc, "head_dim", tw, 128))
    if sum(section) != hd // 2:
        raise ConfigError(f"{tw}: key 'rope_parameters.mrope_section' {list(section)} must sum to head_dim/2 = {hd // 2}")
    act = _get(tc, "hidden_act", tw, "silu")
    if act != "silu":
        raise ConfigError(f"{tw}: key 'hidden_act' is {act!r}; Qwen3-VL uses 'silu'")
    text = TextConfig(
        vocab_size=int(_get(tc, "vocab_size", tw, 151936)),
        hidden_size=int(_get(tc, "hidden_size", tw, 4096)),
        intermediate_size=int(_get(tc, "intermediate_size", tw, 22016)),
        num_hidden_layers=int(_get(tc, "num_hidden_layers", tw, 32)),
        num_attention_heads=heads,
        num_key_value_heads=int(_get(tc, "num_key_value_heads", tw, heads)),
        head_dim=hd,
        rms_norm_eps=float(_get(tc, "rms_norm_eps", tw, 1e-6)),
        rope_theta=float(rp.get("rope_theta", 500000.0)),
        mrope_section=section,
        max_position_embeddings=int(_get(tc, "max_position_embeddings", tw, 128000)),
        attention_bias=bool(_get(tc, "attention_bias", tw, False)),
        hidden_act=act,
        initializer_range=float(_get(tc, "initializer_range", tw, 0.02)),
        pad_token_id=tc.get("pad_token_id"),
    )
    if text.num_attention_heads % text.num_key_value_heads:
        raise ConfigError(f"{tw}: key 'num_key_value_heads' ({text.num_key_value_heads}) must divide "
                          f"num_attention_heads ({text.num_attention_heads})")
    if "num_experts" in tc and tc.get("num_experts"):
        raise ConfigError(f"{tw}: key 'num_experts' is set: MoE (qwen3_vl_moe) is not supported")

    vmt = vc.get("model_type", "qwen3_vl_vision")
    if vmt not in ("qwen3_vl_vision", "qwen3_vl"):
        raise ConfigError(f"{vw}: key 'model_type' is {vmt!r}, expected 'qwen3_vl_vision'")
    vrp = vc.get("rope_parameters") or {}
    vrt = vrp.get("rope_type", "axial")
    if vrt != "axial":
        raise ConfigError(f"{vw}: key 'rope_parameters.rope_type' is {vrt!r}; only 'axial' is supported")

    def vget(key, alias, default):
        if key in vc and vc[key] is not None:
            return vc[key]
        if alias and alias in vc and vc[alias] is not None:
            return vc[alias]
        return default

    def scalar_size(key, default):
        val = vget(key, None, default)
        if isinstance(val, (list, tuple)):
            if len(set(val)) != 1:
                raise ConfigError(f"{vw}: key {key!r} is {val}; only square patches are supported")
            val = val[0]
        return int(val)

    vact = vget("hidden_act", None, "gelu_pytorch_tanh")
    if vact != "gelu_pytorch_tanh":
        raise ConfigError(f"{vw}: key 'hidden_act' is {vact!r}; Qwen3-VL uses 'gelu_pytorch_tanh'")
    vision = VisionConfig(
        depth=int(vget("depth", "num_hidden_layers", 27)),
        hidden_size=int(vget("hidden_size", None, 1152)),
        intermediate_size=int(vget("intermediate_size", None, 4304)),
        num_heads=int(vget("num_heads", "num_attention_heads", 16)),
        in_channels=int(vget("in_channels", None, 3)),
        patch_size=scalar_size("patch_size", 16),
        temporal_patch_size=scalar_size("temporal_patch_size", 2),
        spatial_merge_size=int(vget("spatial_merge_size", None, 2)),
        out_hidden_size=int(vget("out_hidden_size", None, 3584)),
        num_position_embeddings=int(vget("num_position_embeddings", None, 2304)),
        deepstack_visual_indexes=tuple(int(x) for x in vget("deepstack_visual_indexes", None, (8, 16, 24))),
        rope_theta=float(vrp.get("rope_theta", 10000.0)),
        hidden_act=vact,
        initializer_range=float(vget("initializer_range", None, 0.02)),
    )
    if vision.out_hidden_size != text.hidden_size:
        raise ConfigError(f"{vw}: key 'out_hidden_size' ({vision.out_hidden_size}) must equal "
                          f"text_config.hidden_size ({text.hidden_size})")
    if vision.spatial_merge_size != 2:
        raise ConfigError(f"{vw}: key 'spatial_merge_size' is {vision.spatial_merge_size}; only 2 is supported")
    if any(i < 0 or i >= vision.depth for i in vision.deepstack_visual_indexes):
        raise ConfigError(f"{vw}: key 'deepstack_visual_indexes' {list(vision.deepstack_visual_indexes)} "
                          f"out of range for depth {vision.depth}")
    if len(vision.deepstack_visual_indexes) > text.num_hidden_layers:
        raise ConfigError(f"{vw}: key 'deepstack_visual_indexes' has more entries than text layers")
    return ModelConfig(
        text=text,
        vision=vision,
        image_token_id=int(d.get("image_token_id", 151655)),
        video_token_id=int(d.get("video_token_id", 151656)),
        vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


def config_to_json(cfg: ModelConfig) -> str:
    return json.dumps(cfg.to_hf(), indent=2, sort_keys=True)


def as_dict(cfg: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
