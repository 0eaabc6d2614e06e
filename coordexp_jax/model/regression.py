"""Regression heads for sequential counting: two MLPs read the final hidden states at the `<x>` and `<y>` tokens.

The counting prompt ends with `... Next location: <x> <y>`; after the Qwen3-VL forward (final norm included) the
hidden state of each row at its `<x>` position goes through the x head and the one at its `<y>` position through
the y head, each an MLP ending in tanh, so the prediction is the next object's centre in [-1, 1]
(normalised image coordinates, `u = 2 * x / width - 1`); "all counted" is (-1, -1). This is the architecture of
the VLM-regression counting recipe (`../shared/seeds/001_*.txt`: separate MLP heads, tanh, 3 layers by default).

Only the `[B, H]` rows at the two positions are gathered (`gather_rows`); the heads never see `[B, S, H]`.

The heads are an add-on module beside the Qwen3-VL parameters: `attach_heads(model, heads)` sets
`model.regression_heads`, which adds one top-level subtree `regression_heads/{x,y}/layers/<i>/{kernel,bias}` to
the model's state and leaves every Qwen3-VL path unchanged. Our checkpoints and the HF export store them in their
own files (`regression_heads.safetensors` + `regression_heads.json`, `weights/checkpoint.py`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ATTR = "regression_heads"  # the model attribute (and top-level state key) of the heads
ACTIVATIONS = ("gelu", "relu", "silu")
# exact (erf) GELU, as torch.nn.GELU(): the exported heads load into torch MLPs unchanged
_ACT = {"gelu": lambda x: jax.nn.gelu(x, approximate=False), "relu": jax.nn.relu, "silu": jax.nn.silu}
# What the two outputs mean (written into regression_heads.json)
REGRESSION_TOKENS_DOC = ("[x, y] of the next uncounted object's centre in [-1, 1] (u = 2 * px / width - 1, "
                         "v = 2 * py / height - 1), read from the final hidden states at the <x> and <y> tokens; "
                         "(-1, -1) = all counted")


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """hidden_size: H of the model's final hidden state; layers: Linear layers per head (>= 1; the last maps to 1
    output); width: hidden width of the inner layers (0 = H); activation between layers ('gelu': exact erf form as
    torch.nn.GELU, 'relu', 'silu'); the output is always tanh."""

    hidden_size: int
    layers: int = 3
    width: int = 0
    activation: str = "gelu"

    def __post_init__(self):
        if self.layers < 1:
            raise ValueError(f"HeadsConfig.layers must be >= 1, got {self.layers}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"HeadsConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def dims(self) -> list[int]:
        """Feature sizes through one head: [H, W, ..., W, 1] (layers + 1 entries)."""
        w = self.width or self.hidden_size
        return [self.hidden_size] + [w] * (self.layers - 1) + [1]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class RegressionHead(nnx.Module):
    """An MLP `[..., H] -> [...]`: Linear layers `dims[i] -> dims[i+1]` with `activation` between them, tanh at the
    end. Kernels `[in, out]` ~ N(0, 1/in) (LeCun normal: the pre-activations keep unit scale whatever H is), biases
    zero. Computed in float32 (the heads are small; the hidden state is cast up)."""

    def __init__(self, cfg: HeadsConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        dims = cfg.dims
        self.layers = nnx.List([
            nnx.Linear(dims[i], dims[i + 1], kernel_init=nnx.initializers.lecun_normal(),
                       bias_init=nnx.initializers.zeros_init(), param_dtype=param_dtype, dtype=jnp.float32,
                       rngs=rngs)
            for i in range(len(dims) - 1)])

    def __call__(self, h):
        act = _ACT[self.cfg.activation]
        x = h.astype(jnp.float32)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = act(x)
        return jnp.tanh(x[..., 0])


class RegressionHeads(nnx.Module):
    """The x and y heads (separate parameters). `__call__(hidden [B, S, H], x_pos [B], y_pos [B]) -> [B, 2]` in
    [-1, 1]: column 0 = x head at `x_pos`, column 1 = y head at `y_pos`."""

    def __init__(self, cfg: HeadsConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        self.x = RegressionHead(cfg, rngs=rngs, param_dtype=param_dtype)
        self.y = RegressionHead(cfg, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, hidden, x_pos, y_pos):
        return jnp.stack([self.x(gather_rows(hidden, x_pos)), self.y(gather_rows(hidden, y_pos))], axis=-1)


def gather_rows(hidden, pos):
    """hidden `[B, S, H]`, pos `[B]` int -> `[B, H]` with row b = hidden[b, pos[b]] (one gather, no `[B, S, H]`
    intermediate)."""
    pos = jnp.asarray(pos, jnp.int32)
    return jnp.take_along_axis(hidden, pos[:, None, None], axis=1)[:, 0]


def token_positions(input_ids: np.ndarray, token_id: int, *, name: str = "token") -> np.ndarray:
    """`[B, S]` ids -> `[B]` int32: the position of the LAST occurrence of `token_id` in each row (host side).
    Raises ValueError naming the row when a row lacks it."""
    ids = np.asarray(input_ids)
    hit = ids == token_id
    missing = np.flatnonzero(~hit.any(-1))
    if missing.size:
        raise ValueError(f"row {int(missing[0])} has no {name} token (id {token_id})")
    S = ids.shape[-1]
    return (S - 1 - np.argmax(hit[:, ::-1], axis=-1)).astype(np.int32)


def attach_heads(model: nnx.Module, heads: RegressionHeads) -> nnx.Module:
    """Sets `model.regression_heads = heads` (in place) and returns the model."""
    setattr(model, ATTR, heads)
    return model


def heads_of(model) -> RegressionHeads | None:
    """The model's regression heads, or None."""
    return getattr(model, ATTR, None)


