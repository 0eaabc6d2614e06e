"""HF safetensors <-> Qwen3VL parameters, our orbax format, coord-vocab expansion (docs/model.md)."""

from .checkpoint import load_checkpoint, save_checkpoint
from .hf import load_hf_checkpoint, save_hf_checkpoint
from .names import WeightsError, name_table
from .vocab import expand_hf_dir, expand_vocab_state

__all__ = ["load_checkpoint", "save_checkpoint", "load_hf_checkpoint", "save_hf_checkpoint", "WeightsError",
           "name_table", "expand_hf_dir", "expand_vocab_state"]
