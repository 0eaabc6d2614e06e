"""Hyper-parameter sweeps of `python -m coordexp_jax.train` (docs/sweeps.md).

    python -m coordexp_jax.sweep --config configs/demo_sweep.py --out runs/demo_sweep [--parallel 1]
        [--sweep optim.lr=3e-3,1e-2] [--config.train.steps=400] [--executor slurm --slurm_partition gpu ...]
    python -m coordexp_jax.sweep status runs/demo_sweep
    python -m coordexp_jax.sweep report runs/demo_sweep --metric det/AP50_logprob [--mode max]

The runs come from the config file's get_sweep() and/or --sweep key=v1,v2 flags (a grid); each gets its workdir
OUT/<run name> and runs as `python -m coordexp_jax.train --config FILE --workdir OUT/<run> --config.key=value ...`
through submitit (local: this process runs them, --parallel at a time; slurm: one job array, submitted). Running
the same command again skips finished runs and resumes the others from their checkpoints.
"""

from __future__ import annotations

import argparse
import os
import sys

from coordexp_jax.cli import ArgumentParser, UsageError, guard

COMMANDS = ("status", "report")


def _launch_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m coordexp_jax.sweep", description=__doc__.split("\n\n")[0],
                       epilog="Fixed overrides for every run: --config.key=value (as for coordexp_jax.train). "
                              "Other commands: 'status DIR', 'report DIR --metric NAME'.")
    p.add_argument("--config", required=True, help="config file with get_config() (and optionally get_sweep())")
    p.add_argument("--out", required=True, help="sweep directory: one workdir per run under it")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="a grid axis (repeatable); replaces the same axis of the config's get_sweep() grid")
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--parallel", type=int, default=1, help="local: runs at the same time (default 1)")
    p.add_argument("--dry_run", action="store_true", help="print the runs and their commands; launch nothing")
    p.add_argument("--poll_s", type=float, default=2.0, help=argparse.SUPPRESS)
    g = p.add_argument_group("slurm (--executor slurm): resources of each run (one array task)")
    g.add_argument("--slurm_partition", default=None)
    g.add_argument("--gpus_per_node", type=int, default=1)
    g.add_argument("--cpus_per_task", type=int, default=None)
    g.add_argument("--mem_gb", type=float, default=None)
    g.add_argument("--time_min", type=int, default=240, help="time limit per run in minutes (default 240); a run "
                   "that reaches it is requeued and resumes from its checkpoint")
    g.add_argument("--array_parallelism", type=int, default=256, help="array tasks running at the same time")
    g.add_argument("--slurm_setup", action="append", default=[], metavar="LINE",
                   help="shell line run before each task (repeatable), e.g. 'source .venv/bin/activate'")
    g.add_argument("--slurm_account", default=None)
    g.add_argument("--slurm_qos", default=None)
    g.add_argument("--slurm_constraint", default=None)
    return p


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(`--config.key=value` flags, the rest). Raises UsageError for `--config.key` without '=value'."""
    fixed, rest = [], []
    for a in argv:
        if a.startswith("--config."):
            if "=" not in a:
                raise UsageError(f"{a}: give fixed overrides as --config.key=value (one argument)")
            fixed.append(a)
        else:
            rest.append(a)
    return fixed, rest


def launch(argv: list[str]) -> int:
    from coordexp_jax.cli import normalize_config_args
    from coordexp_jax.sweep import launch as L, spec as spec_lib, state as state_lib

    fixed, rest = _split_config_overrides(normalize_config_args(argv))
    args = _launch_parser().parse_args(rest)
    if args.parallel < 1:
        raise UsageError(f"--parallel {args.parallel}: must be >= 1")
    axes = dict(spec_lib.parse_sweep_flag(s) for s in args.sweep)
    runs = spec_lib.expand(L.load_sweep_spec(args.config), axes, where=f"{args.config}: get_sweep()")
    out_dir = os.path.abspath(args.out)
    name = os.path.basename(out_dir)
    fixed = L.default_fixed(fixed, name)
    planned = L.plan(args.config, out_dir, runs, fixed)
    cwd = os.getcwd()
    if args.dry_run:
        import shlex

        for r in planned:
            print(f"{r.name}: {shlex.join(r.command)}")
        print(f"{len(planned)} runs (dry run: nothing written or launched)")
        return 0
    L.write_plan(out_dir, args.config, fixed, planned, cwd)
    todo, statuses = L.to_submit(planned)
    counts = {s: sum(st.state == s for st in statuses.values()) for s in state_lib.STATES}
    print(f"sweep {out_dir}: {len(planned)} runs; {counts['done']} done, {len(planned) - len(todo) - counts['done']} "
          f"running or queued (skipped), {len(todo)} to run", flush=True)
    for r in planned:
        st = statuses[r.name]
        if r not in todo:
            print(f"skip {r.name}: {st.state}" + (f" ({st.detail})" if st.detail else ""), flush=True)
    if not todo:
        return 0
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.executor == "slurm":
        opts = L.SlurmOptions(partition=args.slurm_partition, gpus_per_node=args.gpus_per_node,
                              cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb, time_min=args.time_min,
                              array_parallelism=args.array_parallelism, setup=args.slurm_setup,
                              account=args.slurm_account, qos=args.slurm_qos, constraint=args.slurm_constraint,
                              job_name=name)
        L.submit_slurm(todo, out_dir, opts, cwd, log=log)
        print(f"follow with: python -m coordexp_jax.sweep status {args.out}")
        return 0
    L.run_local(todo, args.parallel, cwd, poll_s=args.poll_s, log=log)
    final = [state_lib.run_status(r.workdir, check_jobs=False) for r in planned]
    print(state_lib.status_table(final), flush=True)
    return 1 if any(s.state == "failed" for s in final) else 0


def status(argv: list[str]) -> int:
    from coordexp_jax.sweep import state as state_lib

    p = ArgumentParser(prog="python -m coordexp_jax.sweep status",
                       description="State of every run of a sweep: pending, running, done or failed (its last "
                                   "error line), and its step/total.")
    p.add_argument("dir", help="the sweep directory (--out of the launch)")
    args = p.parse_args(argv)
    dirs = _sweep_dirs(args.dir)
    print(state_lib.status_table([state_lib.run_status(d) for d in dirs]))
    return 0


def report(argv: list[str]) -> int:
    from coordexp_jax.sweep import report as report_lib

    p = ArgumentParser(prog="python -m coordexp_jax.sweep report",
                       description="Every run's swept hyper-parameters and its best/final value of an evaluation "
                                   "metric, sorted; written as Markdown, CSV and a PNG plot.")
    p.add_argument("dir", help="the sweep directory (--out of the launch)")
    p.add_argument("--metric", required=True, help="an eval metric of metrics.jsonl, e.g. det/AP50_logprob, val_loss")
    p.add_argument("--mode", choices=("max", "min"), default="max", help="max: higher is better (default)")
    p.add_argument("--out", default=None, help="path prefix of the .md/.csv/.png files (default DIR/report)")
    args = p.parse_args(argv)
    _sweep_dirs(args.dir)
    res = report_lib.write_report(args.dir, args.metric, args.mode, args.out)
    print(res["markdown"])
    print(f"wrote {res['md']}, {res['csv']}" + (f", {res['png']}" if res["png"] else " (no plot: nothing varies)"))
    return 0


def _sweep_dirs(path: str) -> list[str]:
    from coordexp_jax.sweep import state as state_lib
    from coordexp_jax.sweep.spec import SweepError

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such sweep directory")
    dirs = state_lib.sweep_runs(path)
    if not dirs:
        raise SweepError(f"{path}: no sweep runs here (no sweep.json / */sweep_run.json)")
    return dirs


@guard
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return {"status": status, "report": report}[argv[0]](argv[1:])
    if argv and not argv[0].startswith("-"):
        raise UsageError(f"unknown command {argv[0]!r} (commands: launch with --config/--out, "
                         f"{', '.join(COMMANDS)})")
    return launch(argv)


if __name__ == "__main__":
    sys.exit(main())
