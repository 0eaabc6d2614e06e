"""The comparison of a sweep's runs: every run's swept hyper-parameters with its final and best value of one
evaluation metric (the `eval` records of its metrics.jsonl), sorted best first, as Markdown, CSV and a PNG plot of
the metric against each swept parameter (matplotlib, Agg backend).

'best' is the maximum (`mode='max'`, e.g. det/AP50_logprob) or minimum (`mode='min'`, e.g. val_loss) over the
run's evaluations; 'final' is the value at its last evaluation. Runs without the metric are listed last.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Any

from coordexp_jax.sweep import spec as spec_lib, state as state_lib
from coordexp_jax.sweep.spec import SweepError


@dataclasses.dataclass
class Row:
    """One run in the report. `best`/`final`: (value, step) or None when the run has no such evaluation."""

    name: str
    overrides: dict
    state: str
    best: tuple[float, int] | None
    final: tuple[float, int] | None


def metric_values(records: list[dict], metric: str) -> list[tuple[int, float]]:
    """(step, value) of `metric` in the eval records, in file order, the last record of a step winning (a resumed
    run may evaluate a step again)."""
    by_step: dict[int, float] = {}
    for r in records:
        if r.get("kind") == "eval" and isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric]):
            by_step[int(r.get("step", 0))] = float(r[metric])
    return sorted(by_step.items())


def best_of(values: list[tuple[int, float]], mode: str) -> tuple[float, int] | None:
    """(value, step) of the best evaluation (the earliest one on a tie); None for no values."""
    if not values:
        return None
    sign = 1.0 if mode == "max" else -1.0
    step, value = max(values, key=lambda sv: (sign * sv[1], -sv[0]))
    return value, step


def collect(out_dir: str, metric: str, mode: str = "max") -> list[Row]:
    """The report's rows for the sweep in `out_dir`, best first (runs without the metric last, by name).

    Raises SweepError when `out_dir` holds no sweep runs, or when no run logged `metric` (naming the metrics that
    were logged)."""
    if mode not in ("max", "min"):
        raise SweepError(f"--mode {mode!r}: must be 'max' or 'min'")
    dirs = state_lib.sweep_runs(out_dir)
    if not dirs:
        raise SweepError(f"{out_dir}: no sweep runs here (no sweep.json / */sweep_run.json)")
    rows, seen = [], set()
    for d in dirs:
        info = state_lib.read_json(os.path.join(d, state_lib.RUN_FILE)) or {}
        records = state_lib.read_records(d)
        seen.update(k for r in records if r.get("kind") == "eval" for k in r if k not in ("step", "kind"))
        vals = metric_values(records, metric)
        st = state_lib.run_status(d, check_jobs=False)
        rows.append(Row(info.get("name", os.path.basename(d)), info.get("overrides", {}), st.state,
                        best_of(vals, mode), (vals[-1][1], vals[-1][0]) if vals else None))
    if all(r.best is None for r in rows):
        known = ", ".join(sorted(seen)[:30]) or "none yet"
        raise SweepError(f"--metric {metric}: no run of {out_dir} has evaluated it (eval metrics logged: {known})")
    sign = -1.0 if mode == "max" else 1.0
    rows.sort(key=lambda r: (r.best is None, sign * r.best[0] if r.best else 0.0, r.name))
    return rows


def swept_keys(rows: list[Row]) -> list[str]:
    """The override keys of the runs, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r.overrides))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return spec_lib.format_value(v)


