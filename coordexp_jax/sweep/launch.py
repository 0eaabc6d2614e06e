"""Launching a sweep: validate every run's config, give each its workdir, submit the runs with submitit.

Each run is one training command line, `python -m coordexp_jax.train --config FILE --workdir DIR/<run>
[--config.key=value ...]` (the sweep's fixed overrides, then the run's own), run by `RunCommand` inside a submitit
job: `submitit.LocalExecutor` on this machine (at most `parallel` at a time, this process waits for them), or
`submitit.SlurmExecutor` as one job array (this process submits and returns). The training CLI resumes from the
latest checkpoint in its workdir, so submitting an unfinished run again continues it; runs that are done or whose
job is still alive are not submitted again (state.py).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from coordexp_jax.sweep import spec as spec_lib, state as state_lib
from coordexp_jax.sweep.spec import SweepError

TRAIN_MODULE = "coordexp_jax.train"
LOCAL_TIMEOUT_MIN = 60 * 24 * 30  # the local executor kills a job after its timeout: effectively none


@dataclasses.dataclass
class Run:
    """One run of a sweep: its name (= its directory under the sweep's), overrides, workdir and command line."""

    name: str
    overrides: dict
    workdir: str
    command: list[str]
    train_steps: int


class RunFailed(RuntimeError):
    """The training command of a sweep run exited with a non-zero code; the message has its last error line."""


class RunInterrupted(RuntimeError):
    """The training command of a sweep run was stopped by a signal (Ctrl-C, SIGTERM, kill): not a failure, the
    next launch resumes it (state.py reads the name of this class in submitit's result)."""


# exit codes of a training stopped by a signal: -N (killed by signal N), 128 + N (a shell's / the CLI's own)
INTERRUPT_CODES = {-signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL, -signal.SIGHUP, 130, 143, 137, 129}


def _set_parent_death_signal() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the training process gets SIGTERM when the job process that started it dies (a cancelled local job
    must not leave an orphan training in the workdir)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: no such guarantee
        pass


class RunCommand:
    """The callable a submitit job runs: the training command line, its output passed through to the job's
    stdout/stderr logs. Returns the last line of its stdout; raises `RunFailed` with the exit code and the last
    error line of its stderr when it fails. `env`: variables to set in the child (None: remove the variable).

    A SLURM job that reaches its time limit is requeued by submitit (`checkpoint`), and the training resumes from
    its latest checkpoint."""

    def __init__(self, command: Sequence[str], cwd: str | None = None, env: Mapping[str, str | None] | None = None):
        self.command = [str(c) for c in command]
        self.cwd = cwd
        self.env = dict(env or {})

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's requeue hook (called on SLURM's pre-timeout signal): the same command again."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(RunCommand(self.command, self.cwd, self.env))

    def __call__(self) -> str:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for k, v in self.env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        print(f"command: {shlex.join(self.command)}", flush=True)
        proc = subprocess.Popen(self.command, cwd=self.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_set_parent_death_signal if sys.platform == "linux" else None)
        tails = {"out": collections.deque(maxlen=200), "err": collections.deque(maxlen=200)}
        threads = [threading.Thread(target=_pump, args=(proc.stdout, sys.stdout, tails["out"]), daemon=True),
                   threading.Thread(target=_pump, args=(proc.stderr, sys.stderr, tails["err"]), daemon=True)]
        for t in threads:
            t.start()
        try:
            rc = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        for t in threads:
            t.join(timeout=10)
        if rc in INTERRUPT_CODES:
            raise RunInterrupted(f"training stopped by a signal (exit code {rc})")
        if rc != 0:
            line = state_lib.last_error_line("".join(tails["err"])) or "no error output"
            raise RunFailed(f"training exited with code {rc}: {line}")
        return state_lib.last_error_line("".join(tails["out"]))


