"""Our own checkpoint format (orbax params + `model_config.json`) and `load_checkpoint` for either format.

Layout of a directory written by `save_checkpoint`:
    model_config.json   HF-form config dict (ModelConfig.to_hf()) plus "format": "coordexp_jax" and the param dtype
    params/             orbax StandardCheckpointer of the pure-dict parameter state (padded vocabulary)
    regression_heads.safetensors + regression_heads.json
                        only for a model with regression heads (`model/regression.py`, sequential counting): the
                        heads beside the Qwen3-VL parameters, in the same two files the HF export writes
                        (`save_heads` / `load_heads`), so `params/` holds exactly the Qwen3-VL tree
    spatial_linking.safetensors + spatial_linking.json
                        only for a model with the spatial-linking module (`model/spatial_linking.py`, HOI): the
                        module beside the Qwen3-VL parameters, likewise in the files the HF export writes
                        (`save_linking` / `load_linking`)
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from ..model.config import ModelConfig
from ..model.scan import is_stacked_pure, stack_pure, unstack_pure
from .hf import _split_state, abstract_model, hf_model_config, load_hf_checkpoint
from .names import WeightsError

CONFIG_NAME = "model_config.json"
FORMAT = "coordexp_jax"
HEADS_WEIGHTS = "regression_heads.safetensors"
HEADS_CONFIG = "regression_heads.json"
HEADS_FORMAT = "coordexp_regression_heads"
LINKING_WEIGHTS = "spatial_linking.safetensors"
LINKING_CONFIG = "spatial_linking.json"
LINKING_FORMAT = "coordexp_spatial_linking"
LINKING_DOC = ("SpatialLinking (coordexp_jax/model/spatial_linking.py): after the token embeddings and before the "
               "decoder, each <|box_end|> token of a box adds out(refine(MHA(q = its embedding, k = v = the merged "
               "visual tokens of its image whose 32 px cell centre lies inside the box, in pixels of the resized "
               "image)))); torch layout: Linear <part>.weight [out, in] + .bias, norms <part>.weight (+ .bias)")


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
    cpath = os.path.join(path, CONFIG_NAME)
    if os.path.isfile(cpath):  # with the saved layout (scan_layers)
        config = ModelConfig.from_hf(cpath)
        with open(cpath) as f:
            return config.replace(scan_layers=bool(json.load(f).get("scan_layers", False)))
    if os.path.isdir(path) and is_hf(path):
        return hf_model_config(path)
    return ModelConfig.from_hf(path)


# ------------------------------------------------------------------------------------------- regression heads
def heads_config_from_pure(pure: dict, activation: str = "gelu"):
    """The HeadsConfig of a pure-dict heads state (`{'x': {'layers': {i: {'kernel', 'bias'}}}, 'y': ...}`)."""
    from ..model.regression import HeadsConfig

    layers = pure["x"]["layers"]
    keys = sorted(layers, key=int)
    k0 = layers[keys[0]]["kernel"]
    width = int(layers[keys[0]]["kernel"].shape[1]) if len(keys) > 1 else 0
    return HeadsConfig(hidden_size=int(k0.shape[0]), layers=len(keys), width=width, activation=activation)


def save_heads(out_dir: str, heads, extra: dict | None = None) -> list[str]:
    """Writes `heads` (a `RegressionHeads`, or its pure-dict state) as `regression_heads.safetensors` (float32,
    torch `nn.Linear` layout: `x.layers.<i>.weight [out, in]`, `.bias [out]`, same for `y`) and
    `regression_heads.json` (format, HeadsConfig fields, the tensor names, what the outputs mean, plus `extra`,
    e.g. the `<x>`/`<y>` token ids). Returns the file names written."""
    import numpy as np

    from ..model.regression import REGRESSION_TOKENS_DOC, heads_from_numpy, heads_to_numpy
    from .safetensors_io import write_file

    if isinstance(heads, dict):
        cfg = heads_config_from_pure(heads)
        tensors = {}
        for axis in ("x", "y"):
            for i in sorted(heads[axis]["layers"], key=int):
                lay = heads[axis]["layers"][i]
                tensors[f"{axis}.layers.{int(i)}.weight"] = np.asarray(jax.device_get(lay["kernel"])).T
                tensors[f"{axis}.layers.{int(i)}.bias"] = np.asarray(jax.device_get(lay["bias"]))
        heads_from_numpy(cfg, tensors, where="regression heads")  # shape check
    else:
        cfg, tensors = heads.cfg, heads_to_numpy(heads)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    names = sorted(tensors)
    os.makedirs(out_dir, exist_ok=True)
    write_file(os.path.join(out_dir, HEADS_WEIGHTS), [(n, tensors[n].shape, np.dtype(np.float32)) for n in names],
               lambda n: tensors[n], metadata={"format": "pt"})
    meta = dict(format=HEADS_FORMAT, **cfg.to_json(), tensors=names, outputs=REGRESSION_TOKENS_DOC, **(extra or {}))
    with open(os.path.join(out_dir, HEADS_CONFIG), "w") as f:
        json.dump(meta, f, indent=2)
    return [HEADS_WEIGHTS, HEADS_CONFIG]


def has_heads(path: str) -> bool:
    return os.path.isfile(os.path.join(path, HEADS_CONFIG))


def load_heads(path: str):
    """The `RegressionHeads` stored in directory `path` (`save_heads`), or None when it has no
    `regression_heads.json`. Raises WeightsError naming the file on a bad JSON, a missing safetensors file, a
    missing or mis-shaped tensor."""
    from ..model.regression import HeadsConfig, heads_from_numpy

    return _load_addon(path, HEADS_CONFIG, HEADS_WEIGHTS, HEADS_FORMAT, "regression-heads", lambda meta: HeadsConfig(
        hidden_size=int(meta["hidden_size"]), layers=int(meta["layers"]), width=int(meta.get("width", 0)),
        activation=str(meta.get("activation", "gelu"))), lambda cfg, t, where: heads_from_numpy(cfg, t, where=where))


def _load_addon(path: str, config_name: str, weights_name: str, fmt: str, what: str, make_cfg, build):
    """An add-on module stored beside a model: `config_name` (JSON with "format": `fmt`) -> `make_cfg(meta)`, then
    `build(cfg, tensors, where)` from `weights_name` (safetensors). None when `config_name` is absent. Raises
    WeightsError naming the file on a bad JSON, a missing safetensors file, a missing or mis-shaped tensor."""
    from .safetensors_io import read_header, read_tensor

    cpath = os.path.join(path, config_name)
    if not os.path.isfile(cpath):
        return None
    try:
        with open(cpath) as f:
            meta = json.load(f)
        if meta.get("format") != fmt:
            raise ValueError(f"format is {meta.get('format')!r}, not {fmt!r}")
        cfg = make_cfg(meta)
    except (ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{cpath}: not a {what} description ({e})") from None
    wpath = os.path.join(path, weights_name)
    if not os.path.isfile(wpath):
        raise WeightsError(f"{wpath}: missing (described by {config_name})")
    header, start = read_header(wpath)
    tensors = {n: read_tensor(wpath, info, start, n) for n, info in header.items() if n != "__metadata__"}
    try:
        return build(cfg, tensors, wpath)
    except ValueError as e:
        raise WeightsError(str(e)) from None


def split_heads(model_or_state):
    """(Qwen3-VL part, heads) of a model or a parameter state: a Module keeps its heads module; a state gives the
    pure-dict heads subtree (or None). The spatial-linking module (if any) is left out of the Qwen3-VL part of a
    Module (`model.spatial_linking.linking_of` returns it)."""
    from ..model.regression import ATTR, heads_of
    from ..model.spatial_linking import ATTR as LINKING

    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
        if LINKING in state:
            state = nnx.State({k: v for k, v in state.items() if k != LINKING})
        return state, heads_of(model_or_state)
    state = _split_state(model_or_state)
    pure = nnx.to_pure_dict(state)
    heads = pure.pop(ATTR, None)
    return (pure if heads is not None else state), heads


# ------------------------------------------------------------------------------------------- spatial linking
def save_linking(out_dir: str, module, extra: dict | None = None) -> list[str]:
    """Writes a `SpatialLinking` module as `spatial_linking.safetensors` (float32, torch layout,
    `linking_to_numpy`) and `spatial_linking.json` (format, LinkingConfig fields, tensor names, what it does, plus
    `extra`). Returns the file names written."""
    import numpy as np

    from ..model.spatial_linking import linking_to_numpy
    from .safetensors_io import write_file

    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in linking_to_numpy(module).items()}
    names = sorted(tensors)
    os.makedirs(out_dir, exist_ok=True)
    write_file(os.path.join(out_dir, LINKING_WEIGHTS), [(n, tensors[n].shape, np.dtype(np.float32)) for n in names],
               lambda n: tensors[n], metadata={"format": "pt"})
    meta = dict(format=LINKING_FORMAT, **module.cfg.to_json(), tensors=names, module=LINKING_DOC, **(extra or {}))
    with open(os.path.join(out_dir, LINKING_CONFIG), "w") as f:
        json.dump(meta, f, indent=2)
    return [LINKING_WEIGHTS, LINKING_CONFIG]


def has_linking(path: str) -> bool:
    return os.path.isfile(os.path.join(path, LINKING_CONFIG))


def load_linking(path: str, *, dtype=jnp.float32, param_dtype=jnp.float32):
    """The `SpatialLinking` stored in directory `path` (`save_linking`), or None when it has no
    `spatial_linking.json`; compute `dtype`, parameters cast to `param_dtype`. Raises WeightsError naming the file on
    a bad JSON, a missing safetensors file, a missing or mis-shaped tensor."""
    from ..model.spatial_linking import LinkingConfig, linking_from_numpy

    def make_cfg(meta):
        return LinkingConfig(hidden_size=int(meta["hidden_size"]), heads=int(meta["heads"]), dim=int(meta["dim"]),
                             dropout=float(meta["dropout"]), refine_mlp=bool(meta["refine_mlp"]),
                             zero_init=bool(meta.get("zero_init", True)), eps=float(meta.get("eps", 1e-6)))

    return _load_addon(path, LINKING_CONFIG, LINKING_WEIGHTS, LINKING_FORMAT, "spatial-linking", make_cfg,
                       lambda cfg, t, where: linking_from_numpy(cfg, t, where=where, dtype=dtype,
                                                                param_dtype=param_dtype))

def _attach_loaded_linking(path: str, model):
    from ..model.spatial_linking import attach_linking

    pdt = jax.tree.leaves(nnx.state(model.language_model.norm, nnx.Param))[0].dtype
    module = load_linking(path, dtype=model.dtype, param_dtype=pdt)
    if module is not None:
        attach_linking(model, module)
    return model


def _attach_loaded_heads(path: str, model):
    from ..model.regression import attach_heads

    heads = load_heads(path)
    if heads is not None:
        attach_heads(model, heads)
    return model


def save_checkpoint(path: str, model_or_state, config: ModelConfig) -> None:
    """Writes params (orbax) and the config into `path` (must not exist or be empty); a model with regression heads
    also gets `regression_heads.safetensors` + `.json` (`save_heads`), and one with spatial linking
    `spatial_linking.safetensors` + `.json` (`save_linking`), never inside `params/`. Raises WeightsError for a
    bare state holding a spatial-linking subtree (its config is not in the state: save the model)."""
    import orbax.checkpoint as ocp

    from ..model.regression import ATTR
    from ..model.spatial_linking import ATTR as LINKING, linking_of

    linking = linking_of(model_or_state) if isinstance(model_or_state, nnx.Module) else None
    state, heads = split_heads(model_or_state)
    pure = state if isinstance(state, dict) else nnx.to_pure_dict(state)
    pure.pop(ATTR, None)
    if pure.pop(LINKING, None) is not None and linking is None:
        raise WeightsError(f"{path}: the state has a {LINKING} subtree; save the model (the module's config is "
                           f"not in the state)")
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, "params"), pure)
    ckptr.wait_until_finished()
    dt = {str(x.dtype) for x in jax.tree.leaves(pure)}
    meta = dict(config.to_hf(), format=FORMAT, param_dtype=dt.pop() if len(dt) == 1 else "mixed",
                scan_layers=bool(is_stacked_pure(pure)))  # the layout of params/ (read from the tree itself)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)
    if heads is not None:
        save_heads(path, heads)
    if linking is not None:
        save_linking(path, linking)


def load_checkpoint(path: str, dtype=None, *, compute_dtype=None, return_state: bool = False, remat: bool = False,
                    scan_layers: bool | None = None, remat_policy: str | None = None):
    """Loads an HF directory or one of ours. Returns (ModelConfig, Qwen3VL) or (ModelConfig, (graphdef, state)).

    dtype: parameter dtype (default: float32 for HF, the saved dtype for ours). Regression heads stored beside the
    weights (`regression_heads.json` + `.safetensors`, in our format or an HF export) are attached to the model
    (`model.regression_heads`; float32); so is a spatial-linking module (`spatial_linking.json` +
    `.safetensors`, as `model.spatial_linking`, in the model's dtypes).

    scan_layers: the layout of the returned model (`ModelConfig.scan_layers`); None = as saved (ours:
    `model_config.json`'s "scan_layers", HF: per-layer). A checkpoint of ours saved in the other layout is converted
    on load (stacked or unstacked in memory: `model.scan.stack_pure` / `unstack_pure`). remat_policy: the returned
    config's `remat_policy` (None: default).
    """
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: checkpoint directory not found")
    policy = {"remat_policy": remat_policy} if remat_policy else {}
    if is_ours(path):
        import orbax.checkpoint as ocp

        with open(os.path.join(path, CONFIG_NAME)) as f:
            meta = json.load(f)
        saved_scan = bool(meta.get("scan_layers", False))
        config = ModelConfig.from_hf(meta).replace(scan_layers=saved_scan, **policy)
        saved = meta.get("param_dtype", "float32")
        dtype = dtype or (jnp.dtype(saved) if saved != "mixed" else jnp.float32)
        graphdef, abstract = abstract_model(config, dtype, compute_dtype, remat)
        target = nnx.to_pure_dict(abstract)
        restored = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, "params")), target)
        restored = jax.tree.map(lambda x, t: jnp.asarray(x, t.dtype), restored, target)
        if scan_layers is not None and bool(scan_layers) != saved_scan:  # convert to the requested layout
            restored = stack_pure(restored) if scan_layers else unstack_pure(restored)
            config = config.replace(scan_layers=bool(scan_layers))
            graphdef, abstract = abstract_model(config, dtype, compute_dtype, remat)
        nnx.replace_by_pure_dict(abstract, restored)
        state = abstract
    elif is_hf(path):
        config, model = load_hf_checkpoint(path, dtype or jnp.float32, compute_dtype=compute_dtype, remat=remat,
                                           scan_layers=bool(scan_layers), remat_policy=remat_policy)
        _attach_loaded_heads(path, model)
        _attach_loaded_linking(path, model)
        return (config, nnx.split(model)) if return_state else (config, model)
    elif os.path.isfile(os.path.join(path, "config.json")):
        raise WeightsError(f"{path}: no *.safetensors files (only safetensors checkpoints are read)")
    else:
        raise WeightsError(f"{path}: neither an HF checkpoint (config.json + *.safetensors) nor ours ({CONFIG_NAME} + params/)")
    if has_heads(path) or has_linking(path):
        model = _attach_loaded_linking(path, _attach_loaded_heads(path, nnx.merge(graphdef, state)))
        return (config, nnx.split(model)) if return_state else (config, model)
    if return_state:
        return config, (graphdef, state)
    return config, nnx.merge(graphdef, state)
