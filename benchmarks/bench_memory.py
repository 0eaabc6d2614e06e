"""Per-device memory of the real Stage-1 train step at released sizes, compiled ahead of time on abstract inputs.

Nothing is allocated: the model, optimizer state and batch are `jax.ShapeDtypeStruct`s carrying their target
shardings on a mesh of simulated CPU devices (`--xla_force_host_platform_device_count`, set by this script before
JAX starts), and `jax.jit(train_step).lower(state, batch).compile().memory_analysis()` reports what one device
needs. The step is the one training runs (`train.step.make_train_step` + `jit_train_step`, the state donated) with
the objective, optimizer and mesh rules of `--config` (default: configs/sft_qwen3vl_2b.py: bf16 compute, float32
parameters and AdamW, remat, chunked CE, every Stage-1 term).

    python benchmarks/bench_memory.py --preset 2b --mesh fsdp=8 --batch_per_device 4 --seq_len 2048 \\
        --images_per_row 1 --image_px 768 [--hbm_gib 80]

Model options are ModelConfig fields set with `--model key=value` (e.g. `--model scan_layers=true
--model remat_policy=dots_saveable --model attention=blockwise` where this ModelConfig has those fields), any
training-config key with `--set section.key=value`. Prints the per-device argument / output / temp bytes, their
peak (argument + output - donated + temp), the state's own bytes, and the compile time; `--json` writes them.

XLA:CPU is not the target compiler, and its figures are upper bounds for GPU/TPU:
- bf16 matmuls and convolutions are rewritten to float32 on CPU (operands upcast: f32 copies of bf16 weights and
  activations in temp);
- its `cse_barrier_expander` pass strips remat's optimisation barriers so that CSE merges the recomputation back
  (remat looks useless); this script disables that pass (`--keep_remat`, on by default), which GPU/TPU never run;
- no fused/flash attention kernels (cuDNN, Pallas splash): attention is whatever the model's CPU path is;
- different fusion, scheduling and buffer assignment (no memory-pressure rematerialisation as on TPU).
Not counted here and needed on a real device: the runtime's own reservation (CUDA context, cuBLAS/cuDNN
workspaces, NCCL buffers: ~1-3 GiB on an H100), and fragmentation; hence `--headroom` (default 10%).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coordexp_jax.cli import ArgumentParser  # noqa: E402

AXES = ("data", "fsdp", "tensor")
# Qwen3's tokenizer has 151669 ids; the coordinate vocabulary adds 1000 (tools/expand_coord_vocab.py)
QWEN3_TOKENIZER_IDS = 151669


def parse_mesh(text: str) -> dict:
    """'fsdp=8' / 'data=2,fsdp=4,tensor=1' -> {'data': 2, 'fsdp': 4, 'tensor': 1} (unnamed axes 1)."""
    out = {a: 1 for a in AXES}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        if k not in AXES or not v.isdigit() or int(v) < 1:
            raise ValueError(f"--mesh: '{part}' is not AXIS=SIZE with AXIS in {AXES} and SIZE >= 1")
        out[k] = int(v)
    return out


def literal(v: str):
    """A command-line value as a Python literal where it is one ('true'/'false' as booleans), else the string."""
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def parse(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="2b", help="ModelConfig preset: 2b, 4b, 8b, 32b, tiny")
    ap.add_argument("--mesh", default="fsdp=8", help="mesh sizes, e.g. 'fsdp=8' or 'data=2,fsdp=32' (others 1)")
    ap.add_argument("--batch_per_device", type=float, default=1.0,
                    help="rows per data-parallel device (data x fsdp devices); the global batch is this times "
                         "data*fsdp and must be a whole number")
    ap.add_argument("--seq_len", type=int, default=2048)
    ap.add_argument("--images_per_row", type=int, default=1, help="0 = text only")
    ap.add_argument("--image_px", type=int, default=768, help="square image side in pixels (multiple of 32)")
    ap.add_argument("--max_objects", type=int, default=64, help="box slots per row (data.max_objects)")
    ap.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step (the batch above is each one)")
    ap.add_argument("--config", default="configs/sft_qwen3vl_2b.py",
                    help="training config giving the objective, optimizer, dtypes, remat, ce_chunk and mesh rules")
    ap.add_argument("--vocab_size", type=int, default=QWEN3_TOKENIZER_IDS + 1000,
                    help="tokenizer ids incl. the 1000 coordinate tokens (default: Qwen3's 151669 + 1000)")
    ap.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                    help="a ModelConfig field (model.overrides), e.g. scan_layers=true, attention=blockwise, "
                         "text.num_hidden_layers=4")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a training-config key, e.g. model.remat=false, loss.ce_chunk=1024")
    ap.add_argument("--keep_remat", action=argparse.BooleanOptionalAction, default=True,
                    help="disable XLA:CPU's cse_barrier_expander so that remat survives as on GPU/TPU")
    ap.add_argument("--vocab_parallel", action=argparse.BooleanOptionalAction, default=True,
                    help="--no-vocab_parallel: the chunked head without vocabulary sharding (the weight gathered "
                         "whole on every device, as before it was sharded), for comparison")
    ap.add_argument("--hbm_gib", type=float, default=0.0, help="device memory in GiB: print whether the peak fits")
    ap.add_argument("--headroom", type=float, default=0.10,
                    help="share of --hbm_gib kept free for the runtime (CUDA/cuDNN/NCCL or TPU runtime)")
    ap.add_argument("--dump_hlo", default="", help="write the compiled HLO text to this file")
    ap.add_argument("--json", default="", help="append the result as one JSON line to this file")
    return ap.parse_args(argv)


def set_xla_flags(num_devices: int, keep_remat: bool) -> None:
    """Simulated CPU devices and the remat-preserving pass list; must run before JAX is imported."""
    if "jax" in sys.modules:
        raise RuntimeError("bench_memory: XLA flags must be set before jax is imported")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    if keep_remat and not any("cse_barrier_expander" in f for f in flags):
        flags.append("--xla_disable_hlo_passes=cse_barrier_expander")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"


def nested(key: str, value) -> dict:
    """'text.num_hidden_layers', 4 -> {'text': {'num_hidden_layers': 4}}."""
    out = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        dst[k] = merge(dict(dst.get(k, {})), v) if isinstance(v, dict) else v
    return dst


def build_config(args):
    """The training config: `--config` with the preset, no checkpoint, the batch shape and the overrides."""
    import ml_collections

    from coordexp_jax.train import config as C

    cfg = C.load_config_file(args.config)
    cfg.model.checkpoint = ""
    cfg.model.preset = args.preset
    cfg.data.seq_len = args.seq_len
    cfg.data.max_objects = args.max_objects
    cfg.data.image_size = args.image_px
    cfg.train.grad_accum = args.grad_accum
    for item in args.set:
        key, _, v = item.partition("=")
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = literal(v)
    over = cfg.model.overrides.to_dict()
    for item in args.model:
        key, _, v = item.partition("=")
        over = merge(over, nested(key, literal(v)))
    cfg.model.overrides = ml_collections.ConfigDict(over)
    return C.validate(cfg)


def model_config(cfg, vocab_size: int):
    """The preset with the expanded vocabulary (coordinate tokens at the end) and `model.overrides`; unknown
    ModelConfig fields are an error naming the field."""
    import dataclasses

    from coordexp_jax.model.config import ModelConfig
    from coordexp_jax.train import build as B

    mc = ModelConfig.preset(cfg.model.preset).with_vocab_size(vocab_size)
    over = cfg.model.overrides.to_dict()
    names = {f.name for f in dataclasses.fields(mc)}
    for k in over:
        if k not in names:
            raise SystemExit(f"error: --model {k}=...: this ModelConfig has no field '{k}' (fields: {sorted(names)})")
    if over:
        mc = B._replace_nested(mc, over, "model.overrides")
    return mc


def abstract_batch(args, cfg, mc, global_batch: int):
    """ShapeDtypeStructs of one step's batch `[A, B, ...]` (the training-batch contract, docs/architecture.md)."""
    import jax
    import jax.numpy as jnp

    A, B, S, M = args.grad_accum, global_batch, args.seq_len, args.max_objects
    sds = jax.ShapeDtypeStruct
    batch = {
        "input_ids": sds((A, B, S), jnp.int32), "attention_mask": sds((A, B, S), jnp.int32),
        "positions": sds((A, 3, B, S), jnp.int32), "targets": sds((A, B, S), jnp.int32),
        "loss_mask": sds((A, B, S), jnp.float32), "coord_mask": sds((A, B, S), jnp.bool_),
        "box_pos": sds((A, B, M, 4), jnp.int32), "box_target": sds((A, B, M, 4), jnp.float32),
        "box_valid": sds((A, B, M), jnp.bool_),
    }
    if args.images_per_row > 0:
        v = mc.vision
        side = args.image_px // v.patch_size
        P = side * side  # patches of one image (one temporal patch: the frame repeated)
        I = B * args.images_per_row
        batch.update({
            "pixel_values": sds((A, I, P, v.patch_dim), jnp.float32),
            "vision_segment_ids": sds((A, I, P), jnp.int32), "vision_pos_taps": sds((A, I, P, 4), jnp.int32),
            "vision_pos_weights": sds((A, I, P, 4), jnp.float32), "vision_rope_rc": sds((A, I, P, 2), jnp.int32),
            "visual_index": sds((A, B, S), jnp.int32),
        })
        tokens = args.images_per_row * P // v.spatial_merge_size ** 2
        if tokens >= S:
            raise SystemExit(f"error: {args.images_per_row} image(s) of {args.image_px} px are {tokens} tokens, "
                             f"more than --seq_len {S}")
    return batch