def _pump(src, dst, tail: collections.deque) -> None:
    """Copies a child's output stream to `dst` line by line, keeping the last lines in `tail`."""
    for raw in iter(src.readline, b""):
        text = raw.decode("utf-8", "replace")
        tail.append(text)
        try:
            dst.write(text)
            dst.flush()
        except (OSError, ValueError):
            pass
    src.close()


def _stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGINT (the training stops at once; its latest checkpoint stays), then SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------------------------------- planning


def load_sweep_spec(config_path: str) -> Any:
    """The `get_sweep()` result of a config file, or None when it defines none.

    Raises SweepError naming the file when it cannot be imported or get_sweep() fails."""
    import importlib.util

    path = config_path.split(":", 1)[0]
    if not os.path.isfile(path):
        raise SweepError(f"--config {path}: file not found")
    try:
        spec = importlib.util.spec_from_file_location(f"_coordexp_sweep_{abs(hash(os.path.abspath(path)))}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: one line naming it
        raise SweepError(f"--config {path}: cannot be loaded ({type(e).__name__}: {e})") from None
    fn = getattr(module, "get_sweep", None)
    if fn is None:
        return None
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        raise SweepError(f"--config {path}: get_sweep() failed ({type(e).__name__}: {e})") from None


def _base_keys() -> set[str]:
    from coordexp_jax.train.config import base_config

    out = set()

    def walk(c, prefix):
        for k in c.keys():
            v = c[k]
            out.add(prefix + k)
            if hasattr(v, "keys") and callable(v.keys):
                walk(v, prefix + k + ".")

    walk(base_config(), "")
    return out


def _given(key: str, fixed: Sequence[str]) -> bool:
    return any(a.split("=", 1)[0] == f"--config.{key}" for a in fixed)


def default_fixed(fixed: Sequence[str], sweep_name: str) -> list[str]:
    """The sweep's fixed overrides with its defaults added unless given: no progress bar (the job logs are files)
    and, where the config has W&B keys, the W&B group = the sweep's name."""
    out = list(fixed)
    keys = _base_keys()
    if "train.progress" in keys and not _given("train.progress", fixed):
        out.insert(0, "--config.train.progress=False")
    if "log.wandb.group" in keys and not _given("log.wandb.group", fixed):
        out.insert(0, f"--config.log.wandb.group={sweep_name}")
    return out


def resolve(config_path: str, flags: Sequence[str]):
    """The validated training config of `--config config_path` with the `--config.key=value` flags applied, parsed
    exactly as `python -m coordexp_jax.train` parses them (cli.parse_config_flags, then config.validate).

    Raises UsageError / ConfigError with one line naming the key (unknown key, wrong type, out of range)."""
    from coordexp_jax import cli
    from coordexp_jax.train import config as config_lib

    argv = cli.normalize_config_args(["coordexp_jax.sweep", "--config", config_path, *flags])
    FLAGS = cli.config_flag_values(argv)
    cli.parse_config_flags(FLAGS, argv)
    return config_lib.validate(FLAGS.config)


def plan(config_path: str, out_dir: str, runs: Sequence[Mapping[str, Any]], fixed: Sequence[str] = (),
         python: str | None = None) -> list[Run]:
    """The runs of a sweep with their workdirs `out_dir/<name>` and training command lines, every run's config
    validated first (nothing is written or launched before all of them pass).

    Raises SweepError naming the run and the key of the first run whose config is invalid."""
    from coordexp_jax.errors import CoordExpError

    config_path = os.path.abspath(config_path)
    out_dir = os.path.abspath(out_dir)
    names = spec_lib.run_names(runs)
    planned = []
    for name, overrides in zip(names, runs):
        flags = list(fixed) + [f"--config.{k}={spec_lib.flag_value(v)}" for k, v in overrides.items()]
        try:
            cfg = resolve(config_path, flags)
        except CoordExpError as e:
            from coordexp_jax.cli import error_message

            raise SweepError(f"sweep run '{name}': {error_message(e)}") from None
        workdir = os.path.join(out_dir, name)
        command = [python or sys.executable, "-m", TRAIN_MODULE, "--config", config_path, "--workdir", workdir, *flags]
        planned.append(Run(name, dict(overrides), workdir, command, int(cfg.train.steps)))
    return planned


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return spec_lib.flag_value(v)


def _write_json(path: str, doc: Any) -> None:
    """Writes `doc` unless the file already holds it (no needless mtime changes), atomically."""
    text = json.dumps(doc, indent=1) + "\n"  # key order kept: overrides in sweep order
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_plan(out_dir: str, config_path: str, fixed: Sequence[str], runs: Sequence[Run], cwd: str) -> None:
    """`out_dir/sweep.json` (config, fixed overrides, runs in order) and each run's `sweep_run.json`."""
    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, state_lib.SWEEP_FILE), {
        "name": os.path.basename(os.path.abspath(out_dir)), "config": os.path.abspath(config_path),
        "fixed": list(fixed), "cwd": cwd,
        "runs": [{"name": r.name, "overrides": _jsonable(r.overrides)} for r in runs]})
    for r in runs:
        os.makedirs(r.workdir, exist_ok=True)
        _write_json(os.path.join(r.workdir, state_lib.RUN_FILE), {
            "name": r.name, "overrides": _jsonable(r.overrides), "command": r.command, "train_steps": r.train_steps,
            "sweep": os.path.basename(os.path.abspath(out_dir))})