def table(rows: list[Row], metric: str, mode: str) -> tuple[list[str], list[list[str]], list[list[Any]]]:
    """Header, rows as shown (Markdown) and rows as values (CSV: full precision, '' for missing)."""
    keys = swept_keys(rows)
    header = ["rank", "run", *keys, f"{metric} ({mode})", "best step", f"{metric} (final)", "final step", "state"]
    shown, raw = [], []
    for i, r in enumerate(rows, 1):
        b, f = r.best or (None, None), r.final or (None, None)
        vals = [r.overrides.get(k) for k in keys]
        shown.append([str(i) if r.best else "-", r.name, *[_fmt(v) for v in vals], _fmt(b[0]), _fmt(b[1]),
                      _fmt(f[0]), _fmt(f[1]), r.state])
        raw.append([i if r.best else "", r.name, *["" if v is None else v for v in vals],
                    "" if b[0] is None else b[0], "" if b[1] is None else b[1],
                    "" if f[0] is None else f[0], "" if f[1] is None else f[1], r.state])
    return header, shown, raw


def _numeric(values: list[Any]) -> list[float] | None:
    out = []
    for v in values:
        if isinstance(v, bool):
            return None
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            return None
    return out


def plot(rows: list[Row], metric: str, mode: str, path: str, title: str = "") -> str | None:
    """A PNG with one panel per swept parameter: the best metric of each run against the parameter's value (log
    x-axis for positive numbers spanning 10x or more; categories for non-numbers), the best run circled, runs
    that differ only in that parameter joined by a line.
    Returns the path, or None when no parameter has two or more values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.best is not None]
    keys = [k for k in swept_keys(rows) if len({repr(r.overrides.get(k)) for r in scored}) > 1]
    if not keys or not scored:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(max(6.4, 3.6 * len(keys)), 3.2), squeeze=False, sharey=True)
    top = scored[0]
    for ax, k in zip(axes[0], keys):
        vals = [r.overrides.get(k) for r in scored]
        ys = [r.best[0] for r in scored]
        xs = _numeric(vals)
        if xs is None:
            cats = list(dict.fromkeys(spec_lib.format_value(v) for v in vals))
            xs = [cats.index(spec_lib.format_value(v)) for v in vals]
            ax.set_xticks(range(len(cats)), cats)
        elif min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        elif all(isinstance(v, int) for v in vals):  # integer settings (depths, ranks): ticks at the values
            ax.set_xticks(sorted(set(xs)))
        groups: dict[str, list[int]] = {}  # runs that differ only in this parameter, joined by a thin line
        for i, r in enumerate(scored):
            groups.setdefault(repr([r.overrides.get(o) for o in keys if o != k]), []).append(i)
        for idx in groups.values():
            if len(idx) > 1:
                idx = sorted(idx, key=lambda i: xs[i])
                ax.plot([xs[i] for i in idx], [ys[i] for i in idx], color="0.6", lw=0.8, zorder=1)
        ax.scatter(xs, ys, s=22, alpha=0.8, zorder=2)
        ti = scored.index(top)
        ax.scatter([xs[ti]], [ys[ti]], s=110, facecolors="none", edgecolors="tab:red", linewidths=1.5)
        ax.set_xlabel(k)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (best, {mode})")
    fig.suptitle(f"{title or metric}: {len(scored)} runs (red: the best; lines: runs differing only in x)",
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: str, metric: str, mode: str = "max", prefix: str | None = None) -> dict[str, Any]:
    """Writes `<prefix>.md`, `<prefix>.csv` and `<prefix>.png` (default prefix `out_dir/report`). Returns
    {'rows', 'markdown', 'md', 'csv', 'png'} (png None when nothing varies)."""
    rows = collect(out_dir, metric, mode)
    header, shown, raw = table(rows, metric, mode)
    md = state_lib.format_table(header, shown)
    prefix = prefix or os.path.join(out_dir, "report")
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    with open(prefix + ".md", "w") as f:
        f.write(md + "\n")
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(raw)
    png = plot(rows, metric, mode, prefix + ".png", title=f"{os.path.basename(os.path.abspath(out_dir))}: {metric}")
    return {"rows": rows, "markdown": md, "md": prefix + ".md", "csv": prefix + ".csv", "png": png}


__all__ = ["Row", "collect", "metric_values", "best_of", "table", "plot", "write_report", "swept_keys"]
