"""Spatial linking: each box-end token cross-attends to the image patches inside its box (HOI seed, `../shared/seeds/002_*.txt`).

After the token embeddings (image features scattered in) and before the decoder, every linked `<|box_end|>` token
gets `h[b, pos] += out(refine(MHA(q = h[b, pos], k = v = h[b, s] for the visual positions s of its image whose
merged-token centre lies inside its box)))`. The keys/values at visual positions are the merged visual features
(the embedding there *is* the merger output), so this is the seed's "query from the box-end token, keys/values
from the patches in the box" on the model's own visual tokens.

Shapes and units:
- links (a dict of static-shape arrays, N = `max_boxes` of the config):
  `pos [B, N] int32` sequence position of the box-end token (-1 = empty slot), `boxes [B, N, 4] float32`
  (x1, y1, x2, y2) in PIXELS of the image as the model sees it (after resizing: width = grid_w * patch_size),
  `image [B, N] int32` which image of the row (0-based, order of appearance), `kind [B, N] int32` (0 person,
  1 object, 2 interaction, 3 other; not used by the model, kept for heatmap labels), optional `rng` (a PRNG key:
  attention dropout on; absent = deterministic, as at evaluation).
- token geometry (`token_geometry(vision)`): `token_image [B, S] int32` (image of the row of each placeholder,
  -1 at text / padding / video) and `token_rect [B, S, 4] float32` (the merged token's pixel rectangle
  x1, y1, x2, y2; 0 elsewhere), from the vision inputs `vision_token_rect [I, P/m^2, 4]`, `visual_image [B, S]`
  and `visual_index [B, S]` (`model/inputs.py`).

Which tokens a box sees (`link_mask`): the tokens of its image whose rectangle centre lies inside the box (closed
interval); a box that contains no centre (smaller than a merged token, 32 px for the releases) uses the tokens
its rectangle overlaps with positive area instead. A slot is empty (changes nothing, no NaN) when `pos < 0` or
`pos >= S`, `image < 0`, the box is not finite or has no area (x2 <= x1 or y2 <= y1), or it selects no token
(e.g. entirely outside its image, or an image index the row does not have).

Module (`SpatialLinking`): RMS-normalised query / key-value inputs (learned scales), q/k/v projections
`[H, D]` (D = `dim` or H), `heads` heads of D / heads dims, scores `q.k / sqrt(D / heads)` in float32, softmax over
the selected tokens, dropout on the attention weights (training only, as `torch.nn.MultiheadAttention`), the
heads' outputs concatenated `[D]`, the optional refine MLP `c + fc2(gelu(fc1(LN(c))))` (width D), then the output
projection `[D, H]` (zero-initialised by default, so a fresh module leaves the model unchanged) added to the
token's embedding. The output projection is last: with it at zero the module adds exactly 0.

The module is an add-on beside the Qwen3-VL parameters, as the regression heads (`model/regression.py`):
`attach_linking(model, module)` sets `model.spatial_linking` (one top-level state subtree `spatial_linking/...`;
every Qwen3-VL path unchanged). Our checkpoints and the HF export store it in its own files
(`spatial_linking.safetensors` + `spatial_linking.json`, `weights/checkpoint.py`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .layers import Dense, LayerNorm, RMSNorm

ATTR = "spatial_linking"  # the model attribute (and top-level state key) of the module
KINDS = ("person", "object", "interaction", "other")  # links['kind'] values 0..3
_NEG = float(np.finfo(np.float32).min)  # masked score: finite, so an all-masked row is a uniform softmax, not NaN


@dataclasses.dataclass(frozen=True)
class LinkingConfig:
    """hidden_size: H of the token embeddings; heads: attention heads (must divide the width); dim: attention width
    D (0 = H, as the seed's `nn.MultiheadAttention(hidden_dim, num_heads)`); dropout: attention-weight dropout
    probability (training only); refine_mlp: the residual MLP after the attention (width D); zero_init: the output
    projection starts at zero (the model starts exactly as Qwen3-VL); eps: RMSNorm epsilon of the inputs."""

    hidden_size: int
    heads: int = 8
    dim: int = 0
    dropout: float = 0.1
    refine_mlp: bool = True
    zero_init: bool = True
    eps: float = 1e-6

    def __post_init__(self):
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"LinkingConfig: heads {self.heads} must be >= 1 and divide the width {self.width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LinkingConfig: dropout {self.dropout} must be in [0, 1)")

    @property
    def width(self) -> int:
        """D: the attention width (`dim`, or H when 0)."""
        return self.dim or self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- pure geometry
def token_geometry(vision: dict):
    """(token_image [B, S] int32, token_rect [B, S, 4] float32) of every sequence position from the vision inputs.

    vision: `visual_index [B, S]` (flat merged-token index, -1 = not a placeholder), `vision_token_rect
    [I, P/m^2, 4]` (pixel rectangle x1, y1, x2, y2 of each merged token in the flat merger order) and
    `visual_image [B, S]` (image of the row, -1 = not an image placeholder). Non-placeholders get image -1 and a
    zero rectangle. Raises KeyError naming the missing key (inputs built by an older `build_model_inputs`)."""
    for k in ("visual_index", "vision_token_rect", "visual_image"):
        if k not in vision:
            raise KeyError(f"spatial linking needs vision['{k}'] (model/inputs.py build_model_inputs)")
    vi = jnp.asarray(vision["visual_index"])
    is_vis = vi >= 0
    rects = jnp.asarray(vision["vision_token_rect"], jnp.float32).reshape(-1, 4)
    rect = jnp.where(is_vis[..., None], jnp.take(rects, jnp.maximum(vi, 0), axis=0), 0.0)
    image = jnp.where(is_vis, jnp.asarray(vision["visual_image"], jnp.int32), -1)
    return image, rect


def valid_links(pos, boxes, image, seq_len: int):
    """[B, N] bool: slots that hold a usable box (0 <= pos < seq_len, image >= 0, finite box with x2 > x1 and
    y2 > y1). pos [B, N] int, boxes [B, N, 4] pixels, image [B, N] int."""
    b = jnp.asarray(boxes, jnp.float32)
    finite = jnp.all(jnp.isfinite(b), axis=-1)
    area = (b[..., 2] > b[..., 0]) & (b[..., 3] > b[..., 1])
    pos = jnp.asarray(pos)
    return (pos >= 0) & (pos < seq_len) & (jnp.asarray(image) >= 0) & finite & area


def link_mask(token_image, token_rect, pos, boxes, image):
    """[B, N, S] bool: which sequence positions link slot n attends to (module docstring, "Which tokens").

    token_image [B, S] int (-1 = not an image token), token_rect [B, S, 4] pixels; pos [B, N] int, boxes [B, N, 4]
    pixels (x1, y1, x2, y2), image [B, N] int. Centre rule first (x1 <= cx <= x2 and y1 <= cy <= y2); a valid box
    with no centre inside falls back to positive-area overlap. Invalid slots (`valid_links`) select nothing."""
    S = token_image.shape[-1]
    b = jnp.nan_to_num(jnp.asarray(boxes, jnp.float32))[:, :, None, :]  # [B, N, 1, 4]
    r = jnp.asarray(token_rect, jnp.float32)[:, None, :, :]  # [B, 1, S, 4]
    same = (token_image[:, None, :] == jnp.asarray(image)[:, :, None]) & (token_image[:, None, :] >= 0)
    cx = 0.5 * (r[..., 0] + r[..., 2])
    cy = 0.5 * (r[..., 1] + r[..., 3])
    centre = (cx >= b[..., 0]) & (cx <= b[..., 2]) & (cy >= b[..., 1]) & (cy <= b[..., 3]) & same
    ix = jnp.minimum(r[..., 2], b[..., 2]) - jnp.maximum(r[..., 0], b[..., 0])
    iy = jnp.minimum(r[..., 3], b[..., 3]) - jnp.maximum(r[..., 1], b[..., 1])
    overlap = (ix > 0) & (iy > 0) & same
    sel = jnp.where(jnp.any(centre, axis=-1, keepdims=True), centre, overlap)
    return sel & valid_links(pos, boxes, image, S)[..., None]


def masked_softmax(scores, mask):
    """Softmax over the last axis restricted to `mask` (float32); all-masked rows give all zeros, never NaN.
    scores [..., S] float, mask broadcastable to it."""
    s = jnp.where(mask, scores.astype(jnp.float32), _NEG)
    p = jax.nn.softmax(s, axis=-1)  # an all-masked row: uniform over finite equal scores
    return jnp.where(mask, p, 0.0)


# ------------------------------------------------------------------------------------------------- module
class SpatialLinking(nnx.Module):
    """The spatial-linking module (module docstring). `__call__(h [B, S, H], token_image [B, S], token_rect
    [B, S, 4], links, return_weights=False)` -> h with the linked tokens updated (same dtype), and with
    `return_weights` also the attention weights `[B, N, heads, S]` float32 (sum 1 over the selected positions of a
    usable slot, 0 elsewhere; before dropout)."""

    def __init__(self, cfg: LinkingConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        H, D = cfg.hidden_size, cfg.width
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_norm = RMSNorm(H, eps=cfg.eps, dtype=dtype, param_dtype=param_dtype)
        self.kv_norm = RMSNorm(H, eps=cfg.eps, dtype=dtype, param_dtype=param_dtype)
        # LeCun-normal q/k/v on unit-RMS inputs: unit-scale scores at init
        self.query = Dense(H, D, ("embed", "mlp"), std=H ** -0.5, **kw)
        self.key = Dense(H, D, ("embed", "mlp"), std=H ** -0.5, **kw)
        self.value = Dense(H, D, ("embed", "mlp"), std=H ** -0.5, **kw)
        if cfg.refine_mlp:
            self.refine_norm = LayerNorm(D, "norm", eps=cfg.eps, dtype=dtype, param_dtype=param_dtype)
            self.refine_fc1 = Dense(D, D, ("mlp", "embed"), std=D ** -0.5, **kw)
            self.refine_fc2 = Dense(D, D, ("embed", "mlp"), std=D ** -0.5, **kw)
        else:
            self.refine_norm = self.refine_fc1 = self.refine_fc2 = None
        # not zero-initialised: ~0.02 per element of the update, the scale of the token embeddings
        self.out = Dense(D, H, ("mlp", "embed"), std=0.02 * D ** -0.5, **kw)
        if cfg.zero_init:
            self.out.kernel[...] = jnp.zeros_like(self.out.kernel[...])

    def __call__(self, h, token_image, token_rect, links: dict, *, return_weights: bool = False):
        cfg = self.cfg
        B, S, _ = h.shape
        nh, hd = cfg.heads, cfg.head_dim
        pos = jnp.asarray(links["pos"], jnp.int32)
        N = pos.shape[1]
        mask = link_mask(token_image, token_rect, pos, links["boxes"], links["image"])  # [B, N, S]
        has = jnp.any(mask, axis=-1)  # [B, N]
        safe_pos = jnp.clip(pos, 0, S - 1)
        hq = jnp.take_along_axis(h, safe_pos[..., None], axis=1)  # [B, N, H]
        q = self.query(self.q_norm(hq)).reshape(B, N, nh, hd)
        kv = self.kv_norm(h)
        k = self.key(kv).reshape(B, S, nh, hd)
        v = self.value(kv).reshape(B, S, nh, hd)
        scores = jnp.einsum("bnhd,bshd->bnhs", q, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
        w = masked_softmax(scores, mask[:, :, None, :])  # [B, N, nh, S]
        p = w
        rng = links.get("rng")
        if rng is not None and cfg.dropout > 0:
            keep = jax.random.bernoulli(rng, 1.0 - cfg.dropout, p.shape)
            p = jnp.where(keep, p / (1.0 - cfg.dropout), 0.0)
        ctx = jnp.einsum("bnhs,bshd->bnhd", p.astype(self.dtype), v.astype(self.dtype),
                         preferred_element_type=jnp.float32).reshape(B, N, nh * hd).astype(self.dtype)
        if self.refine_fc1 is not None:
            ctx = ctx + self.refine_fc2(jax.nn.gelu(self.refine_fc1(self.refine_norm(ctx)), approximate=False))
        delta = self.out(ctx)  # [B, N, H]
        delta = jnp.where(has[..., None], delta, 0).astype(h.dtype)
        out = h.at[jnp.arange(B)[:, None], safe_pos].add(delta)
        return (out, w) if return_weights else out


# ------------------------------------------------------------------------------------------- attachment
def attach_linking(model: nnx.Module, module: SpatialLinking) -> nnx.Module:
    """Sets `model.spatial_linking = module` (in place) and returns the model."""
    setattr(model, ATTR, module)
    return model


def linking_of(model) -> SpatialLinking | None:
    """The model's spatial-linking module, or None."""
    return getattr(model, ATTR, None)


def config_from_train(cfg, hidden_size: int) -> LinkingConfig:
    """The LinkingConfig of a training config's `model.spatial_linking` section. Raises ConfigError naming the key
    when `heads` does not divide the attention width."""
    s = cfg.model.spatial_linking
    try:
        return LinkingConfig(hidden_size=int(hidden_size), heads=int(s.heads), dim=int(s.dim),
                             dropout=float(s.dropout), refine_mlp=bool(s.refine_mlp), zero_init=bool(s.zero_init))
    except ValueError as e:
        from coordexp_jax.train.config import ConfigError

        raise ConfigError(f"config key 'model.spatial_linking.heads' = {s.heads}: {e}") from None


def maybe_attach(model: nnx.Module, cfg, *, seed: int = 0) -> nnx.Module:
    """The model with a spatial-linking module exactly when `cfg.model.spatial_linking.enabled`: a fresh
    `SpatialLinking` (dtypes of the model) is attached when enabled and the model has none (a checkpoint's module is
    kept); a checkpoint's module is removed when disabled (the model is then exactly Qwen3-VL). In place."""
    if not cfg.model.spatial_linking.enabled:
        if linking_of(model) is not None:
            import logging

            logging.getLogger(__name__).warning("model.checkpoint has a spatial-linking module; "
                                                "model.spatial_linking.enabled is False, so it is dropped")
            delattr(model, ATTR)
        return model
    if linking_of(model) is not None:
        return model
    lcfg = config_from_train(cfg, model.config.text.hidden_size)
    pdt = jax.tree.leaves(nnx.state(model.language_model.norm, nnx.Param))[0].dtype
    return attach_linking(model, SpatialLinking(lcfg, dtype=model.dtype, param_dtype=pdt,
                                                rngs=nnx.Rngs(seed)))


# ---------------------------------------------------------------------------------- flat numpy form (files)
def _parts(module: SpatialLinking):
    names = ["q_norm", "kv_norm", "query", "key", "value", "out"]
    if module.refine_fc1 is not None:
        names += ["refine_norm", "refine_fc1", "refine_fc2"]
    return names


def linking_to_numpy(module: SpatialLinking) -> dict[str, np.ndarray]:
    """The module as `{name: array}` in torch layout: Linear `<part>.weight [out, in]` + `<part>.bias [out]`,
    norms `<part>.weight [dim]` (+ `.bias` for the LayerNorm)."""
    out = {}
    for part in _parts(module):
        m = getattr(module, part)
        if isinstance(m, Dense):
            out[f"{part}.weight"] = np.ascontiguousarray(np.asarray(jax.device_get(m.kernel[...])).T)
            out[f"{part}.bias"] = np.asarray(jax.device_get(m.bias[...]))
        else:
            out[f"{part}.weight"] = np.asarray(jax.device_get(m.scale[...]))
            if isinstance(m, LayerNorm):
                out[f"{part}.bias"] = np.asarray(jax.device_get(m.bias[...]))
    return out


def linking_from_numpy(cfg: LinkingConfig, tensors: dict[str, np.ndarray], *, where: str = "spatial linking",
                       dtype=jnp.float32, param_dtype=jnp.float32) -> SpatialLinking:
    """Inverse of `linking_to_numpy`. Raises ValueError naming `where` and the tensor on a missing, unexpected or
    mis-shaped tensor."""
    module = SpatialLinking(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    expect = linking_to_numpy(module)
    for name, ref in expect.items():
        if name not in tensors:
            raise ValueError(f"{where}: missing tensor {name}")
        arr = np.asarray(tensors[name])
        if arr.shape != ref.shape:
            raise ValueError(f"{where}: tensor {name} has shape {arr.shape}, the config says {ref.shape}")
        part, kind = name.rsplit(".", 1)
        m = getattr(module, part)
        if isinstance(m, Dense):
            var = m.kernel if kind == "weight" else m.bias
            val = arr.T if kind == "weight" else arr
        else:
            var = m.scale if kind == "weight" else m.bias
            val = arr
        var[...] = jnp.asarray(val, var[...].dtype)
    extra = sorted(set(tensors) - set(expect))
    if extra:
        raise ValueError(f"{where}: unexpected tensor {extra[0]} (refine_mlp={cfg.refine_mlp})")
    return module


# ------------------------------------------------------------------------------------------------ heatmaps
def heatmap(weights, token_image, token_rect, image: int, height: int, width: int) -> np.ndarray:
    """A `[height, width]` float32 map of one link's attention over image `image` of its row (host numpy).

    weights [S] or [heads, S] (one slot of `Qwen3VL.link_attention`; heads are averaged), token_image [S],
    token_rect [S, 4] pixels (one row of `token_geometry`); height/width: the image as the model sees it. Each
    token's weight is painted over its rectangle, so the map sums to the attention mass on that image."""
    w = np.asarray(weights, np.float64)
    if w.ndim == 2:
        w = w.mean(0)
    out = np.zeros((int(height), int(width)), np.float64)
    ti, tr = np.asarray(token_image), np.asarray(token_rect)
    for s in np.flatnonzero((ti == image) & (w != 0)):
        x1, y1, x2, y2 = (int(round(v)) for v in tr[s])
        area = max((y2 - y1) * (x2 - x1), 1)
        out[max(y1, 0):y2, max(x1, 0):x2] += w[s] / area
    return out.astype(np.float32)


__all__ = ["ATTR", "KINDS", "LinkingConfig", "SpatialLinking", "token_geometry", "valid_links", "link_mask",
           "masked_softmax", "attach_linking", "linking_of", "config_from_train", "maybe_attach",
           "linking_to_numpy", "linking_from_numpy", "heatmap"]
