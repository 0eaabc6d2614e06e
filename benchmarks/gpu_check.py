"""GPU check: the four figures to read off a lent GPU in one run (docs/scaling.md, "GPU check").

1. bf16 parity: logits of the same weights with float32 and with bfloat16 compute (parameters float32), on a
   prompt with one image: largest |difference| relative to the float32 logits' spread, top-1 agreement, KL.
2. decode share of the memory-bandwidth limit: the jitted sampler's decode-only tok/s at batch 1 against
   read bandwidth / weight bytes read per step (`bench_rollout.read_bandwidth`, `text_weight_bytes`).
3. 2B train-step MFU: step time of the Qwen3-VL-2B text shape (bf16 compute, float32 parameters and AdamW, remat)
   through the project's train step (`bench_train_step.bench_jax`); model FLOPs per step from PaLM's formula
   (Chowdhery et al. 2022, appendix B): 6 N T + 12 L H S T (N matmul parameters, T = B S tokens, L layers,
   H width), over the measured bf16 matmul peak and over the chip's nominal dense bf16 peak.
4. attention speed: forward + backward of one decoder attention call (GQA, causal + padding mask) with
   `ModelConfig.attention` = 'dense' against 'cudnn' (cuDNN flash attention) and 'blockwise', at S = 2k/4k/8k.

    bash benchmarks/gpu/run.sh                    # on the GPU machine (installs carried wheels first)
    python benchmarks/gpu_check.py --smoke        # tiny sizes on any backend (CPU: cuDNN via its XLA fallback)

Prints one line per figure; `--json PATH` also writes them as JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from coordexp_jax.cli import ArgumentParser  # noqa: E402

# dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, without sparsity)
NOMINAL_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


@functools.lru_cache(maxsize=None)
def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _best(f, *a, repeats: int = 3) -> float:
    """Seconds of the fastest call (`bench_rollout.best_time`)."""
    return _bench_module("bench_rollout").best_time(f, *a, repeats=repeats)


def nominal_peak_tflops(device_kind: str) -> float | None:
    for k, v in NOMINAL_BF16_TFLOPS.items():
        if k.lower() in device_kind.lower():
            return v
    return None


# ------------------------------------------------------------------------------------------------- 1. parity
def bf16_parity(cfg, m32) -> dict:
    """float32 vs bfloat16 compute of the same float32 weights on one prompt with an image (the vision tower runs).
    Returns max |dlogit| / std(float32 logits), top-1 agreement over positions, mean KL(f32 || bf16) in nats."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from coordexp_jax.model.inputs import build_model_inputs
    from coordexp_jax.model.qwen3vl import Qwen3VL

    br = _bench_module("bench_rollout")
    ids, mask, grids, pvs = br.make_prompts(cfg, 2)
    inp = build_model_inputs(ids, mask, grids, pvs, config=cfg)
    vision = {k: jnp.asarray(v) for k, v in inp.items() if k.startswith("vision_") or k in ("pixel_values",
                                                                                          "visual_index")}
    g16, _ = nnx.split(nnx.eval_shape(lambda: Qwen3VL(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))))  # graph only
    _, state = nnx.split(m32)

    def logits(graphdef, st):
        model = nnx.merge(graphdef, st)
        h = model(jnp.asarray(inp["input_ids"]), jnp.asarray(inp["positions"]), jnp.asarray(inp["attention_mask"]),
                  vision)
        return model.lm_logits(h).astype(jnp.float32)[..., :cfg.vocab_size]

    g32, _ = nnx.split(m32)
    l32 = np.asarray(jax.jit(functools.partial(logits, g32))(state), np.float64)
    l16 = np.asarray(jax.jit(functools.partial(logits, g16))(state), np.float64)
    lp32 = l32 - np.logaddexp.reduce(l32, -1, keepdims=True)
    lp16 = l16 - np.logaddexp.reduce(l16, -1, keepdims=True)
    kl = float(np.mean(np.sum(np.exp(lp32) * (lp32 - lp16), -1)))
    return {"max_abs_diff_rel": float(np.max(np.abs(l32 - l16)) / np.std(l32)),
            "top1_agreement": float(np.mean(l32.argmax(-1) == l16.argmax(-1))), "kl_nats": kl,
            "positions": int(l32.shape[0] * l32.shape[1])}