def state_bytes_per_device(abstract_state) -> int:
    """Bytes of one device's shards of the (sharded) state."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(abstract_state):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def run(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from coordexp_jax.train import build as B, objective as O, optim, sharding as shd, state as S, step as ST
    from coordexp_jax.train.state import TrainState

    sizes = parse_mesh(args.mesh)
    if not args.vocab_parallel:
        from coordexp_jax.coord import losses

        losses.VOCAB_AXES = ()  # vocab_parallel_specs then finds no axis: GSPMD's default (gather the weight)
    cfg = build_config(args)
    mc = model_config(cfg, args.vocab_size)
    coord_start = args.vocab_size - 1000
    ids = type("Ids", (), dict(vocab_size=args.vocab_size, has_coords=True, coord_start=coord_start))()
    make_model, _ = B.make_model_fn(cfg, mc, ids)
    mesh = shd.make_mesh(sizes)
    dp = sizes["data"] * sizes["fsdp"]
    global_batch = args.batch_per_device * dp
    if global_batch != int(global_batch) or global_batch < 1:
        raise SystemExit(f"error: --batch_per_device {args.batch_per_device} x {dp} data-parallel devices is not a "
                         f"whole number of rows")
    global_batch = int(global_batch)

    trainable = optim.trainable_filter(cfg)
    graphdef, params_abs, frozen_abs = nnx.eval_shape(lambda: nnx.split(make_model(), trainable, ...))
    box = {}

    def make_tx(p):
        tx, box["sched"] = optim.make_optimizer(cfg, p, cfg.train.steps, mc.padded_vocab_size, coord_start)
        return tx

    tx = make_tx(params_abs)
    ema = cfg.train.ema_decay > 0
    abstract = jax.eval_shape(lambda p, f: TrainState(
        step=jnp.zeros((), jnp.int32), params=p, frozen=f, opt_state=tx.init(p), rng=jax.random.PRNGKey(0),
        ema=jax.tree.map(lambda x: x.astype(jnp.float32), p) if ema else None, skipped=jnp.zeros((), jnp.int32)),
        params_abs, frozen_abs)
    shardings = S.state_shardings(abstract, tx, mesh, cfg.mesh.rules)
    state_in = shd.with_shardings(abstract, shardings)
    batch = abstract_batch(args, cfg, mc, global_batch)
    batch_in = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=jax.sharding.NamedSharding(
        mesh, shd.batch_spec(k, v.shape, mesh))) for k, v in batch.items()}
    objective = O.Stage1Objective.from_config(cfg.loss, coord_start, mc.vocab_size)
    step = ST.jit_train_step(ST.make_train_step(graphdef, objective, tx, box["sched"], cfg.train.ema_decay),
                             shardings, mesh)
    t0 = time.perf_counter()
    lowered = step.lower(state_in, batch_in)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    if args.dump_hlo:
        with open(args.dump_hlo, "w") as f:
            f.write(compiled.as_text())
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params_abs)) + sum(
        math.prod(x.shape) for x in jax.tree.leaves(frozen_abs) if hasattr(x, "shape"))
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    res = {
        "preset": args.preset, "mesh": sizes, "devices": mesh.size, "global_batch": global_batch,
        "batch_per_device": args.batch_per_device, "seq_len": args.seq_len, "images_per_row": args.images_per_row,
        "image_px": args.image_px, "grad_accum": args.grad_accum, "model_overrides": cfg.model.overrides.to_dict(),
        "sets": list(args.set), "dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype,
        "remat": bool(cfg.model.remat), "ce_chunk": int(cfg.loss.ce_chunk), "keep_remat": args.keep_remat,
        "vocab_parallel": args.vocab_parallel,
        "params": int(n_params), "state_bytes": state_bytes_per_device(state_in),
        "argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes, "peak_bytes": peak,
        "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1), "jax": jax.__version__,
    }
    if args.hbm_gib:
        res["hbm_gib"] = args.hbm_gib
        res["fits"] = peak <= args.hbm_gib * 2**30 * (1.0 - args.headroom)
    return res


def report(res: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    mesh = ",".join(f"{k}={v}" for k, v in res["mesh"].items() if v > 1) or "1 device"
    lines = [
        f"preset {res['preset']} ({res['params'] / 1e9:.2f}B params), mesh {mesh} ({res['devices']} simulated CPU "
        f"devices), global batch {res['global_batch']} ({res['batch_per_device']:g}/device) x {res['seq_len']} "
        f"tokens, {res['images_per_row']} image(s)/row of {res['image_px']} px, grad_accum {res['grad_accum']}",
        f"  {res['dtype']} compute, {res['param_dtype']} params, remat {res['remat']}, ce_chunk {res['ce_chunk']}, "
        f"model overrides {res['model_overrides'] or '{}'}, keep_remat {res['keep_remat']}, vocab_parallel "
        f"{res['vocab_parallel']}",
        f"  per device: arguments {gib(res['argument_bytes'])} (state {gib(res['state_bytes'])}), outputs "
        f"{gib(res['output_bytes'])}, donated {gib(res['alias_bytes'])}, temp {gib(res['temp_bytes'])}",
        f"  peak (arguments + outputs - donated + temp): {gib(res['peak_bytes'])}",
        f"  lower {res['lower_s']} s, compile {res['compile_s']} s (jax {res['jax']}, XLA:CPU)",
    ]
    if "fits" in res:
        lines.append(f"  {'FITS' if res['fits'] else 'does NOT fit'} in {res['hbm_gib']:g} GiB with "
                     f"{100 * (1 - res['peak_bytes'] / (res['hbm_gib'] * 2**30)):.0f}% free")
    lines.append("  (XLA:CPU upper bound: bf16 dots upcast to f32, no flash attention kernels, CPU fusion and "
                 "scheduling; see the module docstring)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    sizes = parse_mesh(args.mesh)
    set_xla_flags(math.prod(sizes.values()), args.keep_remat)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    res = run(args)
    print(report(res))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    from coordexp_jax.cli import guard

    sys.exit(guard(main)())
