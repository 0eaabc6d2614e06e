"""Ahead-of-time compile time of a real-size forward and train step: per-layer loop vs scanned layers, at two depths.

Nothing is allocated: the model is `nnx.eval_shape`d, the batch is `jax.ShapeDtypeStruct`s, and each function goes
through `jax.jit(f).lower(*abstract).compile()`. The text decoder gets `depth` layers and the ViT `depth * 6 // 7`
blocks (28 -> 24, the 2B tower; 4 -> 3), DeepStack at the same relative blocks; one image per row.

    nice -n 10 python benchmarks/bench_compile.py [--preset 2b] [--depths 4,28] [--seq 256] [--patches 1024]

Prints one line per (what, depth, layout) with lower and compile seconds, then the deep/shallow ratio per layout
(goal for scan: <= 1.5x) and scan vs loop per depth.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from coordexp_jax.model.config import ModelConfig
from coordexp_jax.model.qwen3vl import Qwen3VL


def config_at(preset: str, depth: int, scan: bool) -> ModelConfig:
    base = ModelConfig.preset(preset)
    vd = max(depth * 6 // 7, 3)
    ds = tuple(sorted({min(vd - 1, round(i * vd / base.vision.depth)) for i in base.vision.deepstack_visual_indexes}))
    return dataclasses.replace(base, scan_layers=scan,
                               text=dataclasses.replace(base.text, num_hidden_layers=depth),
                               vision=dataclasses.replace(base.vision, depth=vd, deepstack_visual_indexes=ds))


def abstract_batch(cfg: ModelConfig, batch: int, seq: int, patches: int) -> dict:
    v = cfg.vision
    sds = jax.ShapeDtypeStruct
    return {
        "input_ids": sds((batch, seq), jnp.int32), "attention_mask": sds((batch, seq), jnp.int32),
        "positions": sds((3, batch, seq), jnp.int32), "targets": sds((batch, seq), jnp.int32),
        "pixel_values": sds((batch, patches, v.patch_dim), jnp.float32),
        "vision_segment_ids": sds((batch, patches), jnp.int32),
        "vision_pos_taps": sds((batch, patches, 4), jnp.int32),
        "vision_pos_weights": sds((batch, patches, 4), jnp.float32),
        "vision_rope_rc": sds((batch, patches, 2), jnp.int32),
        "visual_index": sds((batch, seq), jnp.int32),
    }


def compile_times(cfg: ModelConfig, what: str, args) -> tuple[float, float, float]:
    """(lower seconds, compile seconds, CPU seconds of both) of the forward ('forward') or an AdamW train step
    ('train', remat on)."""
    remat = what == "train"
    model = nnx.eval_shape(lambda: Qwen3VL(cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=remat))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = abstract_batch(cfg, args.batch, args.seq, args.patches)

    def hidden(p, b):
        m = nnx.merge(graphdef, p, rest)
        return m(b["input_ids"], b["positions"], b["attention_mask"], b)

    if what == "forward":
        fn, abstract = jax.jit(hidden), (params, batch)
    else:
        tx = optax.adamw(1e-5)
        opt = jax.eval_shape(tx.init, params)

        def loss(p, b):
            m = nnx.merge(graphdef, p, rest)
            logits = m.lm_logits(hidden(p, b))
            lp = jax.nn.log_softmax(logits, -1)
            return -jnp.mean(jnp.take_along_axis(lp, b["targets"][..., None], -1))

        def step(p, o, b):
            g = jax.grad(loss)(p, b)
            upd, o = tx.update(g, o, p)
            return optax.apply_updates(p, upd), o

        fn, abstract = jax.jit(step, donate_argnums=(0, 1)), (params, opt, batch)
    c0, t0 = time.process_time(), time.perf_counter()
    lowered = fn.lower(*abstract)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1, time.process_time() - c0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="2b")
    ap.add_argument("--depths", default="4,28")
    ap.add_argument("--what", default="forward,train")
    ap.add_argument("--layouts", default="loop,scan")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--patches", type=int, default=1024, help="ViT patches per image slot (one slot per row)")
    a = ap.parse_args()
    depths = [int(x) for x in a.depths.split(",")]
    print(f"# {a.preset}, batch {a.batch}x{a.seq}, {a.patches} patches/row, bf16 compute, f32 params; jax "
          f"{jax.__version__} on {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    res, cpus = {}, {}
    for what in a.what.split(","):
        for depth in depths:
            for layout in a.layouts.split(","):
                cfg = config_at(a.preset, depth, layout == "scan")
                lo, co, cpu = compile_times(cfg, what, a)
                res[what, depth, layout] = lo + co
                cpus[what, depth, layout] = cpu
                print(f"{what:8s} text layers {depth:3d} (ViT {cfg.vision.depth:2d}) {layout:5s}: lower {lo:6.1f} s  "
                      f"compile {co:6.1f} s  total {lo + co:6.1f} s  (process CPU {cpu:6.1f} s)", flush=True)
    d0, d1 = min(depths), max(depths)
    for what in a.what.split(","):
        for layout in a.layouts.split(","):
            if (what, d0, layout) in res and (what, d1, layout) in res:
                print(f"{what:8s} {layout:5s}: {d1}/{d0} layers = {res[what, d1, layout] / res[what, d0, layout]:.2f}x "
                      f"wall, {cpus[what, d1, layout] / cpus[what, d0, layout]:.2f}x CPU")
        for depth in depths:
            if (what, depth, "loop") in res and (what, depth, "scan") in res:
                print(f"{what:8s} {depth:3d} layers: loop/scan = "
                      f"{res[what, depth, 'loop'] / res[what, depth, 'scan']:.2f}x wall, "
                      f"{cpus[what, depth, 'loop'] / cpus[what, depth, 'scan']:.2f}x CPU")
    print(f"# load at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
