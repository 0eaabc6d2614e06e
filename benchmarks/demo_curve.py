"""AP50-vs-minutes curve of a training workdir (the demo's learning curve).

    python benchmarks/demo_curve.py WORKDIR [WORKDIR ...] [--metric det/AP50_logprob] [--svg curve.svg]

Reads, per workdir:
- `metrics.jsonl`: train records (`step`, `elapsed_s`, `steps_per_s`, `loss`) map steps to minutes of training;
  `kind == "eval"` records that carry the metric (the loop's rollout evaluation hook) are points of the curve;
- `eval/step_N/metrics.json` (written by the loop's rollout hook) and `eval_*/metrics.json` (written by
  `python -m coordexp_jax.evaluate ... --out WORKDIR/eval_NAME`; the step is the workdir's last train step) are
  points too.
Prints one table per workdir (step, minutes, images/s, the metric, F1, parse failures) and, with `--svg`, draws
all workdirs' curves into one SVG file (no plotting library needed).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

import numpy as np
from coordexp_jax.cli import ArgumentParser


def _read_jsonl(path: str) -> list[dict]:
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{ln}: not JSON ({e})") from None
    return out


def train_timeline(workdir: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(steps, minutes) of the train records (last record per step wins), and the resolved config (or {})."""
    recs = {r["step"]: r for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r.get("kind") == "train"}
    steps = np.asarray(sorted(recs), np.float64)
    minutes = np.asarray([recs[int(s)].get("elapsed_s", np.nan) / 60 for s in steps], np.float64)
    cfg = {}
    cpath = os.path.join(workdir, "config.json")
    if os.path.exists(cpath):
        with open(cpath) as f:
            cfg = json.load(f)
    return steps, minutes, cfg


def eval_points(workdir: str, metric: str) -> list[dict]:
    """Evaluation points `{step, source, metrics}` of a workdir, sorted by step."""
    pts = []
    for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if r.get("kind") == "eval" and metric in r:
            pts.append({"step": int(r["step"]), "source": "metrics.jsonl", "metrics": r})
    seen = {p["step"] for p in pts}
    for path in glob.glob(os.path.join(workdir, "eval", "step_*", "metrics.json")):
        step = int(re.search(r"step_(\d+)", path).group(1))
        if step not in seen:
            with open(path) as f:
                pts.append({"step": step, "source": os.path.relpath(path, workdir), "metrics": json.load(f)})
    steps, _, _ = train_timeline(workdir)
    last = int(steps[-1]) if len(steps) else 0
    for path in sorted(glob.glob(os.path.join(workdir, "eval_*", "metrics.json"))):
        with open(path) as f:
            m = json.load(f)
        pts.append({"step": int(m.get("step", last)), "source": os.path.relpath(path, workdir), "metrics": m})
    return sorted(pts, key=lambda p: p["step"])


def curve(workdir: str, metric: str = "det/AP50_logprob") -> list[dict]:
    """Rows {step, minutes, images_per_s, value, f1, parse_failure, source} of one workdir."""
    steps, minutes, cfg = train_timeline(workdir)
    batch = cfg.get("data", {}).get("batch_size", 0) * cfg.get("train", {}).get("grad_accum", 1)
    rows = []
    for p in eval_points(workdir, metric):
        m = p["metrics"]
        mins = float(np.interp(p["step"], steps, minutes)) if len(steps) else float("nan")
        rows.append({"step": p["step"], "minutes": mins,
                     "images_per_s": p["step"] * batch / (mins * 60) if mins > 0 and batch else float("nan"),
                     "value": m.get(metric, float("nan")), "f1": m.get("det/f1@0.5", m.get("det/f1", float("nan"))),
                     "parse_failure": m.get("det/parse_failure_rate", float("nan")), "source": p["source"]})
    return rows


def svg(curves: dict[str, list[dict]], metric: str, path: str, width: int = 640, height: int = 400) -> None:
    """A minimal line chart of value vs minutes, one polyline per workdir."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    pad = 50
    xs = [r["minutes"] for rows in curves.values() for r in rows if np.isfinite(r["minutes"])]
    xmax = max(xs + [1.0]) * 1.05
    ymax = max([r["value"] for rows in curves.values() for r in rows if np.isfinite(r["value"])] + [0.1]) * 1.1

    def X(v):
        return pad + v / xmax * (width - 2 * pad)

    def Y(v):
        return height - pad - v / ymax * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">minutes of training</text>',
             f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
             f'{metric}</text>']
    for k in range(6):
        yv, xv = ymax * k / 5, xmax * k / 5
        parts.append(f'<text x="{pad - 6}" y="{Y(yv) + 4:.1f}" text-anchor="end">{yv:.2f}</text>')
        parts.append(f'<text x="{X(xv):.1f}" y="{height - pad + 16}" text-anchor="middle">{xv:.0f}</text>')
    for i, (name, rows) in enumerate(curves.items()):
        c = colours[i % len(colours)]
        pts = [(X(r["minutes"]), Y(r["value"])) for r in rows if np.isfinite(r["minutes"]) and np.isfinite(r["value"])]
        if pts:
            parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                         + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{c}"/>' for x, y in pts]
        parts.append(f'<text x="{pad + 10}" y="{pad + 16 * (i + 1)}" fill="{c}">{os.path.basename(name)}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdirs", nargs="+")
    p.add_argument("--metric", default="det/AP50_logprob")
    p.add_argument("--svg", default="", help="write the curves to this SVG file")
    args = p.parse_args(argv)
    curves = {}
    for wd in args.workdirs:
        if not os.path.isdir(wd):
            print(f"error: workdir '{wd}' does not exist", file=sys.stderr)
            return 2
        rows = curve(wd, args.metric)
        curves[wd] = rows
        print(f"# {wd}")
        print(f"{'step':>6} {'minutes':>8} {'img/s':>7} {args.metric:>20} {'F1':>6} {'parse_fail':>10}  source")
        for r in rows:
            print(f"{r['step']:>6} {r['minutes']:>8.2f} {r['images_per_s']:>7.1f} {r['value']:>20.4f} "
                  f"{r['f1']:>6.3f} {r['parse_failure']:>10.3f}  {r['source']}")
        if not rows:
            print("(no evaluation points: run python -m coordexp_jax.evaluate ... --out WORKDIR/eval_final)")
    if args.svg:
        svg(curves, args.metric, args.svg)
        print(f"wrote {args.svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
