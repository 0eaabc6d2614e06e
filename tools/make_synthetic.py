"""Writes the procedural shapes detection set: python tools/make_synthetic.py --out DIR --num N --seed S.

Outputs in DIR: images/*.png, train.jsonl (+ val.jsonl with --val), *_grounding.jsonl and *_coco.json.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coordexp_jax.cli import ArgumentParser, guard  # noqa: E402
from coordexp_jax.data import synthetic  # noqa: E402


@guard
def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num", type=int, required=True, help="number of training images")
    p.add_argument("--val", type=int, default=0, help="number of held-out images (split 'val', own seed stream)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs="+", default=[128], help="image side, or HEIGHT WIDTH")
    p.add_argument("--classes", default=",".join(synthetic.SyntheticConfig.classes),
                   help=f"comma-separated subset of {','.join(synthetic.SHAPES)}")
    p.add_argument("--min_objects", type=int, default=synthetic.SyntheticConfig.min_objects)
    p.add_argument("--max_objects", type=int, default=synthetic.SyntheticConfig.max_objects)
    p.add_argument("--min_size", type=float, default=synthetic.SyntheticConfig.min_size_frac,
                   help="smallest object side as a fraction of the shorter image side")
    p.add_argument("--max_size", type=float, default=synthetic.SyntheticConfig.max_size_frac)
    p.add_argument("--clutter", type=int, default=synthetic.SyntheticConfig.clutter)
    p.add_argument("--noise", type=float, default=synthetic.SyntheticConfig.noise_std)
    p.add_argument("--random_colors", action="store_true", help="colours independent of the class")
    p.add_argument("--workers", type=int, default=0, help="processes for generation (0: in process)")
    a = p.parse_args(argv)
    if a.num < 0 or a.val < 0:
        p.error("--num and --val must be >= 0")
    if len(a.size) not in (1, 2):
        p.error("--size takes one or two integers")
    size = (a.size[0], a.size[0]) if len(a.size) == 1 else tuple(a.size)
    try:
        cfg = synthetic.SyntheticConfig(
            image_size=size, classes=synthetic.parse_classes(a.classes), class_colors=not a.random_colors,
            min_objects=a.min_objects, max_objects=a.max_objects, min_size_frac=a.min_size, max_size_frac=a.max_size,
            clutter=a.clutter, noise_std=a.noise)
    except ValueError as e:
        p.error(str(e))
    t = time.time()
    for split, n in (("train", a.num), ("val", a.val)):
        if n:
            paths = synthetic.write_split(a.out, split, n, a.seed, cfg, workers=a.workers)
            print(f"{split}: {n} images -> {paths['jsonl']}, {paths['coco']}, {paths['grounding']}")
    print(f"done in {time.time() - t:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