def _job_record(executor: str, job, folder: str) -> dict:
    paths = job.paths
    return {"executor": executor, "job_id": str(job.job_id), "folder": str(folder), "stdout": str(paths.stdout),
            "stderr": str(paths.stderr), "result": str(paths.result_pickle),
            "submitted": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def to_submit(runs: Sequence[Run]) -> tuple[list[Run], dict[str, state_lib.RunStatus]]:
    """The runs to submit (not done, no live job) and every run's current status."""
    statuses = {r.name: state_lib.run_status(r.workdir) for r in runs}
    todo = [r for r in runs if statuses[r.name].state not in ("done", "running")
            and not statuses[r.name].detail.startswith("queued")]
    return todo, statuses


# --------------------------------------------------------------------------------------------------- executors


@dataclasses.dataclass
class SlurmOptions:
    """Resources of each array task (one run); `setup`: shell lines run before the job (module load, venv)."""

    partition: str | None = None
    gpus_per_node: int = 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int = 240
    array_parallelism: int = 256
    setup: Sequence[str] = ()
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "coordexp_sweep"


def slurm_executor(folder: str, opts: SlurmOptions):
    """A `submitit.SlurmExecutor` writing its sbatch files and logs to `folder`; one task (one training process)
    per array element, with the resources of `opts`.

    Raises SweepError when SLURM's tools are not on PATH (submitit needs `srun`)."""
    import submitit

    try:
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
    except RuntimeError as e:
        raise SweepError(f"--executor slurm: {e} (sbatch/srun must be on PATH)") from None
    params: dict[str, Any] = {"job_name": opts.job_name, "time": int(opts.time_min), "nodes": 1,
                              "ntasks_per_node": 1, "array_parallelism": int(opts.array_parallelism)}
    if opts.gpus_per_node:
        params["gpus_per_node"] = int(opts.gpus_per_node)
    for k in ("partition", "cpus_per_task", "account", "qos", "constraint"):
        if getattr(opts, k) is not None:
            params[k] = getattr(opts, k)
    if opts.mem_gb is not None:
        gb = float(opts.mem_gb)
        params["mem"] = f"{int(gb)}GB" if gb.is_integer() else f"{int(gb * 1024)}MB"
    if opts.setup:
        params["setup"] = list(opts.setup)
    ex.update_parameters(**params)
    return ex


def submit_slurm(runs: Sequence[Run], out_dir: str, opts: SlurmOptions, cwd: str,
                 log: Callable[[str], None] = print) -> list[str]:
    """Submits `runs` as one SLURM job array (logs in `out_dir/.submitit`); returns the job ids."""
    folder = os.path.join(out_dir, ".submitit")
    ex = slurm_executor(folder, opts)
    with ex.batch():
        jobs = [ex.submit(RunCommand(r.command, cwd)) for r in runs]
    for r, job in zip(runs, jobs):
        _write_json(os.path.join(r.workdir, state_lib.JOB_FILE), _job_record("slurm", job, folder))
        log(f"submitted {r.name}: SLURM job {job.job_id}")
    return [str(j.job_id) for j in jobs]


def run_local(runs: Sequence[Run], parallel: int, cwd: str, poll_s: float = 1.0,
              log: Callable[[str], None] = print) -> dict[str, state_lib.RunStatus]:
    """Runs `runs` with `submitit.LocalExecutor` (logs in `<workdir>/submitit`), at most `parallel` at a time, and
    waits for all. A failed run is logged and the others go on. Ctrl-C / SIGTERM cancels the running jobs (they
    resume from their checkpoints at the next launch) and re-raises KeyboardInterrupt.

    GPUs: each job sees the CUDA_VISIBLE_DEVICES of this process (unset: all devices)."""
    import submitit

    env = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    queue = list(runs)
    active: dict[str, tuple[Run, Any]] = {}
    final: dict[str, state_lib.RunStatus] = {}
    # SIGINT too: a process started with SIGINT ignored (from a non-interactive shell's '&', or a test runner's
    # worker) inherits SIG_IGN, and Python then never raises KeyboardInterrupt on `kill -INT`
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in handled}
    in_main = threading.current_thread() is threading.main_thread()

    def on_term(signum, frame):
        raise KeyboardInterrupt

    if in_main:
        for sig in handled:
            signal.signal(sig, on_term)
    try:
        while queue or active:
            while queue and len(active) < max(1, parallel):
                r = queue.pop(0)
                folder = os.path.join(r.workdir, "submitit")
                ex = submitit.LocalExecutor(folder=folder)
                ex.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
                job = ex.submit(RunCommand(r.command, cwd, env))
                _write_json(os.path.join(r.workdir, state_lib.JOB_FILE), _job_record("local", job, folder))
                active[r.name] = (r, job)
                log(f"started {r.name} (local job {job.job_id}; log {job.paths.stderr})")
            time.sleep(poll_s)
            for name, (r, job) in list(active.items()):
                if job.done():
                    del active[name]
                    st = state_lib.run_status(r.workdir, check_jobs=False)
                    final[name] = st
                    log(f"{st.state} {name}" + (f": {st.detail}" if st.detail else ""))
    except KeyboardInterrupt:
        for r, job in active.values():
            job.cancel()  # SIGINT to the job's controller, which stops its task and so the training
        for r, job in active.values():
            if not _wait_done(job, 15.0):  # SIGINT ignored (a sweep started with '&'): SIGTERM to the processes
                for pid in _descendants(int(job.job_id)):
                    _signal(pid, signal.SIGTERM)
                _signal(int(job.job_id), signal.SIGTERM)
                if not _wait_done(job, 30.0):
                    for pid in _descendants(int(job.job_id)) + [int(job.job_id)]:
                        _signal(pid, signal.SIGKILL)
        log(f"interrupted: {len(active)} running job(s) cancelled; run the same command again to resume")
        raise
    finally:
        if in_main:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return final


def _wait_done(job, timeout_s: float) -> bool:
    end = time.time() + timeout_s
    while time.time() < end and not job.done():
        time.sleep(0.2)
    return job.done()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _descendants(pid: int) -> list[int]:
    """The pids of every process below `pid` (Linux /proc; [] elsewhere), children first."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for e in entries:
        try:
            with open(f"/proc/{e}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(e))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(0), []):
            out.append(c)
            todo.append(c)
    return out


__all__ = ["Run", "RunCommand", "RunFailed", "RunInterrupted", "SlurmOptions", "load_sweep_spec", "plan", "write_plan", "resolve",
           "default_fixed", "to_submit", "run_local", "submit_slurm", "slurm_executor"]
