"""The Qwen3-VL vision tower (spec §2) over padded image slots.

Inputs are the host-built arrays of docs/architecture.md: `pixel_values [I,P,F]` (merge-block order),
`vision_segment_ids [I,P]` (attention only between equal ids; -1 = padding), `vision_pos_taps/weights [I,P,4]`
(bilinear pos-embed resampling), `vision_rope_rc [I,P,2]`. Output: merged features `[I*P/4, O]` and one DeepStack
feature array `[I*P/4, O]` per entry of `deepstack_visual_indexes`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import AttentionMask, attention
from .config import VisionConfig
from .layers import Dense, LayerNorm, param
from .rope import rotate_half, vision_cos_sin
from .scan import remat_policy as _remat_policy, scan_apply, stack_modules

class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
        D = cfg.hidden_size
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs, std=cfg.initializer_range)
        self.qkv = Dense(D, 3 * D, ("vision_embed", "vision_mlp"), **kw)
        self.proj = Dense(D, D, ("vision_mlp", "vision_embed"), **kw)
        self.num_heads = cfg.num_heads
        self.dtype = dtype

    def __call__(self, x, cos, sin, mask):
        """x [I,P,D]; cos/sin [I,P,hd] float32; mask [I,P,P] bool."""
        I, P, D = x.shape
        nh = self.num_heads
        hd = D // nh
        qkv = self.qkv(x).reshape(I, P, 3, nh, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        # rotary in float32, then back (as HF)
        q = (q.astype(jnp.float32) * c + rotate_half(q.astype(jnp.float32)) * s).astype(self.dtype)
        k = (k.astype(jnp.float32) * c + rotate_half(k.astype(jnp.float32)) * s).astype(self.dtype)
        return self.proj(attention(q, k, v, mask, self.dtype))  # every head its own kv head


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
        self.linear_fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, ("vision_embed", "vision_mlp"), bias=True,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs, std=cfg.initializer_range)
        self.linear_fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, ("vision_mlp", "vision_embed"), bias=True,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs, std=cfg.initializer_range)

    def __call__(self, x):
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x), approximate=True))  # gelu_pytorch_tanh


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs):
        D = cfg.hidden_size
        self.norm1 = LayerNorm(D, "norm", dtype=dtype, param_dtype=param_dtype)
        self.norm2 = LayerNorm(D, "norm", dtype=dtype, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = VisionMLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """2x2 merge to the text width. postshuffle=False: LN(D) then shuffle (final merger); True: shuffle then LN(4D)."""

    def __init__(self, cfg: VisionConfig, *, postshuffle: bool, dtype, param_dtype, rngs):
        D4 = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle = postshuffle
        self.norm = LayerNorm(D4 if postshuffle else cfg.hidden_size, "norm", dtype=dtype, param_dtype=param_dtype)
        self.linear_fc1 = Dense(D4, D4, ("vision_embed", "vision_mlp"), bias=True, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs, std=cfg.initializer_range)
        self.linear_fc2 = Dense(D4, cfg.out_hidden_size, ("vision_mlp", "embed"), bias=True, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs, std=cfg.initializer_range)
        self.m2 = cfg.spatial_merge_size ** 2

    def __call__(self, x):
        """x [I,P,D] -> [I*P/4, O]."""
        I, P, D = x.shape
        if self.postshuffle:
            y = self.norm(x.reshape(I * P // self.m2, D * self.m2))
        else:
            y = self.norm(x).reshape(I * P // self.m2, D * self.m2)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(y), approximate=False))  # exact (erf) GELU


def _call_block(blk, x, cos, sin, mask):
    return blk(x, cos, sin, mask)


class VisionModel(nnx.Module):
    """The ViT. scan: the blocks are one stacked VisionBlock run under `lax.scan` (DeepStack taps kept in a
    [n_taps, I, P, D] buffer written at the tap layers); remat: each block rematerialised with `remat_policy`."""

    def __init__(self, cfg: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 scan: bool = False, remat: bool = False, remat_policy: str = "full"):
        self.cfg = cfg
        self.dtype = dtype
        self.scan = scan
        self.remat = remat
        self.remat_policy = remat_policy
        self.patch_embed = Dense(cfg.patch_dim, cfg.hidden_size, ("vision_mlp", "vision_embed"), bias=True, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs, std=cfg.initializer_range)
        self.pos_embed = param(rngs, (cfg.num_position_embeddings, cfg.hidden_size), (None, "vision_embed"), param_dtype,
                               std=cfg.initializer_range)
        blocks = [VisionBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.depth)]
        self.blocks = stack_modules(blocks) if scan else nnx.List(blocks)
        self.merger = PatchMerger(cfg, postshuffle=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.deepstack_merger_list = nnx.List([
            PatchMerger(cfg, postshuffle=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for _ in cfg.deepstack_visual_indexes])

    def __call__(self, vision: dict, attention_impl: str = "dense"):
        """attention_impl: the attention implementation (ModelConfig.attention, model/attention.py)."""
        pv = vision["pixel_values"]
        seg = vision["vision_segment_ids"]
        x = self.patch_embed(pv.astype(self.dtype))  # [I,P,D]
        table = self.pos_embed[...]
        pos = (jnp.take(table, vision["vision_pos_taps"], axis=0) * vision["vision_pos_weights"][..., None].astype(table.dtype)).sum(-2)
        x = x + pos.astype(x.dtype)
        cos, sin = vision_cos_sin(vision["vision_rope_rc"], self.cfg.head_dim, self.cfg.rope_theta)
        # Padding (id -1) attends to padding, so no row is fully masked (no NaN); its output is never used.
        mask = AttentionMask.segments(seg, attention_impl)
        taps = self.cfg.deepstack_visual_indexes
        if self.scan:
            x, ds = self._scan_blocks(x, cos, sin, mask)
        else:
            call = nnx.remat(_call_block, policy=_remat_policy(self.remat_policy)) if self.remat else _call_block
            ds = [None] * len(taps)
            for i, blk in enumerate(self.blocks):
                x = call(blk, x, cos, sin, mask)
                for k, layer in enumerate(taps):
                    if layer == i:
                        ds[k] = x
        feats = self.merger(x)
        return feats, [self.deepstack_merger_list[k](d) for k, d in enumerate(ds)]

    def _scan_blocks(self, x, cos, sin, mask):
        """x [I,P,D] through the stacked blocks under lax.scan -> (x, [x after block taps[k] for each k])."""
        taps = self.cfg.deepstack_visual_indexes
        slot_of = jnp.full((self.cfg.depth,), -1, jnp.int32)
        for k, layer in enumerate(taps):
            slot_of = slot_of.at[layer].set(k)
        buf = jnp.zeros((max(len(taps), 1),) + x.shape, x.dtype)

        def body(blk, i, carry):
            x, buf = carry
            x = blk(x, cos, sin, mask)
            slot = slot_of[i]
            k = jnp.maximum(slot, 0)
            keep = jax.lax.dynamic_index_in_dim(buf, k, keepdims=False)
            buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(slot >= 0, x, keep), k, 0)
            return x, buf

        x, buf = scan_apply(self.blocks, body, (x, buf), remat=self.remat, policy=self.remat_policy)
        return x, [buf[k] for k in range(len(taps))]
