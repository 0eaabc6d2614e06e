"""Rollout speed: our jitted prefill + while_loop sampler vs transformers `generate`, same converted weights,
same prompts (one image each), float32, greedy, a fixed number of new tokens, batch 1 and 8.

Two regimes:
- tiny: the demo-like tiny config (vocab 1000), where transformers is bound by Python overhead per token;
- 100m: text vocab 151936, H 512, 8 layers, 8/4 heads, hd 64, inter 1536, tied (~103M parameters), where a decode
  step is bound by memory bandwidth: every step reads all text weights (the tied 152k x 512 embedding as lm_head
  plus the layers). The bound is measured here: tok/s limit at batch 1 = read bandwidth / weight bytes per step.

Run: python benchmarks/bench_rollout.py [--regimes tiny,100m] [--new_tokens 64] [--repeats 3] [--rounds 5] [--profile]
Prints a table and the ratios; end-to-end times include prefill (vision tower + prompt) for both sides.
--rounds: the share of the limit at batch 1 from interleaved rounds of [read rate, decode-only], each round's
decode against the read rate measured just before it; the median is the figure to quote. On a shared host the
read rate moves by ~30% between runs and a limit measured once, minutes before the decode, does not describe it.
--profile: one more batch-1 decode call under `jax.profiler`, then the ops that took the most time per decode step
(XLA:CPU thunk names, e.g. `dot.N` = an Eigen matmul, `ynn_fusion.N` = a YNNPACK one) and how busy each XLA
thread was (a single-threaded op keeps one thread busy).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--profile" in sys.argv:  # per-thunk trace events of XLA:CPU (read when the backend starts)
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from coordexp_jax.data.tokenizer import TokenIds  # noqa: E402
from coordexp_jax.model.config import TextConfig, tiny_config  # noqa: E402
from coordexp_jax.model.hf_reference import build_hf_model, hf_kwargs  # noqa: E402
from coordexp_jax.model.inputs import build_model_inputs  # noqa: E402
from coordexp_jax.rollout.sampler import Sampler, SamplerConfig  # noqa: E402
from coordexp_jax.weights.hf import load_hf_checkpoint  # noqa: E402
from coordexp_jax.cli import ArgumentParser  # noqa: E402


def best_time(f, *a, repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls of f(*a) (after one warm-up call), results awaited."""
    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*a))
        ts.append(time.perf_counter() - t0)
    return min(ts)