# ------------------------------------------------------------------------------------------------- 2. decode
def decode_share(cfg, model, new_tokens: int, bw_bytes: int) -> dict:
    """Decode-only tok/s of the jitted sampler at batch 1 (float32 weights) and its share of the read-rate limit."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from coordexp_jax.data.tokenizer import TokenIds
    from coordexp_jax.model.inputs import build_model_inputs
    from coordexp_jax.model.qwen3vl import Qwen3VL
    from coordexp_jax.rollout.sampler import Sampler, SamplerConfig, bucket_inputs

    br = _bench_module("bench_rollout")
    bw = br.read_bandwidth(bw_bytes)
    # a stop token that is never emitted: every step decodes (as in bench_rollout)
    tid = TokenIds(vocab_size=cfg.vocab_size, endoftext=0, im_start=1, im_end=-1,
                   vision_start=cfg.vision_start_token_id, vision_end=cfg.vision_end_token_id,
                   image_pad=cfg.image_token_id, video_pad=cfg.video_token_id, coord_wildcard=0,
                   coord_start=cfg.vocab_size - 1000 - 20, num_bins=1000)
    ids, mask, grids, pvs = br.make_prompts(cfg, 1)
    inp = build_model_inputs(ids, mask, grids, pvs, config=cfg)
    s = Sampler(model, tid, SamplerConfig(max_new_tokens=new_tokens))
    s.generate(inp)  # compile
    dev = {k: jnp.asarray(v) for k, v in bucket_inputs(inp, pad_id=tid.pad)[0].items()}
    td = []
    for r in range(3):
        carry = jax.block_until_ready(s._prefill(s.state, dev, jax.random.key(r)))
        t0 = time.perf_counter()
        jax.block_until_ready(s._decode(s.state, carry)["tokens"])
        td.append(time.perf_counter() - t0)
    tps = (new_tokens - 1) / float(np.median(td))
    wbytes = br.text_weight_bytes(cfg)
    limit = bw["read_GBps"] * 1e9 / wbytes
    return {"read_GBps": bw["read_GBps"], "weight_MB": wbytes / 1e6, "decode_tok_s": tps, "limit_tok_s": limit,
            "share": tps / limit}


# ------------------------------------------------------------------------------------------------- 3. MFU
def train_mfu(argv: list[str], device_kind: str) -> dict:
    """Step time of `bench_train_step.bench_jax` with `argv` (its flags) and the model FLOPs utilisation."""
    bts = _bench_module("bench_train_step")
    a = bts.parse(argv)
    mc = bts.model_config(a)
    if a.dtype == "bfloat16" and _backend() == "gpu":
        mc = dataclasses.replace(mc, attention="cudnn")
    ids = bts.batch_np(a)
    peak = bts.matmul_peak(8192 if _backend() == "gpu" else 512, dtype=a.dtype)
    j = bts.bench_jax(a, mc, ids)
    T = a.batch * a.seq
    n_matmul = j["params"] - mc.padded_vocab_size * a.hidden  # the input embedding is a gather, not a matmul
    flops = 6 * n_matmul * T + 12 * a.layers * a.hidden * a.seq * T
    nominal = nominal_peak_tflops(device_kind)
    return {"shape": a.shape, "batch": a.batch, "seq": a.seq, "dtype": a.dtype, "attention": mc.attention,
            "params": j["params"], "step_s": j["step_s"], "compile_s": j["first_step_s"], "tflop_per_step": flops / 1e12,
            "tflops": flops / j["step_s"] / 1e12, "matmul_peak_tflops": peak / 1e3,
            "mfu_measured_peak": flops / j["step_s"] / 1e9 / peak,
            "mfu_nominal": (flops / j["step_s"] / 1e12 / nominal) if nominal else None}


# ------------------------------------------------------------------------------------------------- 4. attention
def attention_speed(seqs, heads: int, kv_heads: int, head_dim: int, dtype: str, impls) -> list[dict]:
    """Forward + backward seconds of one attention call per implementation (causal, 1/8 of each row left-padded)."""
    import jax
    import jax.numpy as jnp

    from coordexp_jax.model import attention as A

    dt = jnp.dtype(dtype)
    rows = []
    for S in seqs:
        r = jax.random.split(jax.random.key(0), 4)
        q = jax.random.normal(r[0], (1, S, heads, head_dim), dt)
        k = jax.random.normal(r[1], (1, S, kv_heads, head_dim), dt)
        v = jax.random.normal(r[2], (1, S, kv_heads, head_dim), dt)
        ct = jax.random.normal(r[3], (1, S, heads * head_dim), dt)
        am = (jnp.arange(S) >= S // 8).astype(jnp.int32)[None]
        row = {"S": S}
        ref = None
        for impl in impls:
            if impl == "cudnn" and _backend() != "gpu":  # the same plumbing through XLA (no cuDNN here)
                fn = functools.partial(A.cudnn_attention, implementation="xla")
            else:
                fn = A.attention

            def loss(q, k, v, impl=impl, fn=fn):
                out = fn(q, k, v, A.AttentionMask.causal_padding(am, "cudnn" if impl == "cudnn" else impl), dt)
                out = jnp.where(am[..., None] > 0, out, 0)  # padded queries are never used
                return jnp.sum((out * ct).astype(jnp.float32)), out

            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
            (_, out), grads = step(q, k, v)
            row[f"{impl}_ms"] = 1e3 * _best(step, q, k, v)
            o = np.asarray(out.astype(jnp.float32))
            if ref is None:
                ref = o
            else:
                row[f"{impl}_max_diff"] = float(np.max(np.abs(o - ref)))
        rows.append(row)
    return rows


def _backend() -> str:
    import jax

    return jax.default_backend()


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds, any backend): checks the script runs")
    p.add_argument("--only", default="parity,decode,mfu,attention", help="comma-separated subset")
    p.add_argument("--train_batch", type=int, default=8)
    p.add_argument("--train_seq", type=int, default=2048)
    p.add_argument("--json", default="", help="also write the results here")
    a = p.parse_args(argv)
    import jax

    with jax.default_matmul_precision("highest"):  # float32 means float32 (no TF32) in the parity and decode
        return _run(a)


def _run(a):
    import jax

    dev = jax.devices()[0]
    kind = str(dev.device_kind)
    print(f"device: {kind} x{jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}"
          f"{' [smoke: tiny sizes]' if a.smoke else ''}", flush=True)
    only = set(a.only.split(","))
    br = _bench_module("bench_rollout")
    from coordexp_jax.model.config import tiny_config

    cfg = tiny_config(vocab_size=2000, tie_word_embeddings=True) if a.smoke else br.config_100m()
    res = {"device": kind, "backend": jax.default_backend(), "smoke": a.smoke}
    if only & {"parity", "decode"}:  # one float32 model (random init) for both
        import jax.numpy as jnp
        from flax import nnx

        from coordexp_jax.model.qwen3vl import Qwen3VL

        model = Qwen3VL(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    if "parity" in only:
        r = res["parity"] = bf16_parity(cfg, model)
        print(f"bf16 parity ({'tiny' if a.smoke else '100M'}, {r['positions']} positions): max |dlogit| = "
              f"{r['max_abs_diff_rel']:.3g} x std(f32 logits), top-1 agreement {r['top1_agreement']:.4f}, "
              f"KL(f32||bf16) {r['kl_nats']:.3g} nats", flush=True)
    if "decode" in only:
        r = res["decode"] = decode_share(cfg, model, 16 if a.smoke else 128, (64 << 20) if a.smoke else (4 << 30))
        print(f"decode B=1 ({'tiny' if a.smoke else '100M'}, f32 weights {r['weight_MB']:.1f} MB/step): "
              f"{r['decode_tok_s']:.1f} tok/s; limit {r['limit_tok_s']:.1f} tok/s at {r['read_GBps']:.1f} GB/s "
              f"read -> {100 * r['share']:.0f}% of the bandwidth limit", flush=True)
    if "mfu" in only:
        targs = (["--shape", "100m", "--hidden", "64", "--layers", "1", "--vocab", "2000", "--batch", "1", "--seq",
                  "32", "--steps", "2", "--skip_torch"] if a.smoke else
                 ["--shape", "2b", "--dtype", "bfloat16", "--remat", "--batch", str(a.train_batch), "--seq",
                  str(a.train_seq), "--steps", "5", "--skip_torch"])
        r = res["mfu"] = train_mfu(targs, kind)
        nom = f", {100 * r['mfu_nominal']:.1f}% of the nominal peak" if r["mfu_nominal"] else ""
        print(f"train step ({r['shape']}, {r['batch']}x{r['seq']}, {r['dtype']}, attention {r['attention']}): "
              f"{r['step_s'] * 1e3:.1f} ms/step, {r['tflop_per_step']:.3g} TFLOP/step (6NT + 12LHST) -> "
              f"{r['tflops']:.1f} TFLOP/s = MFU {100 * r['mfu_measured_peak']:.1f}% of the measured matmul peak "
              f"({r['matmul_peak_tflops']:.0f} TFLOP/s){nom}; compile + first step {r['compile_s']:.1f} s", flush=True)
    if "attention" in only:
        impls = ["dense", "cudnn", "blockwise"]
        rows = res["attention"] = (attention_speed((128,), 4, 2, 16, "float32", impls) if a.smoke else
                                   attention_speed((2048, 4096, 8192), 16, 8, 128, "bfloat16", impls))
        for r in rows:
            print(f"attention fwd+bwd S={r['S']}: " + ", ".join(
                f"{i} {r[f'{i}_ms']:.2f} ms" for i in impls) + f"; cudnn x{r['dense_ms'] / r['cudnn_ms']:.2f} vs "
                f"dense (max |out diff| {r['cudnn_max_diff']:.2g}), blockwise x{r['dense_ms'] / r['blockwise_ms']:.2f}",
                flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
