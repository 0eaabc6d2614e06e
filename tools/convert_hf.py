#!/usr/bin/env python
"""Convert a local HF Qwen3-VL checkpoint directory (safetensors) into our orbax checkpoint + model config.

    python tools/convert_hf.py --hf_dir DIR --out DIR [--dtype float32|bfloat16]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coordexp_jax.cli import ArgumentParser, guard  # noqa: E402


@guard
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf_dir", required=True, help="HF directory: config.json + model.safetensors or sharded *.safetensors with model.safetensors.index.json")
    ap.add_argument("--out", required=True, help="output directory (must not exist or be empty; written atomically)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    from coordexp_jax.weights.checkpoint import save_checkpoint
    from coordexp_jax.weights.cli import atomic_dir
    from coordexp_jax.weights.hf import load_hf_checkpoint

    with atomic_dir(args.out) as tmp:
        config, (_, state) = load_hf_checkpoint(args.hf_dir, getattr(jnp, args.dtype), return_state=True)
        save_checkpoint(tmp, state, config)
    print(f"wrote {args.out} ({args.dtype})")


if __name__ == "__main__":
    sys.exit(main())
