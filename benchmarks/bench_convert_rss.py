"""Peak host RSS of `tools/convert_hf.py` on a ~1.1B-parameter random Qwen3-VL checkpoint.

Writes a random HF checkpoint (2B-preset shapes with 8 text layers: 1.12B parameters; bf16 on disk, 2 shards with
an index) tensor by tensor, then runs the converter in a child process and reports the child's peak RSS
(ru_maxrss) next to the size of one copy of the weights in the target dtype.

    python benchmarks/bench_convert_rss.py [--workdir DIR] [--dtype bfloat16|float32] [--keep]
"""

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from coordexp_jax.model.config import ModelConfig
from coordexp_jax.weights.hf import abstract_model, flat_params
from coordexp_jax.weights.names import hf_shape, name_table
from coordexp_jax.weights.safetensors_io import write_file
from coordexp_jax.cli import ArgumentParser


def write_random_checkpoint(cfg: ModelConfig, out: str, shards: int = 2) -> int:
    os.makedirs(out, exist_ok=True)
    _, state = abstract_model(cfg)
    flat = flat_params(state)
    entries = [(e.hf, hf_shape(e, flat[e.path].shape, cfg)) for e in name_table(cfg)]
    n = sum(int(np.prod(s)) for _, s in entries)
    rng = np.random.default_rng(0)
    per = -(-len(entries) // shards)
    wm = {}
    for i in range(shards):
        part = entries[i * per:(i + 1) * per]
        fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_file(os.path.join(out, fn), [(k, s, np.dtype(ml_dtypes.bfloat16)) for k, s in part],
                   lambda k, shapes=dict(part): (rng.standard_normal(shapes[k], np.float32) * 0.02).astype(ml_dtypes.bfloat16))
        wm.update({k: fn for k, _ in part})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f)
    return n


def main():
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    base = ModelConfig.preset("2b")
    cfg = dataclasses.replace(base, text=dataclasses.replace(base.text, num_hidden_layers=8))
    work = args.workdir or tempfile.mkdtemp(prefix="rss_bench_")
    src, dst = os.path.join(work, "hf"), os.path.join(work, "ours")
    t0 = time.time()
    n = write_random_checkpoint(cfg, src)
    print(f"random checkpoint: {n / 1e9:.3f}B params, {sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src)) / 2**30:.2f} GiB on disk, {time.time() - t0:.0f} s")
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "convert_hf.py")
    t0 = time.time()
    r = subprocess.run([sys.executable, tool, "--hf_dir", src, "--out", dst, "--dtype", args.dtype],
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    one_copy = n * (2 if args.dtype == "bfloat16" else 4)
    print(f"convert exit {r.returncode} in {time.time() - t0:.0f} s; peak RSS {peak / 2**30:.2f} GiB; one copy of the "
          f"weights in {args.dtype}: {one_copy / 2**30:.2f} GiB; ratio {peak / one_copy:.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
