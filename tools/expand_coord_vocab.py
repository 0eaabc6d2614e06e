#!/usr/bin/env python
"""Add <|coord_*|> and <|coord_0|>..<|coord_999|> to the tokenizer of an HF Qwen3-VL directory and grow the
embedding (and an untied lm_head). New rows: the mean of the base rows (default) or N(0, 0.02).

    python tools/expand_coord_vocab.py --src DIR --dst DIR [--init mean|normal] [--seed N] [--with_tags]
        [--with_regression]

--with_regression also adds `<x>` and `<y>`, the token pair whose hidden states the regression heads of sequential
counting read (train.kind 'counting_regression'). Tokens already present are not added again.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coordexp_jax.cli import ArgumentParser, guard  # noqa: E402


@guard
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="HF directory with config.json, safetensors and tokenizer files")
    ap.add_argument("--dst", required=True, help="output HF directory (must not exist or be empty; written atomically)")
    ap.add_argument("--init", default="mean", choices=["mean", "normal"], help="init rule of the new rows")
    ap.add_argument("--seed", type=int, default=0, help="seed of the normal init")
    ap.add_argument("--with_tags", action="store_true", help="also add the tags-protocol tokens <obj> </obj> ...")
    ap.add_argument("--with_regression", action="store_true",
                    help="also add <x> <y> (sequential counting with regression heads)")
    args = ap.parse_args(argv)

    from coordexp_jax.weights.cli import atomic_dir
    from coordexp_jax.weights.vocab import expand_hf_dir

    with atomic_dir(args.dst) as tmp:
        info = expand_hf_dir(args.src, tmp, init=args.init, seed=args.seed, with_tags=args.with_tags,
                             with_regression=args.with_regression)
    print(f"wrote {args.dst}: " + ", ".join(f"{k}={v}" for k, v in info.items()))


if __name__ == "__main__":
    sys.exit(main())
