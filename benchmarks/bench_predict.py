"""predict on a folder vs one process per image: wall-clock seconds per image, the ratio and the compile count.

N held-out images of a trained run (default: the demo run's first 16 evaluation images, the synthetic val split
the run wrote) are predicted
- one at a time: N separate `python -m coordexp_jax.predict --image IMG` processes (each loads the checkpoint and
  compiles the sampler);
- together: one `python -m coordexp_jax.predict --images FOLDER` process (loads once, compiles once).
Both are timed from process start to exit (wall clock, the way a user waits). Also checks that both give the same
answers (greedy decoding; the folder run pads to a larger batch, so float rounding could in principle flip a
near-tie: the count of identical answers is printed).

Run: python benchmarks/bench_predict.py [--run runs/demo] [--checkpoint DIR] [--num_images 16] [--batch_size 8]
When the checkpoint has no preprocessing.json (the training settings predict reads), the protocol and pixel limits
are derived from RUN/config.json as training does (`train.build.prompt_config`).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from coordexp_jax.cli import ArgumentParser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def held_out_images(run: str, n: int) -> list[str]:
    """The first n images of the run's last evaluation (eval/step_N/predictions.jsonl, largest N)."""
    files = sorted(glob.glob(os.path.join(run, "eval", "step_*", "predictions.jsonl")),
                   key=lambda p: int(os.path.basename(os.path.dirname(p)).split("_")[1]))
    if not files:
        sys.exit(f"error: no {run}/eval/step_*/predictions.jsonl (run the training with evaluation first)")
    images = []
    with open(files[-1]) as f:
        for line in f:
            img = json.loads(line)["image"]
            if img not in images:
                images.append(img)
    return images[:n]


def preprocessing_flags(run: str, checkpoint: str) -> list[str]:
    """predict flags for the training's protocol and pixel limits when the checkpoint has no preprocessing.json."""
    if os.path.isfile(os.path.join(checkpoint, "preprocessing.json")):
        return []
    import ml_collections

    from coordexp_jax.train import build
    from coordexp_jax.weights.checkpoint import checkpoint_config

    with open(os.path.join(run, "config.json")) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    pcfg = build.prompt_config(cfg, checkpoint_config(checkpoint))
    return ["--protocol", pcfg.protocol, "--pixel_mode", pcfg.pixel_mode, "--min_pixels",
            str(pcfg.image.min_pixels), "--max_pixels", str(pcfg.image.max_pixels)]


def timed(cmd: list[str]) -> tuple[float, str]:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
    return dt, r.stdout.strip()


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"


def main() -> int:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="/work/runs/demo", help="a training workdir (eval pages, config.json)")
    ap.add_argument("--checkpoint", default=None, help="default: RUN/final_model")
    ap.add_argument("--num_images", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=8, help="predict's --batch_size for the folder run")
    ap.add_argument("--keep", default=None, help="copy the outputs here (default: a temporary folder, removed)")
    a = ap.parse_args()
    ckpt = a.checkpoint or os.path.join(a.run, "final_model")
    images = held_out_images(a.run, a.num_images)
    extra = preprocessing_flags(a.run, ckpt)
    base = [sys.executable, "-m", "coordexp_jax.predict", "--checkpoint", ckpt, *extra]
    tmp = tempfile.mkdtemp(prefix="bench_predict_")
    try:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        for p in images:
            shutil.copy(p, folder)
        print(f"{machine()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
        print(f"checkpoint {ckpt}, {len(images)} images from {os.path.dirname(images[0])}, flags {extra}")
        sep = []
        for i, p in enumerate(sorted(os.listdir(folder))):
            dt, _ = timed(base + ["--image", os.path.join(folder, p), "--out", os.path.join(tmp, "one", str(i))])
            sep.append(dt)
            print(f"  separate process {i + 1}/{len(images)}: {dt:.1f} s", flush=True)
        dt_all, line = timed(base + ["--images", folder, "--out", os.path.join(tmp, "folder"),
                                     "--batch_size", str(a.batch_size)])
        print(f"  folder: {line}")
        with open(os.path.join(tmp, "folder", "summary.json")) as f:
            summary = json.load(f)
        same = 0
        for i, x in enumerate(summary["images"]):
            one = os.path.join(tmp, "one", str(i), x["json"])
            with open(one) as f, open(os.path.join(tmp, "folder", x["json"])) as g:
                same += json.load(f)["answer"] == json.load(g)["answer"]
        per_sep, per_folder = sum(sep) / len(sep), dt_all / len(images)
        print(f"separate processes: {per_sep:.2f} s/image ({sum(sep):.1f} s for {len(sep)})")
        print(f"one folder call:    {per_folder:.2f} s/image ({dt_all:.1f} s, batch {summary['batch_shape']['batch_size']}, "
              f"{summary['compiles']} compile, model load {summary['totals']['load_seconds']:.1f} s)")
        print(f"speed-up per image: {per_sep / per_folder:.1f}x; identical answers {same}/{len(images)}; "
              f"load average now {os.getloadavg()[0]:.1f}")
        if a.keep:
            shutil.copytree(tmp, a.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
