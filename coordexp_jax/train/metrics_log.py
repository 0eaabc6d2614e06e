"""Where the training loops' metrics go: metrics.jsonl, TensorBoard and (optionally) Weights & Biases.

`MetricsWriter(workdir, tensorboard, cfg=cfg)` is the one writer of both loops (`train/loop.py`,
`train/grpo_loop.py`); only process 0 writes.

- `workdir/metrics.jsonl`: one JSON object per record (`{"step", "kind", <metric>: float, ...}`), appended
  across restarts, with the metric names as the code writes them (`det/f1@0.5`, `grounding/acc@0.5`).
- TensorBoard (`workdir/tb`, `train.tensorboard`): every metric as a scalar tagged `tag_name(kind/name)`, and
  after each evaluation the `log.num_pictures` worst evaluation pictures as images with their captions as text.
- Weights & Biases (`log.wandb.project` set): the resolved config as the run config, every record under the same
  tags as TensorBoard (x axis: the training step, logged as `step`), the same pictures with their captions
  (image name, TP/FP/FN, mean IoU, prompt, answer), and the `stop` record in the run summary. The W&B run id is
  kept in `workdir/wandb_run.json`, so a run resumed from its checkpoints resumes its W&B run. With
  `log.wandb.project = ''` the `wandb` package is not imported and nothing is written for it.

The evaluation pictures are read from the `per_image.json` that the evaluator writes into
`eval_dir(workdir, step)` (one entry per image: `index`, `image`, `picture` (path relative to that folder),
`tp`, `fp`, `fn`, `mean_iou`, `prompt`, `answer`, ...); a record of kind `eval` without such a file logs no
pictures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from coordexp_jax.errors import CoordExpError

log = logging.getLogger(__name__)

WANDB_RUN_FILE = "wandb_run.json"  # {"id": ...}: the W&B run this workdir logs to (resumed on restart)
PER_IMAGE_FILE = "per_image.json"

# TensorBoard's summary-name rule (tensorboardX.summary._clean_tag: anything outside [-/\w.] is "illegal" and
# replaced with a logged warning); W&B accepts these names as well.
_ILLEGAL_TAG_CHARS = re.compile(r"[^-/\w.]")


class WandbUnavailableError(CoordExpError, ImportError):
    """`log.wandb.project` is set but the `wandb` package is not installed (or a W&B run could not start)."""


def tag_name(name: str) -> str:
    """A metric name as a TensorBoard summary tag and W&B key: '@' -> '_at_' (`det/f1@0.5` -> `det/f1_at_0.5`),
    every other character outside [-/A-Za-z0-9_.] -> '_', no leading '/'. metrics.jsonl keeps the original name."""
    return _ILLEGAL_TAG_CHARS.sub("_", name.replace("@", "_at_")).lstrip("/")


def eval_dir(workdir: str, step: int) -> str:
    """The output folder of the in-training evaluation at `step`: `workdir/eval/step_N`."""
    return os.path.join(workdir, "eval", f"step_{int(step)}")


def eval_log_line(res: dict, workdir: str, step: int) -> str:
    """The one line logged after an in-training evaluation: the report's headline figures, rounded
    (`evaluate.summary_line`; every metric, rounded, when the evaluation has no headline, e.g. `eval.kind='loss'`),
    and the report page when one was written. metrics.jsonl keeps every figure unrounded."""
    from coordexp_jax.evaluate import summary_line

    line = summary_line(res) or ", ".join(f"{k} {float(v):.4g}" for k, v in res.items())
    page = os.path.join(eval_dir(workdir, step), "index.html")
    return f"{line} ({page})" if os.path.isfile(page) else line


# ------------------------------------------------------------------------------------------ evaluation pictures


def worst_first(entries: Sequence[Mapping], n: int) -> list[Mapping]:
    """The `n` worst images of a `per_image.json` list that have a picture, in the report's order
    (`coordexp_jax.report.worst_first`: failed parses, then most FP + FN or count error, then lowest mean IoU)."""
    from coordexp_jax.report import worst_first as order

    return [entries[i] for i in order(entries) if entries[i].get("picture")][: max(int(n), 0)]


def picture_caption(e: Mapping, max_chars: int = 300) -> str:
    """One picture's caption: image name, TP/FP/FN, mean IoU and parse status (counting: stated vs true count),
    then the prompt and the answer texts (each cut to `max_chars` characters)."""

    def cut(s: Any) -> str:
        s = "" if s is None else str(s)
        return s if len(s) <= max_chars else s[: max_chars - 1] + "…"

    facts = [f"{k.upper()} {e[k]}" for k in ("tp", "fp", "fn") if e.get(k) is not None]
    if e.get("tp") is None and e.get("n_gt") is not None:
        facts.append(f"count {e.get('n_pred')} (true {e['n_gt']})")
    iou = e.get("mean_iou")
    if isinstance(iou, (int, float)) and math.isfinite(iou):
        facts.append(f"mean IoU {iou:.2f}")
    if e.get("parse") not in (None, "ok"):
        facts.append(f"parse {e['parse']}")
    head = f"#{e.get('index', '?')} {os.path.basename(str(e.get('image', '')))}"
    lines = [head + (": " + ", ".join(facts) if facts else "")]
    if e.get("prompt"):
        lines.append("prompt: " + cut(e["prompt"]))
    if e.get("answer") is not None:
        lines.append("answer: " + cut(e["answer"]))
    return "\n".join(lines)


def read_pictures(eval_out: str, n: int) -> list[tuple[str, str]]:
    """(absolute picture path, caption) of the `n` worst images of `eval_out/per_image.json` whose picture file
    exists; [] when the file is missing or `n` is 0. A malformed file is logged as a warning, not raised."""
    path = os.path.join(eval_out, PER_IMAGE_FILE)
    if n <= 0 or not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            entries = json.load(f)
        if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
            raise ValueError("not a list of objects")
    except (OSError, ValueError) as e:
        log.warning("evaluation pictures not logged: %s: %s", path, e)
        return []
    drawn = [e for e in entries if e.get("picture") and os.path.isfile(os.path.join(eval_out, str(e["picture"])))]
    return [(os.path.join(eval_out, str(e["picture"])), picture_caption(e)) for e in worst_first(drawn, n)]


def _rgb(path: str):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))  # [H, W, 3] uint8


# ------------------------------------------------------------------------------------------------ Weights & Biases


def wandb_settings(cfg, workdir: str) -> dict | None:
    """The `wandb.init` arguments of a validated config (None when `log.wandb.project` is ''): project, entity
    (None = the default), mode, name (default: the workdir's name), group (None when ''), dir (default: the
    workdir)."""
    w = cfg.log.wandb
    if not w.project:
        return None
    return {"project": w.project, "entity": w.entity or None, "mode": w.mode,
            "name": w.name or os.path.basename(os.path.normpath(os.path.abspath(workdir))),
            "group": w.group or None, "dir": w.dir or workdir}


def _run_id(workdir: str) -> str:
    """The W&B run id of this workdir (kept in `workdir/wandb_run.json`; a new random one, 12 lowercase hex
    characters as W&B ids allow, is written on first use)."""
    path = os.path.join(workdir, WANDB_RUN_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                rid = json.load(f).get("id")
            if rid:
                return str(rid)
        except (OSError, ValueError) as e:
            log.warning("%s unreadable (%s): starting a new W&B run", path, e)
    rid = uuid.uuid4().hex[:12]
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"id": rid}, f)
    return rid


def _missing_wandb(project: str, why: str) -> WandbUnavailableError:
    return WandbUnavailableError(
        f"config key 'log.wandb.project' = {project!r} needs the wandb package, which is not installed ({why}): "
        "pip install wandb (in the repository: pip install '.[wandb]'), or set log.wandb.project=''")


def check_wandb(cfg) -> None:
    """At the start of a run (process 0), before anything is built: with `log.wandb.project` set, wandb must be
    installed (looked up, not imported).

    Raises:
      WandbUnavailableError: naming the key and `pip install wandb`.
    """
    import importlib.util

    if cfg.log.wandb.project and jax.process_index() == 0 and importlib.util.find_spec("wandb") is None:
        raise _missing_wandb(cfg.log.wandb.project, "no module named 'wandb'")


class WandbLogger:
    """One W&B run of a workdir: config, records, pictures, summary. Imports `wandb` on construction.

    Raises:
      WandbUnavailableError: wandb is not installed, or `wandb.init` failed (e.g. online mode without a login).
    """

    def __init__(self, settings: dict, workdir: str, config: dict | None = None):
        try:
            import wandb
        except ImportError as e:
            raise _missing_wandb(settings["project"], str(e)) from None
        self.wandb = wandb
        os.makedirs(settings["dir"], exist_ok=True)
        rid = _run_id(workdir)
        try:
            self.run = wandb.init(**settings, id=rid, resume="allow", config=config)
        except Exception as e:  # noqa: BLE001 - wandb raises its own error types (no login, no network, ...)
            raise WandbUnavailableError(
                f"the W&B run (log.wandb.project={settings['project']!r}, mode={settings['mode']!r}) could not "
                f"start: {str(e).splitlines()[0] if str(e) else type(e).__name__}; without network or login use "
                "--config.log.wandb.mode=offline and `wandb sync` later") from None
        self.run.define_metric("step")
        self._kinds: set[str] = set()

    def _axis(self, kind: str) -> None:
        if kind not in self._kinds:
            self._kinds.add(kind)
            self.run.define_metric(f"{kind}/*", step_metric="step")

    def log(self, step: int, kind: str, metrics: Mapping[str, float]) -> None:
        kind = tag_name(kind)
        self._axis(kind)
        self.run.log({**{f"{kind}/{tag_name(k)}": float(v) for k, v in metrics.items()}, "step": int(step)})

    def pictures(self, step: int, pictures: Sequence[tuple[str, str]], kind: str = "eval") -> None:
        kind = tag_name(kind)
        self._axis(kind)
        self.run.log({**{f"{kind}/pictures/{i:02d}": self.wandb.Image(path, caption=cap)
                         for i, (path, cap) in enumerate(pictures)}, "step": int(step)})

    def summary(self, kind: str, fields: Mapping[str, Any]) -> None:
        self.run.summary.update({f"{tag_name(kind)}/{tag_name(k)}": v for k, v in fields.items()
                                 if isinstance(v, (str, int, float, bool))})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# ------------------------------------------------------------------------------------------------ the writer


class MetricsWriter:
    """metrics.jsonl (appended), TensorBoard and, when `cfg.log.wandb.project` is set, W&B; only process 0 writes.

    `cfg`: the validated training config (its `log` section: `num_pictures`, `wandb.*`); None = no W&B and
    `log.num_pictures`' default (16).

    Raises:
      WandbUnavailableError: W&B is configured but wandb is not installed or its run cannot start.
    """

    def __init__(self, workdir: str, tensorboard: bool = True, *, cfg=None):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.num_pictures = int(cfg.log.num_pictures) if cfg is not None else 16
        self.tb = None
        self.wandb: WandbLogger | None = None
        if not self.enabled:
            return
        settings = wandb_settings(cfg, workdir) if cfg is not None else None
        if settings is not None:
            from coordexp_jax.train.config import to_dict

            self.wandb = WandbLogger(settings, workdir, config=to_dict(cfg))
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            except Exception as e:  # noqa: BLE001 - logging must not stop training
                log.warning("TensorBoard disabled: %s", e)

    def write(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        """Appends `{"step", "kind", **metrics}` to metrics.jsonl and logs the metrics to TensorBoard / W&B; a
        record of kind 'eval' also logs the pictures of `eval_dir(workdir, step)` (see `read_pictures`)."""
        if not self.enabled:
            return
        rec = {"step": int(step), "kind": kind, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(tag_name(f"{kind}/{k}"), float(v), int(step))
        if self.wandb is not None:
            self.wandb.log(step, kind, metrics)
        if kind == "eval" and (self.tb is not None or self.wandb is not None):
            self.pictures(step, read_pictures(eval_dir(self.workdir, step), self.num_pictures))

    def pictures(self, step: int, pictures: Sequence[tuple[str, str]], kind: str = "eval") -> None:
        """Logs (picture path, caption) pairs under `<kind>/pictures/NN` (NN = rank, worst first; one key per rank,
        as the pictures differ in size): TensorBoard images with the captions as text
        `<kind>/picture_captions/NN`, W&B images with their captions."""
        if not self.enabled or not pictures:
            return
        if self.tb is not None:
            for i, (path, cap) in enumerate(pictures):
                self.tb.add_image(tag_name(f"{kind}/pictures/{i:02d}"), _rgb(path), int(step), dataformats="HWC")
                self.tb.add_text(tag_name(f"{kind}/picture_captions/{i:02d}"), cap.replace("\n", "  \n"), int(step))
        if self.wandb is not None:
            self.wandb.pictures(step, pictures, kind)

    def event(self, step: int, kind: str, **fields) -> None:
        """A record of JSON-able fields (not floats only), e.g. `kind='stop'` with the reason a run stopped; W&B gets
        its scalar fields in the run summary (`stop/reason`, ...)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "kind": kind, **fields}) + "\n")
        if self.wandb is not None:
            self.wandb.summary(kind, {"step": int(step), **fields})

    def close(self, failed: bool = False) -> None:
        """Flushes and closes the loggers; `failed` marks the W&B run as failed (exit code 1)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.close(failed)
            self.wandb = None


__all__ = ["MetricsWriter", "WandbLogger", "WandbUnavailableError", "check_wandb", "tag_name", "eval_dir", "worst_first",
           "picture_caption", "read_pictures", "wandb_settings", "WANDB_RUN_FILE", "PER_IMAGE_FILE"]
