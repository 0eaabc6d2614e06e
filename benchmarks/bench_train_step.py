"""Train-step throughput: our jitted train step vs transformers + torch (forward, backward, AdamW) on the same
~100M-parameter Qwen3-VL-shaped text config and batch, on this CPU; and model FLOPs utilisation against this CPU's
measured float32 matmul peak (measured here).

    python benchmarks/bench_train_step.py [--batch 4 --seq 256 --steps 5 --threads 2]

On a GPU (a 2B-shaped text config, bf16 compute with float32 parameters and AdamW, remat, no torch):

    python benchmarks/bench_train_step.py --shape 2b --dtype bfloat16 --remat --batch 8 --seq 2048 --skip_torch

Model FLOPs per step (PaLM appendix B): 6 * N * T + 12 * L * H * S * T, with N the parameters used in matmuls
(everything but the input embedding gather), T = B * S tokens, L layers, H width. Both sides compute the full
float32 logits and the full-vocabulary CE; the optimizer is AdamW on every parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from coordexp_jax.cli import ArgumentParser


def parse(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shape", choices=["100m", "2b"], default="100m",
                    help="2b: Qwen3-VL-2B's text shape (hidden 2048, 28 layers, MLP 6144, 16/8 heads, vocab 151936); "
                         "overrides --hidden/--layers/--vocab")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="compute dtype (parameters and optimizer stay float32); the peak is measured in it")
    ap.add_argument("--remat", action="store_true", help="rematerialise each decoder layer")
    ap.add_argument("--skip_torch", action="store_true")
    a = ap.parse_args(argv)
    if a.shape == "2b":
        a.hidden, a.layers, a.vocab = 2048, 28, 151936
    return a


def model_config(a):
    from coordexp_jax.model.config import ModelConfig, TextConfig, VisionConfig

    if a.shape == "2b":
        heads, head_dim, mlp, mrope = 16, 128, 6144, (24, 20, 20)
    else:
        heads, head_dim, mlp, mrope = a.hidden // 64, 64, 4 * a.hidden, (12, 10, 10)
    text = TextConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=mlp,
                      num_hidden_layers=a.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      head_dim=head_dim, rope_theta=10000.0, mrope_section=mrope,
                      max_position_embeddings=max(4096, a.seq))
    vision = VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=a.hidden,
                          num_position_embeddings=64, deepstack_visual_indexes=(0,))
    return ModelConfig(text=text, vision=vision, image_token_id=a.vocab - 10, video_token_id=a.vocab - 9,
                       vision_start_token_id=a.vocab - 12, vision_end_token_id=a.vocab - 11)


def batch_np(a):
    import numpy as np

    r = np.random.default_rng(0)
    ids = r.integers(0, a.vocab - 20, (a.batch, a.seq)).astype(np.int32)
    return ids


def matmul_peak(n: int = 2048, reps: int = 10, dtype: str = "float32") -> float:
    """Best-of GFLOP/s of an n x n x n matmul in `dtype` under jit on the default device."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    y = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(x, y).block_until_ready()
    best = 1e9
    for _ in range(reps):
        t = time.perf_counter()
        f(x, y).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def bench_jax(a, mc, ids):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from coordexp_jax.model.qwen3vl import Qwen3VL
    from coordexp_jax.train import config as C, optim, sharding as shd, state as S, step as ST
    from coordexp_jax.train.objective import Stage1Objective

    cfg = C.base_config()
    cfg.optim.lr, cfg.optim.clip_norm, cfg.optim.weight_decay = 1e-4, 0.0, 0.01
    cfg.mesh.data = 1
    cfg.model.dtype, cfg.model.remat = a.dtype, a.remat
    cfg = C.validate(cfg)
    mesh = shd.make_mesh(cfg.mesh, jax.devices()[:1])
    obj = Stage1Objective(weights={"ce": 1.0}, coord_start=0, vocab_size=mc.vocab_size)

    def make_tx(p):
        return optim.make_optimizer(cfg, p, 100, mc.padded_vocab_size, 0)[0]

    dtype = jnp.dtype(a.dtype)
    g, st, sh, _ = S.create_state(lambda: Qwen3VL(mc, dtype=dtype, remat=a.remat, rngs=nnx.Rngs(0)),
                                  optim.trainable_filter(cfg), make_tx, mesh,
                                  cfg.mesh.rules, 0)
    tx = make_tx(st.params)
    fn = ST.jit_train_step(ST.make_train_step(g, obj, tx), sh, mesh)
    B, Sq = ids.shape
    pos = np.broadcast_to(np.arange(Sq, dtype=np.int32), (3, B, Sq))
    b = {"input_ids": ids[None], "positions": pos[None].copy(), "attention_mask": np.ones((1, B, Sq), np.int32),
         "targets": np.roll(ids, -1, 1)[None], "loss_mask": np.ones((1, B, Sq), np.float32),
         "coord_mask": np.zeros((1, B, Sq), bool), "box_valid": np.zeros((1, B, 1), bool),
         "box_pos": np.zeros((1, B, 1, 4), np.int32), "box_target": np.zeros((1, B, 1, 4), np.float32)}
    gb = shd.put_batch(b, shd.batch_shardings(b, mesh))
    n_params = sum(x.size for x in jax.tree.leaves(st.params))
    t = time.perf_counter()
    st, m = fn(st, gb)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    st, m = fn(st, gb)
    jax.block_until_ready(m)
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        st, m = fn(st, gb)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    return {"params": int(n_params), "step_s": float(np.median(times)), "first_step_s": compile_s,
            "loss": float(m["loss"])}


