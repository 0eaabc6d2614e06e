"""The state of a sweep's runs, read from the files in their workdirs (no scheduler needed, except to tell a SLURM
job that is queued or running from one that ended).

Files of a run directory `DIR/<run>/` (the training's workdir):
- `sweep_run.json` (written by the sweep): name, overrides, the training command line, train.steps;
- `sweep_job.json` (written at each submission): executor, job id, the submitit log and result files;
- `metrics.jsonl`, `config.json`, `checkpoints/`, `final_model/` (written by the training).

States:
- done: the last `stop` record of metrics.jsonl has reason 'steps' or 'complete' and the final model was written
  (`final_model/`, or the job finished successfully);
- running: the job's process is alive (local) or SLURM reports it queued/running (the detail says which);
- failed: the job ended with an error (its last `error:` line, or the last line of the error, from the submitit
  stderr log / result), a non-finite loss stopped it, or SLURM reports it failed/cancelled/timed out;
- pending: not started, or interrupted (a signal stopped the job or its training) / stopped by train.max_minutes
  (running the sweep again resumes it from its latest checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

RUN_FILE = "sweep_run.json"
JOB_FILE = "sweep_job.json"
SWEEP_FILE = "sweep.json"
STATES = ("pending", "running", "done", "failed")
DONE_REASONS = ("steps", "complete")
# SLURM job states (sacct) of a job that has not ended; every other known state is an end.
SLURM_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING",
                "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT")
SLURM_FAILED = ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                "DEADLINE", "REVOKED")


@dataclasses.dataclass
class RunStatus:
    """One run's state. `step`/`total`: the last logged training step and train.steps (None when unknown)."""

    name: str
    state: str
    step: int | None
    total: int | None
    detail: str = ""
    job_id: str = ""


