"""Interleaved A/B of the batch-1 decode step of two source trees (e.g. a commit checked out with `git worktree`
and the working tree), on bench_rollout's 100M model.

One worker process per tree loads the same random-init model (the same HF checkpoint seed) through that tree's
code, compiles its sampler and then runs one decode-only call (after an untimed prefill) each time the parent asks.
The parent alternates the two (ABBA order), so a change of the machine's speed during the run hits both sides
alike; it prints ms per decode step (min / median / max) and the median of the per-round ratios.

Run: python benchmarks/ab_decode.py OLD_TREE NEW_TREE [--new_tokens 64] [--rounds 16]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time


def worker(tree: str, new_tokens: int) -> None:
    """Loads the 100M model through `tree`'s code; prints 'ready <first tokens>', then one line of ms per decode
    step for every line read on stdin."""
    sys.path[:0] = [os.path.join(tree, "benchmarks"), tree]
    import bench_rollout as br
    import jax
    import jax.numpy as jnp

    from coordexp_jax.rollout.sampler import bucket_inputs

    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = br.config_100m()
    hf = br.build_hf_model(cfg, seed=0, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        _, model = br.load_hf_checkpoint(d)
    del hf
    tid = br.TokenIds(vocab_size=cfg.vocab_size, endoftext=0, im_start=1, im_end=-1,
                      vision_start=cfg.vision_start_token_id, vision_end=cfg.vision_end_token_id,
                      image_pad=cfg.image_token_id, video_pad=cfg.video_token_id, coord_wildcard=0,
                      coord_start=cfg.vocab_size - 1000 - 20, num_bins=1000)
    ids, mask, grids, pvs = br.make_prompts(cfg, 1)
    inp = br.build_model_inputs(ids, mask, grids, pvs, config=cfg)
    s = br.Sampler(model, tid, br.SamplerConfig(max_new_tokens=new_tokens))
    out = s.generate(inp)
    dev = {k: jnp.asarray(v) for k, v in bucket_inputs(inp, pad_id=tid.pad)[0].items()}
    print("ready", " ".join(str(int(t)) for t in out.tokens[0][:8]), flush=True)
    for _ in sys.stdin:
        carry = jax.block_until_ready(s._prefill(s.state, dev, jax.random.key(0)))
        t0 = time.perf_counter()
        jax.block_until_ready(s._decode(s.state, carry)["tokens"])
        print(f"{(time.perf_counter() - t0) / (new_tokens - 1) * 1e3:.4f}", flush=True)


def main() -> None:
    from coordexp_jax.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trees", nargs=2, help="two source trees (repository roots)")
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=16)
    a = p.parse_args()
    for t in a.trees:
        if not os.path.isfile(os.path.join(t, "benchmarks", "bench_rollout.py")):
            p.error(f"{t}: not a coordexp_jax tree (no benchmarks/bench_rollout.py)")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", t, str(a.new_tokens)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) for t in a.trees]
    first = []
    for t, pr in zip(a.trees, procs):
        line = pr.stdout.readline()
        if not line.startswith("ready"):
            sys.exit(f"{t}: the worker failed to start (run it alone: python {__file__} --worker {t} 64)")
        first.append(line.split()[1:])
    print(f"first greedy tokens equal: {first[0] == first[1]}")
    ts = [[], []]
    for r in range(a.rounds):
        for j in ((0, 1) if r % 2 == 0 else (1, 0)):
            procs[j].stdin.write("go\n")
            procs[j].stdin.flush()
            ts[j].append(float(procs[j].stdout.readline()))
    for pr in procs:
        pr.stdin.close()
        pr.wait()
    for t, x in zip(a.trees, ts):
        print(f"{t}: ms per decode step min {min(x):.2f} median {statistics.median(x):.2f} max {max(x):.2f}")
    ratios = [b / a_ for a_, b in zip(*ts)]
    print(f"second / first per round: median {statistics.median(ratios):.3f}; second faster in "
          f"{sum(r < 1 for r in ratios)} of {a.rounds} rounds")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]))
    else:
        main()
