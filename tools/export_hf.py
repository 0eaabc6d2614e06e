#!/usr/bin/env python
"""Export a checkpoint (ours, or an HF directory) to an HF directory that
transformers.Qwen3VLForConditionalGeneration.from_pretrained loads unchanged.

    python tools/export_hf.py --checkpoint DIR --out DIR [--tokenizer_dir DIR] [--dtype float32|bfloat16]

A checkpoint with regression heads (sequential counting) exports the HF model unchanged plus
`regression_heads.safetensors` (float32, torch nn.Linear layout) and `regression_heads.json` (layers, width,
activation, tensor names; the <x>/<y> token ids when --tokenizer_dir is given); `load_checkpoint` reads them back.
A checkpoint with the spatial-linking module (HOI) likewise gets `spatial_linking.safetensors` (float32, torch
layout) and `spatial_linking.json` (heads, width, dropout, refine_mlp, tensor names).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coordexp_jax.cli import ArgumentParser, guard  # noqa: E402


@guard
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="our checkpoint directory (model_config.json + params/) or an HF directory")
    ap.add_argument("--out", required=True, help="output HF directory (must not exist or be empty; written atomically)")
    ap.add_argument("--tokenizer_dir", default=None, help="copy tokenizer/processor files from this directory")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="cast tensors (default: as stored)")
    ap.add_argument("--max_shard_gb", type=float, default=5.0, help="safetensors shard size limit in GiB")
    args = ap.parse_args(argv)

    import jax.numpy as jnp

    from coordexp_jax.model.spatial_linking import linking_of
    from coordexp_jax.weights.checkpoint import split_heads, load_checkpoint, save_heads, save_linking
    from coordexp_jax.weights.cli import atomic_dir
    from coordexp_jax.weights.hf import save_hf_checkpoint

    if args.tokenizer_dir is not None and not os.path.isdir(args.tokenizer_dir):
        raise FileNotFoundError(f"--tokenizer_dir {args.tokenizer_dir} is not a directory")
    with atomic_dir(args.out) as tmp:
        config, model = load_checkpoint(args.checkpoint)
        state, heads = split_heads(model)  # the Qwen3-VL parameters; the regression heads module (or None)
        files = save_hf_checkpoint(state, config, tmp, args.tokenizer_dir, max_shard_bytes=int(args.max_shard_gb * 2**30),
                                   dtype=getattr(jnp, args.dtype) if args.dtype else None)
        if heads is not None:
            files += save_heads(tmp, heads, extra=_token_extra(args.tokenizer_dir))
        if linking_of(model) is not None:
            files += save_linking(tmp, linking_of(model))
    print(f"wrote {args.out}: {', '.join(files)}")


def _token_extra(tokenizer_dir):
    """{'x_token': id, 'y_token': id} of the tokenizer's <x> <y> (empty without a tokenizer or the pair)."""
    if tokenizer_dir is None:
        return {}
    from coordexp_jax.data.tokenizer import load_tokenizer, token_ids_from_tokenizer

    ids = token_ids_from_tokenizer(load_tokenizer(tokenizer_dir), require_coords=False)
    return {"x_token": ids.x_token, "y_token": ids.y_token} if ids.has_regression else {}


if __name__ == "__main__":
    sys.exit(main())
