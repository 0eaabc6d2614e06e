"""Sweeps (coordexp_jax.sweep): expansion of grids and random samples, run names, validation before launch, a real
4-run local sweep of the tiny demo model through submitit (interrupted with Ctrl-C and resumed: finished runs are
not redone), status, report ranking, a failing run, and the SLURM job array written by submitit (fake sbatch)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.stats

from coordexp_jax.sweep import __main__ as sweep_cli, report as report_lib, spec as spec_lib, state as state_lib
from coordexp_jax.sweep.spec import SweepError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ expansion


def test_grid_is_the_cartesian_product_first_key_slowest():
    space = {"optim.lr": [1e-3, 3e-3], "loss.sigma": [0.5, 1.0, 2.0], "data.batch_size": [8, 16]}
    runs = spec_lib.expand(space)
    ref = [dict(zip(space, combo)) for combo in itertools.product(*space.values())]
    assert runs == ref and len(runs) == 12
    # written out for two axes: the second key varies fastest
    assert spec_lib.expand({"a.x": [1, 2], "b.y": ["p", "q"]}) == [
        {"a.x": 1, "b.y": "p"}, {"a.x": 1, "b.y": "q"}, {"a.x": 2, "b.y": "p"}, {"a.x": 2, "b.y": "q"}]
    # a non-list value is fixed; a tuple is one value (tuple-typed keys)
    assert spec_lib.expand({"a.x": [1, 2], "m.sec": (4, 6, 6)}) == [{"a.x": 1, "m.sec": (4, 6, 6)},
                                                                    {"a.x": 2, "m.sec": (4, 6, 6)}]


def test_cli_axes_cross_a_list_and_replace_a_grid_axis():
    assert spec_lib.expand(None, {"optim.lr": ["1e-3", "3e-3"]}) == [{"optim.lr": "1e-3"}, {"optim.lr": "3e-3"}]
    runs = spec_lib.expand([{"lora.rank": 8}, {"lora.rank": 16}], {"optim.lr": ["1", "2"]})
    assert runs == [{"lora.rank": 8, "optim.lr": "1"}, {"lora.rank": 8, "optim.lr": "2"},
                    {"lora.rank": 16, "optim.lr": "1"}, {"lora.rank": 16, "optim.lr": "2"}]
    runs = spec_lib.expand({"optim.lr": [1e-3, 3e-3, 1e-2], "loss.sigma": [1.0, 2.0]}, {"config.optim.lr": ["5e-3"]})
    assert runs == [{"optim.lr": "5e-3", "loss.sigma": 1.0}, {"optim.lr": "5e-3", "loss.sigma": 2.0}]
    with pytest.raises(SweepError, match="'optim.lr' is set by both"):
        spec_lib.expand([{"optim.lr": 1.0}], {"optim.lr": ["2"]})
    with pytest.raises(SweepError, match="no sweep"):
        spec_lib.expand(None, {})
    assert spec_lib.parse_sweep_flag("config.optim.lr=1e-3, 3e-3") == ("optim.lr", ["1e-3", "3e-3"])
    for bad in ("optim.lr", "optim.lr=", "=1,2", "optim.lr=1,,2"):
        with pytest.raises(SweepError, match="expected key=v1,v2"):
            spec_lib.parse_sweep_flag(bad)


def test_random_search_distributions_and_seed():
    space = {"optim.lr": ("loguniform", 1e-5, 1e-1), "loss.sigma": ("uniform", 0.5, 2.0),
             "lora.rank": [8, 16, 32], "counting.head_layers": ("int", 2, 4)}
    n = 3000
    runs = spec_lib.random_search(n, 7, space)
    assert runs == spec_lib.random_search(n, 7, space)  # the seed fixes the samples
    assert runs[:5] != spec_lib.random_search(5, 8, space)
    lr = np.array([r["optim.lr"] for r in runs])
    sig = np.array([r["loss.sigma"] for r in runs])
    assert all(type(r["optim.lr"]) is float and type(r["counting.head_layers"]) is int for r in runs)
    assert lr.min() >= 1e-5 and lr.max() <= 1e-1 and sig.min() >= 0.5 and sig.max() <= 2.0
    # log-uniform: log(lr) ~ U(log 1e-5, log 1e-1); uniform: sigma ~ U(0.5, 2). Kolmogorov-Smirnov against scipy's
    # distributions: p > 1e-3 fails a correct sampler once in a thousand seeds (the seed is fixed: deterministic).
    lo, hi = math.log(1e-5), math.log(1e-1)
    assert scipy.stats.kstest(np.log(lr), scipy.stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    assert scipy.stats.kstest(sig, scipy.stats.uniform(0.5, 1.5).cdf).pvalue > 1e-3
    # a plain uniform on lr would put ~90% of the samples above 1e-2; log-uniform puts 25% there
    assert abs((lr > 1e-2).mean() - 0.25) < 0.05
    # choices and ints: uniform over the values (chi-square), both int bounds included
    ranks = [r["lora.rank"] for r in runs]
    layers = [r["counting.head_layers"] for r in runs]
    assert set(ranks) == {8, 16, 32} and set(layers) == {2, 3, 4}
    for vals, cats in ((ranks, (8, 16, 32)), (layers, (2, 3, 4))):
        assert scipy.stats.chisquare([vals.count(c) for c in cats]).pvalue > 1e-3


def test_grid_times_random_and_bad_random_specs():
    spec = {"grid": {"lora.rank": [8, 16]}, "random": {"num": 3, "seed": 1, "space": {"optim.lr": [1, 2, 3, 4]}}}
    runs = spec_lib.expand(spec)
    samples = spec_lib.random_search(3, 1, {"optim.lr": [1, 2, 3, 4]})
    assert runs == [dict(g, **s) for g in ({"lora.rank": 8}, {"lora.rank": 16}) for s in samples]
    assert len(spec_lib.expand({"random": {"num": 4, "space": {"optim.lr": ("uniform", 0.0, 1.0)}}})) == 4
    bad = [({"random": {"num": 2, "space": {"optim.lr": ("gauss", 0, 1)}}}, "'optim.lr'.*kind one of"),
           ({"random": {"num": 2, "space": {"optim.lr": ("loguniform", 0.0, 1.0)}}}, "loguniform needs lo > 0"),
           ({"random": {"num": 0, "space": {"optim.lr": [1]}}}, "'num' = 0"),
           ({"random": {"num": 2, "sed": 1, "space": {"optim.lr": [1]}}}, r"unknown 'random' field\(s\) \['sed'\]"),
           ({"grid": {"optim.lr": [1]}, "optim.b1": [0.9]}, "next to 'grid'"),
           ({"grid": {"optim.lr": [1]}, "random": {"num": 1, "space": {"optim.lr": [2]}}}, "both in the random"),
           ({"optim.lr": []}, "'optim.lr' has an empty list"),
           ([{"optim.lr": 1}, "x"], "entry 1 is a str"),
           ("lr", "returned a str")]
    for spec, msg in bad:
        with pytest.raises(SweepError, match=msg):
            spec_lib.expand(spec)


def test_run_names_and_flag_values():
    runs = [{"optim.lr": 1e-3, "loss.sigma": 0.5, "data.batch_size": 16},
            {"optim.lr": 3e-05, "loss.sigma": 2.0, "data.batch_size": 8}]
    assert spec_lib.run_names(runs) == ["lr=0.001,sigma=0.5,batch_size=16", "lr=3e-05,sigma=2,batch_size=8"]
    # a shared last component keeps one more level; duplicates and unsafe characters
    assert spec_lib.short_keys(["optim.lr", "optim.lm.lr_mult", "optim.vision.lr_mult"]) == {
        "optim.lr": "lr", "optim.lm.lr_mult": "lm.lr_mult", "optim.vision.lr_mult": "vision.lr_mult"}
    assert spec_lib.run_names([{}, {"data.path": "/a b/c"}, {"data.path": "/a b/c"}]) == [
        "base", "path=_a_b_c", "path=_a_b_c-2"]
    long = spec_lib.run_names([{"data.path": "x" * 500}])[0]
    assert len(long) == spec_lib.MAX_NAME and long != spec_lib.run_names([{"data.path": "x" * 499}])[0]
    # --config.key=<text> parses back to the value (ml_collections literal parsing for tuples)
    import ast

    for v in (1e-3, 3, True, "tags", (4, 6, 6), 0.1 + 0.2):
        text = spec_lib.flag_value(v)
        assert (text if isinstance(v, str) else type(v)(ast.literal_eval(text))) == v


# ------------------------------------------------------------------------------------------------ validation


def _write_config(path, body: str) -> str:
    path.write_text(f"import importlib.util, os\n\n"
                    f"def _demo():\n"
                    f"    spec = importlib.util.spec_from_file_location('_demo_cfg', {os.path.join(ROOT, 'configs', 'demo.py')!r})\n"
                    f"    m = importlib.util.module_from_spec(spec)\n"
                    f"    spec.loader.exec_module(m)\n"
                    f"    return m.get_config()\n\n" + body)
    return str(path)


def test_unknown_or_bad_key_stops_before_anything_is_launched(tmp_path, capsys):
    cfg = _write_config(tmp_path / "s.py", "def get_config():\n    return _demo()\n\n"
                        "def get_sweep():\n    return {'optim.lr': [1e-3, 3e-3], 'loss.sigmaa': [1.0]}\n")
    out = tmp_path / "out"
    assert sweep_cli.main(["--config", cfg, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: sweep run 'lr=0.001,sigmaa=1': unknown config key 'loss.sigmaa' (from "
                   "--config.loss.sigmaa); did you mean 'loss.sigma'?"]
    assert not out.exists()
    # a bad value of one run (out of range) and a bad --sweep value: the run and key are named, nothing written
    assert sweep_cli.main(["--config", cfg, "--out", str(out), "--sweep", "optim.lr=1e-3,-1", "--sweep",
                           "loss.sigmaa=1"]) == 2
    assert "unknown config key 'loss.sigmaa'" in capsys.readouterr().err
    cfg2 = _write_config(tmp_path / "t.py", "def get_config():\n    return _demo()\n")
    assert sweep_cli.main(["--config", cfg2, "--out", str(out), "--sweep", "optim.lr=1e-3,-1"]) == 2
    assert capsys.readouterr().err.strip() == ("error: sweep run 'lr=-1': config key 'optim.lr' = -1.0 is out of "
                                               "range: must be >= 0")
    assert sweep_cli.main(["--config", cfg2, "--out", str(out), "--sweep", "optim.lr=1e-3", "--config.optim.b1"]) == 2
    assert "--config.optim.b1: give fixed overrides as --config.key=value" in capsys.readouterr().err
    assert sweep_cli.main(["--config", cfg2, "--out", str(out), "--parallel", "0", "--sweep", "optim.lr=1"]) == 2
    assert "--parallel 0: must be >= 1" in capsys.readouterr().err
    assert sweep_cli.main(["--config", cfg2, "--out", str(out), "--sweeps", "optim.lr=1"]) == 2
    assert capsys.readouterr().err.startswith("error: unrecognized arguments: --sweeps")
    assert not out.exists()
    assert sweep_cli.main(["status", str(tmp_path / "nope")]) == 2
    assert "no such sweep directory" in capsys.readouterr().err


def test_dry_run_prints_the_training_commands(tmp_path, capsys):
    cfg = _write_config(tmp_path / "s.py", "def get_config():\n    return _demo()\n\n"
                        "def get_sweep():\n    return [{'optim.lr': 0.001}, {'optim.lr': 0.01, 'lora.enabled': True}]\n")
    assert sweep_cli.main(["--config", cfg, "--out", str(tmp_path / "o"), "--dry_run", "--config.train.steps=7",
                           "--config.train.progress=True"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    wd = tmp_path / "o" / "lr=0.01,enabled=True"
    assert lines[1] == (f"lr=0.01,enabled=True: {sys.executable} -m coordexp_jax.train --config {cfg} --workdir {wd} "
                        "--config.log.wandb.group=o --config.train.steps=7 --config.train.progress=True "
                        "--config.optim.lr=0.01 --config.lora.enabled=True")
    assert lines[-1].startswith("2 runs (dry run") and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ status / report on
# run directories written by hand (each state, and ranking against values computed here)


def _fake_run(out, name, overrides, records=(), final_model=False, job=None, steps=10):
    d = out / name
    d.mkdir(parents=True)
    (d / state_lib.RUN_FILE).write_text(json.dumps({"name": name, "overrides": overrides, "train_steps": steps}))
    if records:
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if final_model:
        (d / "final_model").mkdir()
    if job is not None:
        (d / state_lib.JOB_FILE).write_text(json.dumps(job))
    return d


def _dump_result(path, value):
    import cloudpickle

    with open(path, "wb") as f:
        cloudpickle.dump(value, f)


def test_status_of_each_state(tmp_path):
    out = tmp_path / "sw"
    tr = lambda s: {"step": s, "kind": "train", "loss": 1.0}  # noqa: E731
    _fake_run(out, "done", {"optim.lr": 1}, [tr(10), {"step": 10, "kind": "stop", "reason": "steps"}], True)
    _fake_run(out, "complete", {"optim.lr": 2}, [tr(10), {"step": 10, "kind": "stop", "reason": "steps"},
                                                 {"step": 10, "kind": "stop", "reason": "complete"}], True)
    d = _fake_run(out, "failed", {"optim.lr": 3}, [tr(4)], job={"executor": "local", "job_id": "999999999"})
    (d / "err.log").write_text("INFO starting\nerror: records file /x.jsonl: not found\nsubmitit ERROR: Submitted "
                               "job triggered an exception\nTraceback (most recent call last):\n  File \"x\"\n"
                               "coordexp_jax.sweep.launch.RunFailed: training exited with code 2: error: records "
                               "file /x.jsonl: not found\n")
    _dump_result(d / "r.pkl", ("error", "Traceback ...\nRunFailed: training exited with code 2"))
    job = json.loads((d / state_lib.JOB_FILE).read_text())
    (d / state_lib.JOB_FILE).write_text(json.dumps(dict(job, stderr=str(d / "err.log"), result=str(d / "r.pkl"))))
    (_fake_run(out, "interrupted", {"optim.lr": 4}, [tr(3), tr(6)], job={"executor": "local", "job_id": "999999999"})
     / "checkpoints" / "3").mkdir(parents=True)
    _fake_run(out, "nonfinite", {"optim.lr": 5}, [tr(2), {"step": 2, "kind": "stop", "reason": "nonfinite",
                                                          "message": "stopped at step 2 of 10: non-finite loss"}])
    _fake_run(out, "timed", {"optim.lr": 6}, [tr(5), {"step": 5, "kind": "stop", "reason": "max_minutes"}])
    _fake_run(out, "new", {"optim.lr": 7})
    # a live local job: this test process stands in for the job controller (its cmdline mentions pytest, not
    # submitit, so a recycled pid is not taken for a job) -> a sleeping 'submitit' process
    p = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(60)", "submitit"])
    try:
        _fake_run(out, "live", {"optim.lr": 8}, [tr(1)], job={"executor": "local", "job_id": str(p.pid)})
        got = {s.name: s for s in (state_lib.run_status(str(out / n)) for n in sorted(os.listdir(out)))}
    finally:
        p.kill()
        p.wait()
    assert {n: s.state for n, s in got.items()} == {
        "done": "done", "complete": "done", "failed": "failed", "interrupted": "pending", "nonfinite": "failed",
        "timed": "pending", "new": "pending", "live": "running"}
    assert got["failed"].detail == "error: records file /x.jsonl: not found"
    assert (got["failed"].step, got["failed"].total) == (4, 10)
    assert got["interrupted"].detail == ("interrupted at step 6; run the sweep again to resume from its checkpoint "
                                         "at step 3")
    assert got["nonfinite"].detail == "stopped at step 2 of 10: non-finite loss"
    assert "train.max_minutes at step 5" in got["timed"].detail and got["new"].detail == "not started"
    assert got["live"].detail == f"running (local job {p.pid})"
    table = state_lib.status_table(list(got.values()))
    assert table.splitlines()[-1] == "8 runs: 3 pending, 1 running, 2 done, 2 failed"


def test_run_command_outcomes(tmp_path, capfd):
    from coordexp_jax.sweep.launch import RunCommand, RunFailed, RunInterrupted

    py = sys.executable
    ok = RunCommand([py, "-c", "import os; print('a'); print('done: ' + os.environ['X'] + os.getcwd())"],
                    cwd=str(tmp_path), env={"X": "x=", "CUDA_VISIBLE_DEVICES": None})
    assert ok() == f"done: x={tmp_path}"
    out = capfd.readouterr().out  # passed through to the job's log, after the command line
    assert out.splitlines()[0].startswith("command: ") and out.splitlines()[1:] == ["a", f"done: x={tmp_path}"]
    bad = RunCommand([py, "-c", "import sys; print('error: key x', file=sys.stderr); print('later', file=sys.stderr);"
                          " sys.exit(2)"])
    with pytest.raises(RunFailed, match="^training exited with code 2: error: key x$"):
        bad()
    for code in ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", "import sys; sys.exit(130)"):
        with pytest.raises(RunInterrupted, match="stopped by a signal"):
            RunCommand([py, "-c", code])()
    # submitit stores the exception; a RunInterrupted result is an interrupted run (pending), not a failure
    d = _fake_run(tmp_path / "sw", "r", {"optim.lr": 1}, [{"step": 4, "kind": "train"}],
                  job={"executor": "local", "job_id": "999999999", "result": str(tmp_path / "r.pkl")})
    _dump_result(tmp_path / "r.pkl", ("error", "Traceback ...\ncoordexp_jax.sweep.launch.RunInterrupted: training "
                                               "stopped by a signal (exit code -15)"))
    st = state_lib.run_status(str(d))
    assert (st.state, st.detail) == ("pending", "interrupted at step 4; run the sweep again to resume")


def test_last_error_line():
    assert state_lib.last_error_line("a\nerror: first\nb\nerror: second\nc\n") == "error: second"
    tb = "x\nTraceback (most recent call last):\n  File \"a.py\", line 1\n    foo()\n    ^^^\nKeyError: 'k'\n"
    assert state_lib.last_error_line(tb) == "KeyError: 'k'"
    assert state_lib.last_error_line("one\ntwo\r50%\r100%\n\n") == "100%" and state_lib.last_error_line("") == ""


def test_report_ranks_by_best_and_writes_md_csv_png(tmp_path, capsys):
    out = tmp_path / "sw"
    rng = np.random.default_rng(0)
    truth = {}
    for lr in (1e-3, 3e-3, 1e-2):
        for sigma in (0.5, 2.0):
            name = f"lr={lr:g},sigma={sigma:g}"
            vals = rng.uniform(0, 1, 3)
            recs = [{"step": 100 * (i + 1), "kind": "eval", "det/AP50_logprob": float(v), "val_loss": float(1 - v)}
                    for i, v in enumerate(vals)]
            recs.append({"step": 300, "kind": "stop", "reason": "steps"})
            _fake_run(out, name, {"optim.lr": lr, "loss.sigma": sigma}, recs, final_model=True, steps=300)
            truth[name] = vals
    _fake_run(out, "lr=0.1,sigma=1", {"optim.lr": 0.1, "loss.sigma": 1.0}, [{"step": 1, "kind": "train"}])
    assert sweep_cli.main(["report", str(out), "--metric", "det/AP50_logprob"]) == 0
    rows = report_lib.collect(str(out), "det/AP50_logprob", "max")
    ref = sorted(truth, key=lambda n: -truth[n].max())
    assert [r.name for r in rows] == ref + ["lr=0.1,sigma=1"]
    for r in rows[:-1]:
        assert r.best == (truth[r.name].max(), 100 * (int(np.argmax(truth[r.name])) + 1))
        assert r.final == (truth[r.name][-1], 300)
    assert rows[-1].best is None and rows[-1].state == "pending"
    rows_min = report_lib.collect(str(out), "val_loss", "min")
    assert [r.name for r in rows_min][:-1] == sorted(truth, key=lambda n: (1 - truth[n]).min())
    md = (out / "report.md").read_text().splitlines()
    assert md[0].split("|")[1:-1] == [" rank ", " run                ", " optim.lr ", " loss.sigma ",
                                      " det/AP50_logprob (max) ", " best step ", " det/AP50_logprob (final) ",
                                      " final step ", " state   "]
    assert [ln.split("|")[2].strip() for ln in md[2:]] == ref + ["lr=0.1,sigma=1"]
    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(t["det/AP50_logprob (max)"]) for t in table[:-1]] == [truth[n].max() for n in ref]
    assert table[-1]["det/AP50_logprob (max)"] == "" and float(table[0]["optim.lr"]) == rows[0].overrides["optim.lr"]
    from PIL import Image

    with Image.open(out / "report.png") as im:
        assert im.format == "PNG" and im.size[0] > 2 * im.size[1]  # two panels side by side
    printed = capsys.readouterr().out
    assert printed.startswith("| rank") and "report.png" in printed
    assert sweep_cli.main(["report", str(out), "--metric", "det/AP"]) == 2
    assert "no run of" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ SLURM (fake tools)


def _fake_slurm(bin_dir, sacct_rows=""):
    bin_dir.mkdir(exist_ok=True)
    log = bin_dir / "calls.log"
    scripts = {
        "sbatch": f"#!/bin/sh\necho \"sbatch $*\" >> {log}\necho 'Submitted batch job 4242'\n",
        "srun": "#!/bin/sh\nexit 1\n",
        "sacct": f"#!/bin/sh\necho \"sacct $*\" >> {log}\nprintf 'JobID|State|NodeList\\n{sacct_rows}'\n",
    }
    for name, text in scripts.items():
        p = bin_dir / name
        p.write_text(text)
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return log


def test_slurm_job_array_submission(tmp_path, monkeypatch, capsys):
    from submitit.core.utils import DelayedSubmission

    cfg = _write_config(tmp_path / "s.py", "def get_config():\n    return _demo()\n\n"
                        "def get_sweep():\n    return {'optim.lr': [1e-3, 3e-3], 'lora.rank': [8, 16]}\n")
    out = tmp_path / "sw"
    bin_dir = tmp_path / "bin"
    calls = _fake_slurm(bin_dir)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    argv = ["--config", cfg, "--out", str(out), "--executor", "slurm", "--slurm_partition", "gpu",
            "--gpus_per_node", "2", "--cpus_per_task", "8", "--mem_gb", "32", "--time_min", "30",
            "--array_parallelism", "2", "--slurm_setup", "source /opt/venv/bin/activate",
            "--slurm_account", "proj1", "--config.train.steps=50"]
    assert sweep_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "submitted lr=0.001,rank=8: SLURM job 4242_0" in printed
    sbatch = (out / ".submitit" / "4242_submission.sh").read_text()
    lines = sbatch.splitlines()
    for flag in ("--array=0-3%2", "--partition=gpu", "--gpus-per-node=2", "--cpus-per-task=8", "--mem=32GB",
                 "--time=30", "--nodes=1", "--ntasks-per-node=1", "--job-name=sw", "--account=proj1",
                 f"--output={out}/.submitit/%A_%a_0_log.out", f"--error={out}/.submitit/%A_%a_0_log.err"):
        assert f"#SBATCH {flag}" in lines, flag
    assert "source /opt/venv/bin/activate" in lines
    assert lines[lines.index("source /opt/venv/bin/activate") - 1] == "# setup"
    assert any(ln.startswith("srun --unbuffered") and ln.endswith(f"-u -m submitit.core._submit {out}/.submitit")
               for ln in lines)
    assert calls.read_text().count("sbatch ") == 1
    # each array task runs our training command line (submitit's pickle of it), in sweep order
    names = ["lr=0.001,rank=8", "lr=0.001,rank=16", "lr=0.003,rank=8", "lr=0.003,rank=16"]
    for i, name in enumerate(names):
        fn = DelayedSubmission.load(out / ".submitit" / f"4242_{i}_submitted.pkl").function
        lr, rank = name.split(",")
        assert fn.command == [sys.executable, "-m", "coordexp_jax.train", "--config", cfg, "--workdir",
                              str(out / name), "--config.log.wandb.group=sw", "--config.train.progress=False",
                              "--config.train.steps=50", f"--config.optim.lr={float(lr[3:])!r}",
                              f"--config.lora.rank={rank[5:]}"]
        assert json.loads((out / name / state_lib.JOB_FILE).read_text())["job_id"] == f"4242_{i}"
        assert json.loads((out / name / state_lib.RUN_FILE).read_text())["command"] == fn.command
    # status asks sacct: queued -> pending, running, failed (with its state)
    _fake_slurm(bin_dir, "4242_0|RUNNING|n1\\n4242_1|PENDING|None\\n4242_2|FAILED|n2\\n4242_3|RUNNING|n3\\n")
    assert sweep_cli.main(["status", str(out)]) == 0
    table = capsys.readouterr().out
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:5]] for ln in table.splitlines()[2:-1]}
    assert rows == {names[0]: ["running", "-/50", "running (slurm job 4242_0)"],
                    names[1]: ["pending", "-/50", "queued (slurm job 4242_1)"],
                    names[2]: ["failed", "-/50", "SLURM FAILED"],
                    names[3]: ["running", "-/50", "running (slurm job 4242_3)"]}
    # launching again: the queued/running jobs are skipped, only the failed run is submitted (a one-job 'array')
    assert sweep_cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 to run" in printed and f"submitted {names[2]}: SLURM job 4242" in printed
    assert calls.read_text().count("sbatch ") == 2


def test_slurm_without_slurm_tools_is_one_error_line(tmp_path, monkeypatch, capsys):
    cfg = _write_config(tmp_path / "s.py", "def get_config():\n    return _demo()\n")
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    assert sweep_cli.main(["--config", cfg, "--out", str(tmp_path / "o"), "--executor", "slurm", "--sweep",
                           "optim.lr=1e-3"]) == 2
    assert capsys.readouterr().err.startswith("error: --executor slurm: Could not detect \"srun\"")


# ------------------------------------------------------------------------------------------------ a real local sweep

STEPS = 12


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """4 runs of the tiny demo model (12 steps of batch 4, eval = validation loss) through submitit's local
    executor: run 'lr=0.003' is interrupted with Ctrl-C (SIGINT to the sweep) after its step-3 checkpoint, then
    the same command runs again (2 in parallel). The 4th run points at a missing records file and fails."""
    tmp = tmp_path_factory.mktemp("sweep")
    data = tmp / "synthetic"
    cfg = _write_config(tmp / "tiny_sweep.py", (
        "def get_config():\n"
        "    c = _demo()\n"
        f"    c.train.steps = {STEPS}\n"
        "    c.train.ckpt_every = 3\n"
        "    c.train.max_minutes = 0.0\n"
        "    c.train.tensorboard = False\n"
        "    c.data.num_train = 48\n"
        "    c.data.num_eval = 4\n"
        "    c.data.batch_size = 4\n"
        f"    c.data.path = {str(data)!r}\n"
        "    c.eval.kind = 'loss'\n"
        "    c.eval.every = 6\n"
        "    c.optim.warmup_steps = 2\n"
        "    return c\n\n"
        "def get_sweep():\n"
        "    return [{'optim.lr': 1e-3}, {'optim.lr': 3e-3}, {'optim.lr': 1e-2},\n"
        "            {'optim.lr': 1e-3, 'data.kind': 'jsonl', 'data.path': '/nonexistent/records.jsonl'}]\n"))
    out = tmp / "sw"
    cmd = [sys.executable, "-m", "coordexp_jax.sweep", "--config", cfg, "--out", str(out), "--poll_s", "0.2",
           "--config.train.log_every=1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    names = ["lr=0.001", "lr=0.003", "lr=0.01", "lr=0.001,kind=jsonl,path=_nonexistent_records.jsonl"]
    a, b = out / names[0], out / names[1]
    first = subprocess.Popen(cmd + ["--parallel", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    killed_at, deadline = None, time.time() + 900
    while time.time() < deadline and first.poll() is None:
        steps = [r["step"] for r in state_lib.read_records(str(b)) if r.get("kind") == "train"]
        if (b / "checkpoints" / "3").is_dir() and steps and max(steps) >= 4:
            first.send_signal(signal.SIGINT)  # Ctrl-C of the sweep: its running job is cancelled
            killed_at = max(steps)
            break
        time.sleep(0.05)
    first_out = first.communicate(timeout=300)[0]
    status1 = subprocess.run([sys.executable, "-m", "coordexp_jax.sweep", "status", str(out)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    a_metrics = (a / "metrics.jsonl").read_bytes()
    a_stat = os.stat(a / "metrics.jsonl")
    a_jobs = sorted(os.listdir(a / "submitit"))
    b_records = state_lib.read_records(str(b))
    second = subprocess.run(cmd + ["--parallel", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=900)
    status2 = subprocess.run([sys.executable, "-m", "coordexp_jax.sweep", "status", str(out)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    report = subprocess.run([sys.executable, "-m", "coordexp_jax.sweep", "report", str(out), "--metric", "val_loss",
                             "--mode", "min"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return dict(out=out, names=names, killed_at=killed_at, first_out=first_out, first_rc=first.returncode,
                status1=status1, a_metrics=a_metrics, a_stat=a_stat, a_jobs=a_jobs, b_records=b_records,
                second=second, status2=status2, report=report)


def _status_rows(text):
    lines = text.strip().splitlines()
    return {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:5]] for ln in lines[2:-1]}


@pytest.mark.slow
def test_local_sweep_interrupted_then_status(local_sweep):
    s = local_sweep
    assert s["killed_at"] is not None, "run 'lr=0.003' finished before it could be interrupted:\n" + s["first_out"]
    assert s["killed_at"] < STEPS and s["first_rc"] == 130, s["first_out"]
    assert "interrupted: 1 running job(s) cancelled" in s["first_out"]
    assert s["status1"].returncode == 0, s["status1"].stderr
    rows = _status_rows(s["status1"].stdout)
    n = s["names"]
    assert rows[n[0]] == ["done", f"{STEPS}/{STEPS}", ""]
    st, step, detail = rows[n[1]]
    assert st == "pending" and detail.startswith("interrupted at step") and "from its checkpoint at step" in detail
    assert 4 <= int(step.split("/")[0]) < STEPS
    assert rows[n[2]] == ["pending", f"-/{STEPS}", "not started"] and rows[n[3]][0] == "pending"
    assert not any(r.get("kind") == "stop" and r.get("reason") == "steps" for r in s["b_records"])


@pytest.mark.slow
def test_local_sweep_rerun_resumes_without_redoing_finished_runs(local_sweep):
    s = local_sweep
    out, n = s["out"], s["names"]
    assert s["second"].returncode == 1, s["second"].stdout + s["second"].stderr  # 1: a run failed
    assert f"skip {n[0]}: done" in s["second"].stdout
    # the finished run was not touched: same metrics.jsonl (bytes and mtime), no new submitit job
    assert (out / n[0] / "metrics.jsonl").read_bytes() == s["a_metrics"]
    assert os.stat(out / n[0] / "metrics.jsonl").st_mtime_ns == s["a_stat"].st_mtime_ns
    assert sorted(os.listdir(out / n[0] / "submitit")) == s["a_jobs"]
    # the interrupted run resumed from its checkpoint in a second job and finished
    jobs = json.loads((out / n[1] / state_lib.JOB_FILE).read_text())
    log = open(jobs["stderr"]).read()
    assert "resumed from step" in log, log[-3000:]
    resumed = int(log.split("resumed from step")[1].split()[0])
    # a checkpoint step before the end (the training may pass the step seen at the signal before it stops)
    assert 3 <= resumed < STEPS and resumed % 3 == 0
    recs = state_lib.read_records(str(out / n[1]))
    assert sorted({r["step"] for r in recs if r.get("kind") == "train"}) == list(range(1, STEPS + 1))
    assert [r["reason"] for r in recs if r.get("kind") == "stop"] == ["steps"]  # the Ctrl-C wrote no stop record
    assert (out / n[1] / "final_model").is_dir() and (out / n[2] / "final_model").is_dir()
    cfg = json.loads((out / n[2] / "config.json").read_text())
    assert cfg["optim"]["lr"] == 0.01 and cfg["train"]["log_every"] == 1 and cfg["train"]["progress"] is False


@pytest.mark.slow
def test_local_sweep_status_and_failed_run(local_sweep):
    s = local_sweep
    n = s["names"]
    assert s["status2"].returncode == 0, s["status2"].stderr
    rows = _status_rows(s["status2"].stdout)
    for name in n[:3]:
        assert rows[name] == ["done", f"{STEPS}/{STEPS}", ""]
    st, step, detail = rows[n[3]]
    assert st == "failed" and step == f"-/{STEPS}"
    assert detail.startswith("error: ") and "/nonexistent/records.jsonl" in detail
    assert s["status2"].stdout.strip().splitlines()[-1] == "4 runs: 0 pending, 0 running, 3 done, 1 failed"
    assert f"failed {n[3]}: error: " in s["second"].stdout  # reported when it failed; the others went on


@pytest.mark.slow
def test_local_sweep_report_ranks_runs(local_sweep):
    s = local_sweep
    out, n = s["out"], s["names"]
    assert s["report"].returncode == 0, s["report"].stderr
    best = {}
    for name in n[:3]:
        with open(out / name / "metrics.jsonl") as f:
            vals = [json.loads(ln)["val_loss"] for ln in f if '"kind": "eval"' in ln]
        assert len(vals) == 2  # steps 6 and 12
        best[name] = min(vals)
    ranked = [ln.split("|")[2].strip() for ln in (out / "report.md").read_text().splitlines()[2:]]
    assert ranked == sorted(best, key=best.get) + [n[3]]
    with open(out / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(t["val_loss (min)"]) for t in table[:3]] == sorted(best.values())
    assert (out / "report.png").stat().st_size > 1000
