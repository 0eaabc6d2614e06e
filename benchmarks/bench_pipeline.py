"""Input-pipeline throughput (images/s): synthetic images -> Grain -> decode, smart_resize, patchify, tokenise,
collate (training batches with every contract array), with 0 and 2 worker processes.

    python benchmarks/bench_pipeline.py [--batches 12] [--batch_size 8]

Settings: 448x448 and 1024x768 images (1024 max side) with the released Qwen3-VL processor limits (no resize
needed at 448; 1024x768 stays 1024x768 = 3072 patches), plus the demo's 128x128 for reference.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from coordexp_jax.data import image as I  # noqa: E402
from coordexp_jax.data import pipeline as P  # noqa: E402
from coordexp_jax.data import prompts as Pr  # noqa: E402
from coordexp_jax.data import synthetic as S  # noqa: E402
from coordexp_jax.data import tokenizer as T  # noqa: E402
from coordexp_jax.cli import ArgumentParser  # noqa: E402


def run(path, img_cfg, workers, batches, bs, patches):
    cfg = Pr.PromptConfig(image=img_cfg, max_text_len=4096, patches_per_slot=patches)
    ids = T.token_ids_from_tokenizer(T.small_tokenizer())
    it = P.make_train_iterator([P.SourceSpec("bench", path)], cfg, batch_size=bs, tokenizer_dir=T.SMALL_TOKENIZER_DIR,
                               num_workers=workers, shard_index=0, shard_count=1,
                               model_config=Pr.released_model_config(cfg, ids))
    next(it)  # worker start-up and first batch are not counted
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        b = next(it)
    dt = time.perf_counter() - t
    return batches * bs / dt, b


def main():
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--images", type=int, default=64)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_pipeline_")
    # P = the exact patch count (no padding waste): 64, 784 and 3072 patches.
    cases = [("128x128 (demo)", (128, 128), I.ImageConfig(min_pixels=32 * 32, max_pixels=128 * 128), 64),
             ("448x448", (448, 448), I.ImageConfig(), 784),
             ("1024x768", (768, 1024), I.ImageConfig(), 3072)]
    print(f"cpu cores: {os.cpu_count()}, batch {a.batch_size}, {a.batches} timed batches")
    for name, size, img_cfg, patches in cases:
        d = os.path.join(tmp, name.split()[0])
        t = time.perf_counter()
        paths = S.write_split(d, "train", a.images, seed=0, cfg=S.SyntheticConfig(image_size=size))
        gen = (time.perf_counter() - t) / a.images * 1000
        for w in (0, 2):
            ips, b = run(paths["jsonl"], img_cfg, w, a.batches, a.batch_size, patches)
            print(f"{name:>15} workers={w}: {ips:7.1f} images/s   batch input_ids {b['input_ids'].shape} "
                  f"pixel_values {b['pixel_values'].shape}   (generation {gen:.1f} ms/image)", flush=True)


if __name__ == "__main__":
    main()