def read_json(path: str) -> Any:
    """The JSON document at `path`, or None when the file is missing or not (yet) complete JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_records(workdir: str) -> list[dict]:
    """Every record of `workdir/metrics.jsonl` in file order; a torn last line (a run killed mid-write) is
    skipped."""
    out = []
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict):
                    out.append(r)
    except OSError:
        pass
    return out


def last_error_line(text: str) -> str:
    """The last `error: ...` line of a log (the project's one-line user errors); else the last line of the last
    Python traceback ('ValueError: ...'); else the last non-empty line. '' for an empty log."""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("Traceback (most recent call last)"):
            tail = [ln for ln in lines[i + 1:] if not ln.startswith(("File ", "^", "~"))]
            if tail:
                return tail[-1]
    return lines[-1] if lines else ""


def _tail(path: str, nbytes: int = 1 << 16) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def read_result(path: str) -> tuple[str, Any] | None:
    """submitit's result pickle: ('success', output) or ('error', traceback text); None when not written."""
    if not path or not os.path.isfile(path):
        return None
    from submitit.core.utils import pickle_load

    try:
        return pickle_load(path)
    except Exception:  # noqa: BLE001 - a half-written or foreign file: treated as absent
        return None


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is a submitit local job controller (not a recycled pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().decode("utf-8", "replace")
        if "submitit" not in cmd:
            return False
        with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by its parent) is not alive
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def latest_checkpoint(workdir: str) -> int | None:
    """The largest step of the orbax checkpoints in `workdir/checkpoints` (one directory per step), or None."""
    try:
        steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
    except OSError:
        return None
    return max(steps) if steps else None


def slurm_state(job: dict) -> str:
    """The SLURM state of a sweep job (sacct through submitit), 'UNKNOWN' when it cannot be read."""
    try:
        import submitit

        return str(submitit.SlurmJob(folder=job["folder"], job_id=str(job["job_id"])).state).split()[0].upper()
    except Exception:  # noqa: BLE001 - no sacct, not on a cluster: unknown
        return "UNKNOWN"


def job_activity(job: dict | None, result) -> str:
    """'running', 'queued' or '' (no job, or it has ended) for a job record of `sweep_job.json`."""
    if not job or result is not None:
        return ""
    if job.get("executor") == "local":
        return "running" if _pid_alive(int(job["job_id"])) else ""
    state = slurm_state(job)
    if state in SLURM_ACTIVE:
        return "queued" if state == "PENDING" else "running"
    return ""


def run_status(workdir: str, *, check_jobs: bool = True) -> RunStatus:
    """The state of the sweep run in `workdir` (see the module docstring). `check_jobs=False` skips asking the
    OS/SLURM whether the job is alive (a run then is never 'running')."""
    info = read_json(os.path.join(workdir, RUN_FILE)) or {}
    name = info.get("name") or os.path.basename(os.path.normpath(workdir))
    cfg = read_json(os.path.join(workdir, "config.json")) or {}
    total = (cfg.get("train") or {}).get("steps", info.get("train_steps"))
    records = read_records(workdir)
    steps = [r["step"] for r in records if r.get("kind") in ("train", "stop") and isinstance(r.get("step"), int)]
    step = max(steps) if steps else None
    stop = next((r for r in reversed(records) if r.get("kind") == "stop"), None)
    job = read_json(os.path.join(workdir, JOB_FILE))
    job_id = str(job.get("job_id", "")) if job else ""
    result = read_result(job.get("result", "")) if job else None
    activity = job_activity(job, result) if check_jobs else ""

    def status(state: str, detail: str = "") -> RunStatus:
        return RunStatus(name, state, step, total, detail, job_id)

    if activity:
        return status("running" if activity == "running" else "pending",
                      f"{activity} ({job.get('executor')} job {job_id})")
    reason = stop.get("reason") if stop else None
    finished = os.path.isdir(os.path.join(workdir, "final_model")) or (result is not None and result[0] == "success")
    if reason in DONE_REASONS and finished:
        return status("done")
    if result is not None and result[0] == "error" and "RunInterrupted" not in str(result[1]):
        line = last_error_line(_tail(job.get("stderr", ""))) or last_error_line(str(result[1]))
        return status("failed", line)
    if reason == "nonfinite":
        return status("failed", str(stop.get("message", "non-finite loss")))
    if job and job.get("executor") == "slurm" and check_jobs:
        state = slurm_state(job)
        if state in SLURM_FAILED:
            line = last_error_line(_tail(job.get("stderr", "")))
            return status("failed", f"SLURM {state}" + (f": {line}" if line else ""))
    if reason == "max_minutes":
        return status("pending", f"stopped by train.max_minutes at step {step}; run the sweep again to resume")
    if step is not None or (job and not activity):
        where = f" at step {step}" if step is not None else ""
        ckpt = latest_checkpoint(workdir)
        return status("pending", f"interrupted{where}; run the sweep again to resume"
                      + (f" from its checkpoint at step {ckpt}" if ckpt is not None else ""))
    return status("pending", "not started")


def sweep_runs(out_dir: str) -> list[str]:
    """The run directories of the sweep in `out_dir`: those listed in sweep.json first (its order), then any other
    subdirectory holding a sweep_run.json (runs of an earlier, larger version of the sweep)."""
    sweep = read_json(os.path.join(out_dir, SWEEP_FILE)) or {}
    names = [r["name"] for r in sweep.get("runs", []) if isinstance(r, dict) and "name" in r]
    others = sorted(d for d in (os.listdir(out_dir) if os.path.isdir(out_dir) else [])
                    if d not in names and os.path.isfile(os.path.join(out_dir, d, RUN_FILE)))
    return [os.path.join(out_dir, n) for n in names + others if os.path.isdir(os.path.join(out_dir, n))]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (columns padded for reading as plain text)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def status_table(statuses: list[RunStatus]) -> str:
    """The `status` command's table: run, state, step/total, detail; then one line of counts per state."""
    rows = [[s.name, s.state, f"{'-' if s.step is None else s.step}/{'?' if s.total is None else s.total}",
             s.detail] for s in statuses]
    counts = {k: sum(s.state == k for s in statuses) for k in STATES}
    summary = f"{len(statuses)} runs: " + ", ".join(f"{counts[k]} {k}" for k in STATES)
    return format_table(["run", "state", "step", "detail"], rows) + "\n" + summary


__all__ = ["RunStatus", "run_status", "sweep_runs", "status_table", "last_error_line", "read_records",
           "read_json", "format_table", "RUN_FILE", "JOB_FILE", "SWEEP_FILE", "STATES"]
