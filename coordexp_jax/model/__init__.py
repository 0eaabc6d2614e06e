"""Qwen3-VL in Flax NNX (docs/model.md)."""

from .config import ConfigError, ModelConfig, TextConfig, VisionConfig, tiny_config
from .inputs import build_model_inputs, get_rope_index
from .qwen3vl import PAD_LOGIT, Qwen3VL, param_count

__all__ = ["ConfigError", "ModelConfig", "TextConfig", "VisionConfig", "tiny_config", "build_model_inputs",
           "get_rope_index", "PAD_LOGIT", "Qwen3VL", "param_count"]
