"""Our own checkpoint format (orbax params + `model_config.json`) and `load_checkpoint` for either format.

Layout of a directory written by `save_checkpoint`:
    model_config.json   HF-form config dict (ModelConfig.to_hf()) plus "format": "coordexp_jax" and the param dtype
    params/             orbax StandardCheckpointer of the pure-dict parameter state (padded vocabulary)
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from ..model.config import ModelConfig
from .hf import _split_state, abstract_model, hf_model_config, load_hf_checkpoint
from .names import WeightsError

CONFIG_NAME = "model_config.json"
FORMAT = "coordexp_jax"


def is_ours(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isdir(os.path.join(path, "params"))


def is_hf(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        f.endswith(".safetensors") or f == "model.safetensors.index.json" for f in os.listdir(path))


def checkpoint_config(path: str) -> ModelConfig:
    """The ModelConfig `load_checkpoint(path)` builds, without loading the weights: ours from `model_config.json`,
    an HF directory from config.json with the output head resolved as transformers does (`hf.resolve_head`: a tied
    config whose safetensors hold a differing lm_head.weight is untied), a bare config.json as it is.
    Raises FileNotFoundError, ConfigError or WeightsError naming the file."""
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return ModelConfig.from_hf(os.path.join(path, CONFIG_NAME))
    if os.path.isdir(path) and is_hf(path):
        return hf_model_config(path)
    return ModelConfig.from_hf(path)


def save_checkpoint(path: str, model_or_state, config: ModelConfig) -> None:
    """Writes params (orbax) and the config into `path` (must not exist or be empty)."""
    import orbax.checkpoint as ocp

    state = _split_state(model_or_state)
    pure = nnx.to_pure_dict(state)
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, "params"), pure)
    ckptr.wait_until_finished()
    dt = {str(x.dtype) for x in jax.tree.leaves(pure)}
    meta = dict(config.to_hf(), format=FORMAT, param_dtype=dt.pop() if len(dt) == 1 else "mixed")
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def load_checkpoint(path: str, dtype=None, *, compute_dtype=None, return_state: bool = False, remat: bool = False):
    """Loads an HF directory or one of ours. Returns (ModelConfig, Qwen3VL) or (ModelConfig, (graphdef, state)).

    dtype: parameter dtype (default: float32 for HF, the saved dtype for ours).
    """
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: checkpoint directory not found")
    if is_ours(path):
        import orbax.checkpoint as ocp

        with open(os.path.join(path, CONFIG_NAME)) as f:
            meta = json.load(f)
        config = ModelConfig.from_hf(meta)
        saved = meta.get("param_dtype", "float32")
        dtype = dtype or (jnp.dtype(saved) if saved != "mixed" else jnp.float32)
        graphdef, abstract = abstract_model(config, dtype, compute_dtype, remat)
        target = nnx.to_pure_dict(abstract)
        restored = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, "params")), target)
        restored = jax.tree.map(lambda x, t: jnp.asarray(x, t.dtype), restored, target)
        nnx.replace_by_pure_dict(abstract, restored)
        state = abstract
    elif is_hf(path):
        return load_hf_checkpoint(path, dtype or jnp.float32, compute_dtype=compute_dtype, return_state=return_state,
                                  remat=remat)
    elif os.path.isfile(os.path.join(path, "config.json")):
        raise WeightsError(f"{path}: no *.safetensors files (only safetensors checkpoints are read)")
    else:
        raise WeightsError(f"{path}: neither an HF checkpoint (config.json + *.safetensors) nor ours ({CONFIG_NAME} + params/)")
    if return_state:
        return config, (graphdef, state)
    return config, nnx.merge(graphdef, state)
