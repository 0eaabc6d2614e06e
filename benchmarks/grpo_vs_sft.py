"""GRPO vs continued SFT on the synthetic grounding set, from the same Stage-1 checkpoint and the same wall-clock
budget (docs/training.md, "GRPO vs continued SFT").

    python -m coordexp_jax.train --config configs/demo.py --workdir runs/demo            # the Stage-1 checkpoint
    python benchmarks/grpo_vs_sft.py --stage1 runs/demo/final_model --minutes 5 --seeds 0,1 --out runs/grpo_vs_sft

Both arms read the demo's synthetic set through its grounding files (`data.kind=jsonl`, train_grounding.jsonl /
val_grounding.jsonl), so that a seed (`data.seed`: the data order; `train.seed`: GRPO's sampling keys) changes the
order, not the set. Arms, each `--minutes` of training (`train.max_minutes`; evaluation excluded):
- grpo: `configs/grpo_demo.py` (G = 8 samples per prompt, Gaussian point + Gaussian plane rewards);
- sft:  `configs/demo.py` on the same grounding records, the demo objective (ce + soft_ce + w1 + gate), at a
  constant lr (`--sft_lr`), batch 16.
Both start from `--stage1`. Every model (the start and each arm's final model) is scored the same way: greedy
rollouts of the first `--eval_records` held-out grounding records (the val split), `grpo_loop.score_records`: the
mean reward under grpo_demo's weights (Gaussian point + plane, in [0, 2]), each reward's mean (IoU and format
too), the parse rate and Acc@0.5 (IoU >= 0.5 of the first box). Writes `OUT/results.json` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from coordexp_jax.cli import ArgumentParser

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage1", required=True, help="the Stage-1 model (final_model of configs/demo.py)")
    ap.add_argument("--minutes", type=float, default=5.0, help="training wall-clock per arm and seed")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--arms", default="grpo,sft")
    ap.add_argument("--out", required=True)
    ap.add_argument("--eval_records", type=int, default=128)
    ap.add_argument("--sft_lr", type=float, default=1e-3)
    ap.add_argument("--grpo_lr", type=float, default=0.0, help="0 = configs/grpo_demo.py's")
    ap.add_argument("--extra", default="", help="extra --config.key=value flags for both arms (space-separated)")
    return ap.parse_args(argv)


def grounding_files() -> tuple[str, str]:
    """(train, val) grounding JSONL of the demo's synthetic set (generated on first use)."""
    from configs import demo
    from coordexp_jax.train import build, config as C

    cfg = C.validate(demo.get_config())
    build.data_specs(cfg)  # generates the set if missing
    d = build.synthetic_dir(cfg)
    return os.path.join(d, "train_grounding.jsonl"), os.path.join(d, "val_grounding.jsonl")


def arm_command(arm: str, a, seed: int, workdir: str) -> list[str]:
    train, val = grounding_files()
    common = [f"--workdir={workdir}", f"--config.model.checkpoint={a.stage1}", f"--config.train.seed={seed}",
              f"--config.data.seed={seed}", "--config.data.kind=jsonl", f"--config.data.path={train}",
              f"--config.data.eval_path={val}", f"--config.train.max_minutes={a.minutes}",
              "--config.train.steps=100000", "--config.eval.at_end=False", "--config.eval.every=0",
              "--config.train.progress=False", "--config.train.ckpt_every=0"] + a.extra.split()
    if arm == "grpo":
        cmd = ["--config", os.path.join(ROOT, "configs", "grpo_demo.py")]
        if a.grpo_lr:
            cmd.append(f"--config.optim.lr={a.grpo_lr}")
    else:
        cmd = ["--config", os.path.join(ROOT, "configs", "demo.py"),
               f"--config.optim.lr={a.sft_lr}", "--config.optim.schedule=constant", "--config.optim.warmup_steps=0"]
    return [sys.executable, "-m", "coordexp_jax.train"] + cmd + common


def score(model_dir: str, a) -> dict:
    """score_records of a saved model on the held-out grounding records (greedy, grpo_demo's reward weights)."""
    from configs import grpo_demo
    from coordexp_jax.evaluate import eval_setup, make_sampler
    from coordexp_jax.train import config as C
    from coordexp_jax.train.grpo_loop import score_records
    from coordexp_jax.weights.checkpoint import load_checkpoint

    _, val = grounding_files()
    cfg = grpo_demo.get_config()
    cfg.model.checkpoint = model_dir
    cfg.data.kind, cfg.data.eval_path = "jsonl", val
    cfg.data.path = val  # (unused: only the eval records are read)
    cfg.eval.num_images = a.eval_records
    cfg = C.validate(cfg)
    mc, model = load_checkpoint(model_dir)
    records, encoder, _ = eval_setup(cfg, mc, a.eval_records)
    # the training reward (grpo_demo's weights) and, weighted 0 (reported only), the format and IoU rewards
    weights = {k: float(w) for k, w in cfg.grpo.rewards.items() if float(w) > 0 or k in ("format", "iou")}
    sampler = make_sampler(model, encoder.token_ids, cfg)
    return score_records(sampler, records, encoder, model_config=mc, weights=weights, batch_size=32)


def steps_done(workdir: str) -> tuple[int, float]:
    last, el = 0, 0.0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "train":
                last, el = r["step"], r.get("elapsed_s", el)
    return last, el


def main(argv=None):
    a = parse(argv)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "results.json")
    res = json.load(open(path)) if os.path.exists(path) else {}
    if "start" not in res:
        res["start"] = score(a.stage1, a)
        json.dump(res, open(path, "w"), indent=1)
    for seed in [int(s) for s in a.seeds.split(",")]:
        for arm in a.arms.split(","):
            key = f"{arm}_s{seed}"
            if key in res:
                continue
            wd = os.path.join(a.out, key)
            cmd = arm_command(arm, a, seed, wd)
            print(" ".join(cmd), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True, cwd=ROOT)
            steps, elapsed = steps_done(wd)
            res[key] = dict(score(os.path.join(wd, "final_model"), a), steps=steps, train_s=elapsed, wall_s=time.time() - t0)
            json.dump(res, open(path, "w"), indent=1)
    keys = ("reward", "rewards/gaussian_point", "rewards/gaussian_plane", "rewards/iou", "acc@0.5", "parse_rate")
    print("| model | steps | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    for k, v in res.items():
        print(f"| {k} | {v.get('steps', '-')} | " + " | ".join(f"{v.get(x, float('nan')):.3f}" for x in keys) + " |")


if __name__ == "__main__":
    main()