def predict_points(model, batch: dict) -> jax.Array:
    """The heads' `[B, 2]` prediction for a prompt batch (one forward: model inputs, `x_pos [B]`, `y_pos [B]`).
    Raises ValueError when the model has no heads."""
    from coordexp_jax.train.objective import vision_inputs

    heads = heads_of(model)
    if heads is None:
        raise ValueError("the model has no regression heads (attach_heads)")
    hidden = model(batch["input_ids"], batch["positions"], batch["attention_mask"], vision_inputs(batch))
    return heads(hidden, batch["x_pos"], batch["y_pos"])


# ------------------------------------------------------------------------------------- flat numpy form (files)
def heads_to_numpy(heads: RegressionHeads) -> dict[str, np.ndarray]:
    """The heads as `{name: array}` in torch `nn.Linear` layout: `x.layers.<i>.weight [out, in]`,
    `x.layers.<i>.bias [out]` (same for y)."""
    out = {}
    for axis in ("x", "y"):
        for i, layer in enumerate(getattr(heads, axis).layers):
            out[f"{axis}.layers.{i}.weight"] = np.ascontiguousarray(np.asarray(jax.device_get(layer.kernel[...])).T)
            out[f"{axis}.layers.{i}.bias"] = np.asarray(jax.device_get(layer.bias[...]))
    return out


def heads_from_numpy(cfg: HeadsConfig, tensors: dict[str, np.ndarray], *, where: str = "heads") -> RegressionHeads:
    """Inverse of `heads_to_numpy`. Raises ValueError naming `where` and the tensor on a missing tensor or a shape
    that does not match `cfg`."""
    heads = RegressionHeads(cfg, rngs=nnx.Rngs(0))
    dims = cfg.dims
    for axis in ("x", "y"):
        for i, layer in enumerate(getattr(heads, axis).layers):
            for part, shape in (("weight", (dims[i + 1], dims[i])), ("bias", (dims[i + 1],))):
                name = f"{axis}.layers.{i}.{part}"
                if name not in tensors:
                    raise ValueError(f"{where}: missing tensor {name}")
                arr = np.asarray(tensors[name])
                if arr.shape != shape:
                    raise ValueError(f"{where}: tensor {name} has shape {arr.shape}, the config says {shape}")
                var = layer.kernel if part == "weight" else layer.bias
                var[...] = jnp.asarray(arr.T if part == "weight" else arr, var[...].dtype)
    extra = sorted(set(tensors) - set(heads_to_numpy(heads)))
    if extra:
        raise ValueError(f"{where}: unexpected tensor {extra[0]} (the config has {cfg.layers} layers per head)")
    return heads


__all__ = ["ATTR", "HeadsConfig", "RegressionHead", "RegressionHeads", "gather_rows", "token_positions",
           "attach_heads", "heads_of", "predict_points", "heads_to_numpy", "heads_from_numpy"]