def read_probe(n_bytes: int = 1 << 30):
    """The pure-read probes, allocated and compiled once: a full reduction over a 1 GiB float32 array and a
    matrix-vector product over a 1 GiB [N, 512] matrix (the access pattern of a decode step). Returns
    probe(repeats, passes) -> {sum_GBps, gemv_GBps, read_GBps}: the best of `repeats` calls of a jitted loop that
    reads the array `passes` times (each pass depends on the last, so none is hoisted or skipped); read_GBps is the
    larger of the two, the rate the limit uses. passes=1: a burst of ~40 ms; ~25 passes last as long as a decode
    call, the like-for-like comparison (`interleaved_share`)."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    W = x.reshape(-1, 512)
    v = jnp.ones((512,), jnp.float32)

    @functools.partial(jax.jit, static_argnums=1)
    def f_sum(x, passes):
        return jax.lax.fori_loop(0, passes, lambda i, acc: jnp.sum(x + acc * 1e-30), 0.0)

    @functools.partial(jax.jit, static_argnums=2)
    def f_gemv(w, u, passes):
        return jax.lax.fori_loop(0, passes, lambda i, u: u + 1e-30 * (w @ u)[:512], u)

    def probe(repeats: int = 5, passes: int = 1) -> dict:
        r_sum = passes * n_bytes / best_time(f_sum, x, passes, repeats=repeats) / 1e9
        r_gemv = passes * n_bytes / best_time(f_gemv, W, v, passes, repeats=repeats) / 1e9
        return {"sum_GBps": r_sum, "gemv_GBps": r_gemv, "read_GBps": max(r_sum, r_gemv)}

    return probe


def read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> dict:
    """Memory read rates in GB/s (`read_probe`, best of `repeats`) plus a numpy copy (read + write bytes; shown
    only). The limit uses the larger of the two pure-read rates."""
    out = read_probe(n_bytes)(repeats)
    a = np.ones(n_bytes // 4, np.float32)
    b = np.empty_like(a)
    out["copy_GBps"] = 2 * n_bytes / best_time(lambda: np.copyto(b, a), repeats=repeats) / 1e9
    return out


def config_100m():
    cfg = tiny_config(vocab_size=151936, tie_word_embeddings=True)
    text = TextConfig(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, rope_theta=5000000.0,
                      mrope_section=(12, 10, 10), max_position_embeddings=4096)
    vision = dataclasses.replace(cfg.vision, out_hidden_size=512)
    return cfg.replace(text=text, vision=vision)


def make_prompts(cfg, batch: int, seed: int = 0):
    """batch rows: 5 text tokens, vision_start, a 14x20-patch image (70 tokens), vision_end, 7 text tokens (S = 84),
    as in qwen3vl_spec.md §9.1."""
    rng = np.random.default_rng(seed)
    t, h, w = 1, 14, 20
    n_img = t * h * w // 4
    rows, grids, pvs = [], [], []
    for _ in range(batch):
        ids = list(rng.integers(1, 500, 5)) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + \
            [cfg.vision_end_token_id] + list(rng.integers(1, 500, 7))
        rows.append(ids)
        grids.append((t, h, w))
        pvs.append(rng.standard_normal((t * h * w, cfg.vision.patch_dim)).astype(np.float32))
    ids = np.asarray(rows, np.int32)
    mask = np.ones_like(ids)
    return ids, mask, grids, pvs


def text_weight_bytes(cfg) -> int:
    """Bytes of the text weights one decode step reads (float32): embedding/lm_head + layers + final norm."""
    t = cfg.text
    H, I, L = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    attn = H * t.num_attention_heads * t.head_dim * 2 + H * t.num_key_value_heads * t.head_dim * 2 + 2 * t.head_dim
    layer = attn + 3 * H * I + 2 * H
    head = t.vocab_size * H * (1 if cfg.tie_word_embeddings else 2)
    return 4 * (head + L * layer + H)


def bench_hf(hf, ids, mask, grids, pvs, new_tokens, repeats):
    import torch

    kw = hf_kwargs(hf, ids, mask, image_grids=grids, pixel_values_list=pvs)
    gen = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    with torch.no_grad():
        hf.generate(**kw, **gen)  # warm-up
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = hf.generate(**kw, **gen)
            ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), out[:, ids.shape[1]:].numpy()


def bench_ours(model, tid, inp, new_tokens, repeats):
    s = Sampler(model, tid, SamplerConfig(max_new_tokens=new_tokens))
    out = s.generate(inp)  # compile
    ts, tp, td = [], [], []
    from coordexp_jax.rollout.sampler import bucket_inputs

    bucketed, _ = bucket_inputs(inp, pad_id=tid.pad)
    dev = {k: jnp.asarray(v) for k, v in bucketed.items()}
    for r in range(repeats):
        t0 = time.perf_counter()
        out = s.generate(inp)
        ts.append(time.perf_counter() - t0)
        # prefill and decode separately (decode-only tok/s)
        t_pre, t_dec = prefill_decode_seconds(s, dev, seed=r)
        tp.append(t_pre)
        td.append(t_dec)
    return float(np.median(ts)), float(np.median(tp)), float(np.median(td)), out, (s, dev)


def prefill_decode_seconds(s, dev, seed: int = 0) -> tuple[float, float]:
    """Seconds of one prefill of the device batch `dev` and of the decode-only call (the while_loop over the cache)
    that follows it, Sampler `s` (the carry is donated, so every decode call needs a fresh prefill)."""
    t0 = time.perf_counter()
    carry = jax.block_until_ready(s._prefill(s.state, dev, jax.random.key(seed)))
    t1 = time.perf_counter()
    jax.block_until_ready(s._decode(s.state, carry)["tokens"])
    return t1 - t0, time.perf_counter() - t1


def interleaved_share(s, dev, probe, wbytes: int, steps: int, rounds: int) -> list[tuple[float, float, float]]:
    """`rounds` rounds of [read rate, then one decode-only call at batch 1]: the limit and our rate measured back to
    back and over the same length of time (the probe reads its 1 GiB as many times as the decode call reads the
    weights), so that a change of the machine's memory speed (other tenants of a shared host) moves both. Returns
    per round (read GB/s, decode tok/s, share of the limit = decode tok/s / (read rate / weight bytes per step))."""
    passes = max(1, round(steps * wbytes / (1 << 30)))
    out = []
    for r in range(rounds):
        rate = probe(1, passes)["read_GBps"]
        tps = steps / prefill_decode_seconds(s, dev, seed=r)[1]
        out.append((rate, tps, tps / (rate * 1e9 / wbytes)))
    return out


def profile_decode(s, dev, new_tokens, top: int = 8):
    """Traces one decode call of Sampler `s` on device batch `dev`; prints the `top` ops by time per step and the
    busy time per step of each XLA thread (union of its op intervals)."""
    import jax.profiler as jp

    d = tempfile.mkdtemp()
    carry = jax.block_until_ready(s._prefill(s.state, dev, jax.random.key(0)))
    jp.start_trace(d)
    t0 = time.perf_counter()
    jax.block_until_ready(s._decode(s.state, carry)["tokens"])
    wall = time.perf_counter() - t0
    jp.stop_trace()
    pd = jp.ProfileData.from_file(glob.glob(d + "/**/*.xplane.pb", recursive=True)[0])
    steps = new_tokens - 1
    skip = ("ThunkExecutor", "Threadpool", "Slinky", "while", "end: ")
    ops, busy = collections.Counter(), []
    for plane in pd.planes:
        for line in plane.lines:
            if "XLA" not in line.name:
                continue
            iv = sorted((e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events
                        if not e.name.startswith(skip))
            tot, end = 0, 0
            for a, b, n in iv:
                ops[n] += (b - a) / 1e6 / steps
                if b > end:
                    tot, end = tot + b - max(a, end), b
            if tot:
                busy.append(tot / 1e6 / steps)
    print(f"  profile: {wall / steps * 1e3:.2f} ms per decode step; XLA threads busy "
          f"{', '.join(f'{b:.2f}' for b in sorted(busy, reverse=True))} ms per step", flush=True)
    for n, ms in ops.most_common(top):
        print(f"    {n:28s} {ms:7.3f} ms per step", flush=True)


def run_regime(name, cfg, batches, new_tokens, repeats, bw, bw_gemv, profile=False, probe=None, rounds: int = 0):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    hf = build_hf_model(cfg, seed=0, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        _, model = load_hf_checkpoint(d)
    # a stop token that is never emitted: every row generates exactly new_tokens (as min_new_tokens does for HF)
    tid = TokenIds(vocab_size=cfg.vocab_size, endoftext=0, im_start=1, im_end=-1, vision_start=cfg.vision_start_token_id,
                   vision_end=cfg.vision_end_token_id, image_pad=cfg.image_token_id, video_pad=cfg.video_token_id,
                   coord_wildcard=0, coord_start=cfg.vocab_size - 1000 - 20, num_bins=1000)
    wbytes = text_weight_bytes(cfg)
    limit = bw * 1e9 / wbytes
    rows = []
    for B in batches:
        ids, mask, grids, pvs = make_prompts(cfg, B)
        inp = build_model_inputs(ids, mask, grids, pvs, config=cfg)
        t_hf, hf_tok = bench_hf(hf, ids, mask, grids, pvs, new_tokens, repeats)
        t_ours, t_pre, t_dec, out, (sampler, dev) = bench_ours(model, tid, inp, new_tokens, repeats)
        same = float(np.mean(out.tokens == hf_tok))
        n = B * new_tokens
        dec_tps = B * (new_tokens - 1) / t_dec
        rows.append((B, n / t_hf, n / t_ours, t_pre, dec_tps, same))
        print(f"[{name}] B={B}: transformers {n / t_hf:8.1f} tok/s | ours {n / t_ours:8.1f} tok/s end-to-end "
              f"(x{t_hf / t_ours:.1f}); ours prefill {t_pre * 1e3:.0f} ms, decode-only {dec_tps:.1f} tok/s; "
              f"greedy tokens equal to transformers: {same:.3f}", flush=True)
        if profile and B == 1:
            profile_decode(sampler, dev, new_tokens)
        if rounds and B == 1:
            res = interleaved_share(sampler, dev, probe, wbytes, new_tokens - 1, rounds)
            print(f"[{name}] B=1 interleaved, {rounds} rounds of [sustained read rate, decode-only call]: read "
                  f"{min(x[0] for x in res):.1f}-{max(x[0] for x in res):.1f} GB/s, decode-only "
                  f"{min(x[1] for x in res):.1f}-{max(x[1] for x in res):.1f} tok/s, share of the limit per round "
                  f"{' '.join(f'{100 * x[2]:.0f}%' for x in res)}; "
                  f"median {100 * float(np.median([x[2] for x in res])):.0f}%",
                  flush=True)
    gl = bw_gemv * 1e9 / wbytes
    print(f"[{name}] against the matvec read rate ({bw_gemv:.1f} GB/s): limit {gl:.1f} tok/s, ours decode-only "
          f"at B=1 = {100 * rows[0][4] / gl:.0f}%", flush=True)
    print(f"[{name}] text weights read per decode step: {wbytes / 1e6:.1f} MB (float32) -> bandwidth limit at batch 1 "
          f"{limit:.1f} tok/s at {bw:.1f} GB/s; ours decode-only at B=1: {rows[0][4]:.1f} tok/s = "
          f"{100 * rows[0][4] / limit:.0f}% of the limit (end-to-end {100 * rows[0][2] / limit:.0f}%)", flush=True)
    return rows


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regimes", default="tiny,100m")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="trace one batch-1 decode call, print the top ops")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds of [read rate, batch-1 decode-only] for the share of the limit (0: none)")
    a = p.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    bw = read_bandwidth()
    probe = read_probe() if a.rounds else None
    print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()}); "
          f"memory read rates: jitted sum {bw['sum_GBps']:.1f} GB/s, jitted 1 GiB matvec {bw['gemv_GBps']:.1f} "
          f"GB/s, numpy copy {bw['copy_GBps']:.1f} GB/s (read + write); limit uses {bw['read_GBps']:.1f} GB/s", flush=True)
    batches = [int(x) for x in a.batches.split(",")]
    for r in a.regimes.split(","):
        cfg = {"tiny": tiny_config, "100m": config_100m}[r]()
        run_regime(r, cfg, batches, a.new_tokens, a.repeats, bw["read_GBps"], bw["gemv_GBps"], a.profile, probe,
                   a.rounds)


if __name__ == "__main__":
    main()
