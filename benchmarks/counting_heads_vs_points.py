#!/usr/bin/env python
"""Sequential counting with regression heads vs CoordExp's point tokens on the same synthetic counting set.

    # 1. the counting records of configs/counting_demo.py's synthetic set (task 'counting', for the point-token run)
    python benchmarks/counting_heads_vs_points.py prepare
    # 2. train the three from the detection demo's model, same steps and batch
    python -m coordexp_jax.train --config configs/counting_demo.py --workdir runs/counting_demo
    python -m coordexp_jax.train --config configs/counting_points_demo.py --workdir runs/counting_points
    python -m coordexp_jax.train --config configs/counting_both_demo.py --workdir runs/counting_both
    # 3. score them on the same held-out images (the "both" model by its heads and by its point tokens)
    python benchmarks/counting_heads_vs_points.py eval --heads runs/counting_demo/final_model \\
        --points runs/counting_points/final_model --both runs/counting_both/final_model [--num_images 64]

Scoring (`metrics.sequential_counting_metrics`, pixels of the 128 px images): MAE / RMSE of the count, hit rate
(a predicted point inside an uncounted object's box; the points of a point-token answer are taken in the order
written, which is (y, x)-sorted), mean point error, and the "predict the training mean count" baseline. For the
point tokens the count is the number of parsed points (`mae`) and, separately, the stated `"count"` (`mae_stated`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from coordexp_jax.cli import ArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _demo_cfg():
    from configs.counting_demo import get_config
    from coordexp_jax.train import config as config_lib

    return config_lib.validate(get_config())


def prepare(args) -> None:
    from coordexp_jax.data import synthetic as syn
    from coordexp_jax.train import counting_loop as CL

    cfg = _demo_cfg()
    d = CL.synthetic_dir(cfg)
    paths = syn.ensure_dataset(d, cfg.data.num_train, max(cfg.data.num_eval, 1), seed=cfg.data.seed,
                               cfg=CL.synthetic_config(cfg))
    for split in ("train", "val"):
        src = paths[split]["jsonl"]
        dst = os.path.join(d, f"{split}_counting.jsonl")
        with open(src) as f, open(dst, "w") as g:
            for line in f:
                r = json.loads(line)
                r["task"] = "counting"
                g.write(json.dumps(r) + "\n")
        print(dst)


def _val_records(n: int):
    from coordexp_jax.train import counting_loop as CL

    cfg = _demo_cfg()
    return CL.counting_records(cfg)[1][:n], CL.counting_records(cfg)[0], cfg


def eval_heads(path: str, recs, train_recs, cfg) -> dict:
    from coordexp_jax.data import counting as C
    from coordexp_jax.train import counting_loop as CL

    model, enc, _ = CL.load_counting_model(path, image_size=cfg.data.image_size)
    mean = float(np.mean([len(C.object_centres(r)) for r in train_recs]))
    res, _ = CL.evaluate_counting(model, recs, enc, CL.sequential_config(cfg), max_count=cfg.counting.max_count,
                                  train_mean_count=mean)
    return res


def eval_points(path: str, recs, train_recs, cfg, batch_size: int = 16) -> dict:
    from coordexp_jax import metrics as M
    from coordexp_jax.coord import codec, protocols
    from coordexp_jax.data import counting as C
    from coordexp_jax.data.prompts import SampleEncoder, encode_prompts
    from coordexp_jax.data.tokenizer import SMALL_TOKENIZER_DIR
    from coordexp_jax.rollout.sampler import Sampler, SamplerConfig
    from coordexp_jax.train import build
    from coordexp_jax.weights.checkpoint import load_checkpoint

    import dataclasses

    mc, model = load_checkpoint(path)
    pcfg = build.prompt_config(cfg, mc)
    pcfg = dataclasses.replace(pcfg, protocol="coordjson", max_text_len=256, text_bucket="pow2")
    enc = SampleEncoder(pcfg, tokenizer_dir=SMALL_TOKENIZER_DIR)
    crecs = [dataclasses.replace(r, task="counting") for r in recs]
    sampler = Sampler(model, enc.token_ids, SamplerConfig(max_new_tokens=192))
    preds, stated, gts, boxes = [], [], [], []
    for s in range(0, len(crecs), batch_size):
        chunk = crecs[s:s + batch_size]
        batch = encode_prompts(chunk, enc, model_config=mc)
        batch.pop("prompt_lengths", None)
        ro = sampler.generate(batch)
        for b, r in enumerate(chunk):
            pr = protocols.parse_count(ro.row(b), enc.tokenizer, enc.token_ids)
            pts = np.asarray(codec.bins_to_point_px(pr.points, r.width, r.height), np.float64).reshape(-1, 2)
            preds.append(pts)
            stated.append(pr.count if pr.count is not None else len(pts))
            p, bx, _ = C.object_geometry(r)
            op, ob = C.ordered_geometry(p, bx, C.SequentialCountingConfig())
            gts.append(op)
            boxes.append(ob)
    out = M.sequential_counting_metrics(preds, gts, boxes, radius=7.0)
    out["mae_stated"] = M.counting_errors(stated, [len(g) for g in gts])["mae"]
    mean = float(np.mean([len(C.object_centres(r)) for r in train_recs]))
    out["baseline_mae"] = M.counting_errors([round(mean)] * len(gts), [len(g) for g in gts])["mae"]
    return {k: float(v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare")
    e = sub.add_parser("eval")
    e.add_argument("--heads", default=None)
    e.add_argument("--points", default=None)
    e.add_argument("--both", default=None, help="a model trained with both (configs/counting_both_demo.py): scored "
                                               "by its heads (sequential) and by its point tokens")
    e.add_argument("--num_images", type=int, default=64)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args)
        return 0
    recs, train_recs, cfg = _val_records(args.num_images)
    keys = ("mae", "rmse", "hit_rate", "mean_point_error_px", "baseline_mae", "mae_stated", "done_rate")
    runs = (("regression heads", args.heads, eval_heads), ("point tokens", args.points, eval_points),
            ("both: heads", args.both, eval_heads), ("both: points", args.both, eval_points))
    for name, path, fn in runs:
        if path:
            m = fn(path, recs, train_recs, cfg)
            print(f"{name:17s} " + "  ".join(f"{k} {m[k]:.3f}" for k in keys if k in m), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
