"""Per-layer memory of attention: one Qwen3-VL-2B decoder layer (hidden 2048, 16 query / 8 kv heads of 128, MLP
6144), forward + backward (gradients of the parameters and the input), compiled ahead of time on abstract inputs
(no arrays allocated) with each attention implementation; prints XLA's temporary bytes and the dense/blockwise
ratio per sequence length.

    python benchmarks/bench_attention_memory.py [--seqs 2048 4096 8192 --batch 1 --dtype bfloat16 --vit]

What is measured: `jax.jit(grad).lower(...).compile().memory_analysis().temp_size_in_bytes` on this backend. On
XLA:CPU the dense path is the CPU variant with a hand-written VJP (model/attention.py), which keeps the float32
probabilities [B, 8, 2*S, S] for the backward; `--einsum` measures the autodiff einsum path that GPU/TPU run
instead. XLA:CPU fuses less than GPU/TPU compilers, so absolute bytes are upper bounds; the S-scaling is the
point: dense grows as S^2, blockwise as S. `--vit` measures one ViT block of the 2B vision tower instead (hidden
1024, 16 heads of 64, MLP 4096) over one image slot of S patches (a 768 px image has 2304).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from coordexp_jax.cli import ArgumentParser
from coordexp_jax.model import attention as attn_lib
from coordexp_jax.model.attention import AttentionMask
from coordexp_jax.model.config import ModelConfig
from coordexp_jax.model.text import DecoderLayer
from coordexp_jax.model.vision import VisionBlock

GIB = 2.0 ** 30


def parse(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                    help="compute dtype (parameters float32)")
    ap.add_argument("--impls", nargs="+", default=["dense", "blockwise"], choices=["dense", "blockwise", "none"],
                    help="none: the layer with attention replaced by passing the queries through (what the rest of "
                         "the layer costs)")
    ap.add_argument("--einsum", action="store_true", help="dense = the autodiff einsum path (what GPU/TPU run)")
    ap.add_argument("--vit", action="store_true", help="one ViT block over one slot instead of a decoder layer")
    return ap.parse_args(argv)


def _no_attention(q, k, v, mask, dtype):
    """The baseline: queries passed through [B,S,nh,hd] -> [B,S,nh*hd] (k, v kept alive by a zero-weight term)."""
    B, S, nh, hd = q.shape
    return (q + 0 * jnp.sum(k) + 0 * jnp.sum(v)).astype(dtype).reshape(B, S, nh * hd)


def layer_grad_memory(impl: str, S: int, *, batch: int, dtype, vit: bool) -> dict:
    """AOT-compiles d(sum(layer(x)))/d(params, x) for one layer with attention `impl`; returns bytes and seconds."""
    import coordexp_jax.model.text as text_mod
    import coordexp_jax.model.vision as vision_mod

    for mod in (text_mod, vision_mod):
        mod.attention = _no_attention if impl == "none" else attn_lib.attention
    impl = "dense" if impl == "none" else impl
    mc = ModelConfig.preset("2b")
    if vit:
        cfg = mc.vision
        graphdef, state = nnx.split(nnx.eval_shape(lambda: VisionBlock(cfg, dtype=dtype, param_dtype=jnp.float32,
                                                                        rngs=nnx.Rngs(0))))
        width, hd = cfg.hidden_size, cfg.head_dim
        mask_of = lambda ids: AttentionMask.segments(ids, impl)  # noqa: E731
    else:
        cfg = mc.text
        graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLayer(cfg, dtype=dtype, param_dtype=jnp.float32,
                                                                         rngs=nnx.Rngs(0))))
        width, hd = cfg.hidden_size, cfg.head_dim
        mask_of = lambda am: AttentionMask.causal_padding(am, impl)  # noqa: E731

    def loss(state, x, cos, sin, ids):
        layer = nnx.merge(graphdef, state)
        out = layer(x, cos, sin, mask_of(ids))
        y = out if vit else out[0]
        return jnp.sum(y.astype(jnp.float32))

    args = (state, jax.ShapeDtypeStruct((batch, S, width), dtype), jax.ShapeDtypeStruct((batch, S, hd), jnp.float32),
            jax.ShapeDtypeStruct((batch, S, hd), jnp.float32), jax.ShapeDtypeStruct((batch, S), jnp.int32))
    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    secs = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    return dict(temp=ma.temp_size_in_bytes, args=ma.argument_size_in_bytes, out=ma.output_size_in_bytes,
                compile_s=secs)


def main(argv=None):
    a = parse(argv)
    dtype = jnp.dtype(a.dtype)
    if a.einsum:  # the dense path GPU/TPU take (gqa_attention picks the hand-written VJP on the CPU backend)
        attn_lib.gqa_attention = attn_lib._attention_einsum
    what = "ViT block (2B vision tower)" if a.vit else "decoder layer (2B text)"
    print(f"one {what}, forward + backward, batch {a.batch}, {a.dtype} compute, float32 params, "
          f"backend {jax.default_backend()}, dense = {'autodiff einsum' if a.einsum else 'as this backend runs it'}")
    print(f"{'S':>6} " + " ".join(f"{i + ' temp GiB':>18}" for i in a.impls) + "  dense/blockwise  compile s")
    for S in a.seqs:
        res = {i: layer_grad_memory(i, S, batch=a.batch, dtype=dtype, vit=a.vit) for i in a.impls}
        ratio = (res["dense"]["temp"] / res["blockwise"]["temp"]) if {"dense", "blockwise"} <= set(res) else float("nan")
        print(f"{S:>6} " + " ".join(f"{res[i]['temp'] / GIB:>18.3f}" for i in a.impls)
              + f"  {ratio:>15.1f}  " + " ".join(f"{res[i]['compile_s']:.1f}" for i in a.impls), flush=True)


if __name__ == "__main__":
    main()
