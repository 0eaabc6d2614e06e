"""Our jitted Qwen3VL forward vs transformers on the same ~100M config and the same 84-token image prompt (CPU).

Config (spec §9.1): text vocab 151936, H 512, 8 layers, 8/4 heads, hd 64, inter 1536, mrope [12,10,10], tied;
the tiny vision tower (2 blocks, 32 wide). Prompt: 5 text + vision_start + 70 image tokens (grid 1x14x20) +
vision_end + 7 text. Weights go HF -> save_pretrained -> our loader, so the logits are also compared.

    python benchmarks/bench_forward.py [--repeats 10]
"""

import argparse
import dataclasses
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from coordexp_jax.model.config import ModelConfig, TextConfig, tiny_config  # noqa: E402
from coordexp_jax.model.hf_reference import build_hf_model, hf_kwargs  # noqa: E402
from coordexp_jax.model.inputs import build_model_inputs  # noqa: E402
from coordexp_jax.weights.hf import load_hf_checkpoint  # noqa: E402
from coordexp_jax.cli import ArgumentParser  # noqa: E402


def bench_config() -> ModelConfig:
    text = TextConfig(vocab_size=151936, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=64, rope_theta=5e6, mrope_section=(12, 10, 10))
    vision = dataclasses.replace(tiny_config().vision, out_hidden_size=512)
    return ModelConfig(text=text, vision=vision, tie_word_embeddings=True)


def median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), float(np.min(ts))


def main():
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = bench_config()
    hf = build_hf_model(cfg, seed=0, perturb=False, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        _, model = load_hf_checkpoint(d)
    n_params = sum(p.numel() for p in hf.parameters())
    rng = np.random.default_rng(0)
    grid = (1, 14, 20)
    pv = rng.standard_normal((280, cfg.vision.patch_dim)).astype(np.float32)
    ids = np.array([list(rng.integers(0, 1000, 5)) + [cfg.vision_start_token_id] + [cfg.image_token_id] * 70
                    + [cfg.vision_end_token_id] + list(rng.integers(0, 1000, 7))], np.int32)
    mask = np.ones_like(ids)
    inp = build_model_inputs(ids, mask, [grid], [pv], config=cfg)
    kw = hf_kwargs(hf, ids, mask, image_grids=[grid], pixel_values_list=[pv])

    def run_hf():
        with torch.no_grad():
            return hf(**kw).logits

    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, b):
        m = nnx.merge(graphdef, state)
        vis = {k: b[k] for k in ("pixel_values", "vision_segment_ids", "vision_pos_taps", "vision_pos_weights",
                                 "vision_rope_rc", "visual_index")}
        return m.lm_logits(m(b["input_ids"], b["positions"], b["attention_mask"], vis))

    batch = {k: jnp.asarray(v) for k, v in inp.items() if k != "rope_deltas"}
    t0 = time.perf_counter()
    ours = np.asarray(fwd(state, batch))
    compile_s = time.perf_counter() - t0
    ref = run_hf().numpy()
    diff = float(np.abs(ours[..., : cfg.vocab_size] - ref).max())
    # alternate the two so that load from other processes on a shared CPU hits both alike
    th, to = [], []
    for _ in range(args.repeats):
        th.append(median_time(run_hf, 1)[0])
        to.append(median_time(lambda: fwd(state, batch).block_until_ready(), 1)[0])
    t_hf, t_hf_min, t_ours, t_ours_min = np.median(th), np.min(th), np.median(to), np.min(to)
    print(f"params {n_params / 1e6:.2f}M, prompt {ids.shape[1]} tokens, {os.cpu_count()} CPU threads, "
          f"matmul precision {jax.config.jax_default_matmul_precision}")
    print(f"max |dlogit| ours vs transformers: {diff:.2e}")
    print(f"transformers (sdpa, no_grad): median {t_hf * 1e3:.1f} ms (min {t_hf_min * 1e3:.1f})")
    print(f"ours (jax.jit, compile {compile_s:.1f} s): median {t_ours * 1e3:.1f} ms (min {t_ours_min * 1e3:.1f})")
    print(f"ratio transformers/ours: {t_hf / t_ours:.2f}x")


if __name__ == "__main__":
    main()