def bench_torch(a, mc, ids):
    import numpy as np
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    hf = Qwen3VLConfig(**mc.to_hf())
    model = Qwen3VLForConditionalGeneration(hf).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    x = torch.from_numpy(ids.astype(np.int64))
    labels = x.clone()
    am = torch.ones_like(x)

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=x, attention_mask=am, labels=labels)
        out.loss.backward()
        opt.step()
        return float(out.loss)

    step()
    step()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    n = sum(p.numel() for p in model.parameters())
    return {"params": int(n), "step_s": float(np.median(times)), "loss": loss}


def main():
    a = parse()
    import jax

    mc = model_config(a)
    ids = batch_np(a)
    T = a.batch * a.seq
    on_cpu = jax.default_backend() == "cpu"
    n_peak = 2048 if on_cpu else 8192
    peak_before = matmul_peak(n_peak, dtype=a.dtype)
    j = bench_jax(a, mc, ids)
    # The peak drifts with the load of a shared machine: measure it on both sides of the step timing, keep the
    # larger (the lower MFU).
    peak = max(peak_before, matmul_peak(n_peak, dtype=a.dtype))
    res = {"device": str(jax.devices()[0].device_kind), "shape": a.shape, "dtype": a.dtype, "remat": a.remat,
           "batch": a.batch, "seq": a.seq, "peak_gflops": peak, "peak_gflops_before": peak_before}
    H, Lr, V = a.hidden, a.layers, a.vocab
    embed_in = mc.padded_vocab_size * H
    n_matmul = j["params"] - embed_in
    flops = 6 * n_matmul * T + 12 * Lr * H * a.seq * T
    res["jax"] = dict(j, samples_per_s=a.batch / j["step_s"], mfu=flops / j["step_s"] / 1e9 / peak)
    res["model_gflop_per_step"] = flops / 1e9
    if a.dtype != "float32" and not a.skip_torch:
        print("torch side runs in float32 only: skipped for", a.dtype)
        a.skip_torch = True
    if not a.skip_torch:
        t = bench_torch(a, mc, ids)
        res["torch"] = dict(t, samples_per_s=a.batch / t["step_s"], mfu=flops / t["step_s"] / 1e9 / peak)
        res["speedup_jax_over_torch"] = t["step_s"] / j["step_s"]
    print(json.dumps(res, indent=2))
    print(f"{res['device']}: params {j['params'] / 1e6:.1f}M (jax, vocab padded to {mc.padded_vocab_size}), "
          f"batch {a.batch}x{a.seq}, {a.dtype}{' remat' if a.remat else ''}, matmul peak {peak:.0f} GFLOP/s")
    print(f"jax   : {res['jax']['samples_per_s']:.2f} samples/s, step {j['step_s'] * 1e3:.0f} ms, "
          f"MFU {100 * res['jax']['mfu']:.1f}%")
    if "torch" in res:
        print(f"torch : {res['torch']['samples_per_s']:.2f} samples/s, step {res['torch']['step_s'] * 1e3:.0f} ms, "
              f"MFU {100 * res['torch']['mfu']:.1f}%  -> jax/torch speed {res['speedup_jax_over_torch']:.2f}x")


if __name__ == "__main__":
    main()
