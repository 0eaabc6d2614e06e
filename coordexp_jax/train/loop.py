"""The training loop: resume, step, log, checkpoint, evaluate.

`train(cfg, workdir)` validates the config, writes it to the workdir, builds the components (build.py), creates
the TrainState in its shardings, resumes from the latest checkpoint in the workdir (or starts fresh), and runs
`train.steps` steps with a tqdm bar (loss, ETA). Metrics go to `workdir/metrics.jsonl` (one JSON object per logged
step, appended across restarts) and TensorBoard (`workdir/tb`). Non-finite losses: `train.nan_policy = 'stop'`
raises `NonFiniteLossError` naming the step; 'skip' leaves the state unchanged, counts the batch and goes on.
Why a call stopped (`STOP_REASONS`: train.steps reached, train.max_minutes, a non-finite loss, already complete) is
logged as one line and written to metrics.jsonl as a `kind: "stop"` record. Re-running a finished run restores its
last checkpoint and trains nothing; a stop by `train.max_minutes` resumes from the checkpoint written at the stop.
Recompiles of the train step are counted and logged (the data is bucketed to static shapes, so there should be
one compile per bucket). The loggers (metrics.jsonl, TensorBoard, optionally Weights & Biases with the evaluation
pictures) are `metrics_log.MetricsWriter`.

Evaluation is a hook: `eval_hook(model, step, workdir) -> dict of floats`, called every `eval.every` steps and at
the end. With `eval.kind = 'detection'` (default) it is `eval_hook.detection_eval_hook` (rollouts scored by
`coordexp_jax.evaluate`: AP, AP50, pictures); with 'loss' the teacher-forced validation loss of the objective.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from coordexp_jax.errors import CoordExpError
from coordexp_jax.train import checkpoint as ckpt_lib, config as config_lib, optim, sharding as shd, state as state_lib
from coordexp_jax.train import step as step_lib
from coordexp_jax.train.build import Components, build_components, num_params
from coordexp_jax.train import metrics_log
from coordexp_jax.train.metrics_log import MetricsWriter

log = logging.getLogger(__name__)

EvalHook = Callable[[nnx.Module, int, str], dict]


class NonFiniteLossError(CoordExpError, FloatingPointError):
    """The loss (or gradient norm) was NaN/inf at a step and `train.nan_policy` is 'stop'."""


# why a call of `train` returned (the `reason` of the metrics.jsonl `stop` record and of the summary's `stop_reason`)
STOP_REASONS = ("steps", "max_minutes", "nonfinite", "complete", "stop_after")


def stop_message(reason: str, step: int, total: int, *, minutes: float = 0.0, max_minutes: float = 0.0) -> str:
    """The one line logged (and stored in metrics.jsonl) when a call of `train` stops at `step` of `total`."""
    if reason == "steps":
        return f"stopped at step {step} of {total}: train.steps reached"
    if reason == "complete":
        return (f"nothing to train: the checkpoint in the workdir is at step {step} of {total} (the run is complete; "
                "raise train.steps to train longer)")
    if reason == "max_minutes":
        return (f"stopped at step {step} of {total}: train.max_minutes={max_minutes:g} reached after {minutes:.1f} "
                "min; run the same command again to resume from this step")
    if reason == "nonfinite":
        return f"stopped at step {step} of {total}: non-finite loss with train.nan_policy='stop'"
    if reason == "stop_after":
        return f"stopped at step {step} of {total}: stop_after steps of this call done"
    raise ValueError(f"unknown stop reason {reason!r}")


def read_metrics(workdir: str, kind: str = "train") -> dict[int, dict]:
    """step -> the last record of that step in metrics.jsonl (a restarted run re-logs steps after its checkpoint).
    `kind`: 'train', 'eval', 'stage2' or 'stop' (why a call of `train` ended: `reason`, `message`)."""
    out = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == kind:
                out[r["step"]] = r
    return out


def _flat_links(batch: dict) -> dict:
    """An HOI batch's `links` dict {pos, boxes, image, kind} as flat `link_<name>` arrays (what the objective's
    `links_of` reads and the batch sharding handles); other batches unchanged."""
    if not isinstance(batch.get("links"), dict):
        return batch
    out = {k: v for k, v in batch.items() if k != "links"}
    out.update({f"link_{k}": v for k, v in batch["links"].items()})
    return out


def _stack(batches: list[dict]) -> dict:
    """A list of micro-batches (dicts of numpy arrays of equal shapes) -> one dict with a leading [A] axis."""
    keys = batches[0].keys()
    for b in batches[1:]:
        for k in keys:
            if b[k].shape != batches[0][k].shape:
                raise ValueError(f"micro-batches of one step differ in shape for '{k}': {batches[0][k].shape} vs "
                                 f"{b[k].shape}; use a fixed data.seq_len / image size with train.grad_accum > 1")
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in keys}


def _global_shapes(batch: dict) -> dict:
    n = jax.process_count()
    out = {}
    for k, v in batch.items():
        shape = list(v.shape)
        dim = 1 + shd._BATCH_DIM.get(k, 0)
        if n > 1 and len(shape) > dim:
            shape[dim] *= n
        out[k] = tuple(shape)
    return out


def _merge_size(comps) -> int:
    """The vision tower's spatial merge size (2 when the model config has no vision part)."""
    return int(getattr(getattr(comps.model_config, "vision", None), "spatial_merge_size", 2))


def _put_global(b: dict, mesh, merge: int) -> dict:
    """A stacked per-process batch ([A, ...] arrays) -> global arrays on the mesh. With several processes the image
    slots of all processes sit side by side in one global array, so this process's `visual_index` is shifted past
    the slots in front of its own first (`rollout.multihost.offset_visual_index`)."""
    if jax.process_count() > 1:
        from coordexp_jax.rollout.multihost import offset_visual_index

        b = offset_visual_index(b, mesh, merge, accum_axis=True)
    return shd.put_batch(b, shd.batch_shardings(b, mesh), _global_shapes(b))


def default_eval_hook(graphdef, objective, eval_iter_fn, mesh, max_batches: int = 4,
                      merge: int = 2) -> EvalHook | None:
    """Teacher-forced validation loss of the objective on up to `max_batches` eval batches. `merge`: the vision
    tower's spatial merge size (for the multi-process `visual_index` shift)."""
    if eval_iter_fn is None:
        return None
    eval_loss = jax.jit(lambda params, batch: step_lib.make_eval_loss(graphdef, objective)(*params, batch))

    def hook(model, step, workdir):
        _, params, frozen = nnx.split(model, nnx.Param, ...)
        it = eval_iter_fn()
        tot, n = {}, 0
        for _, b in zip(range(max_batches), it):
            gb = _put_global(_stack([_flat_links(b)]), mesh, merge)
            m = jax.device_get(eval_loss((params, frozen), gb))
            for k, v in m.items():
                tot[k] = tot.get(k, 0.0) + float(v)
            n += 1
        return {f"val_{k}": v / max(n, 1) for k, v in tot.items()}

    return hook


def train(cfg, workdir: str, *, components: Components | None = None, eval_hook: EvalHook | None = None,
          stop_after: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) training in `workdir`. Returns a summary dict (final step, last metrics, skipped, ...).

    `components`: injected pieces (tests); default `build_components(cfg)`. `stop_after`: return after this many
    steps of this call (tests of resume), saving a checkpoint first.
    """
    cfg = config_lib.validate(cfg)
    metrics_log.check_wandb(cfg)  # W&B configured but not installed: one error line before anything is built
    if cfg.train.kind == "grpo":  # rollouts, rewards, group advantages, PPO-clip updates: train/grpo_loop.py
        from coordexp_jax.train.grpo_loop import train_grpo

        return train_grpo(cfg, workdir, components=components, eval_hook=eval_hook, stop_after=stop_after)
    if cfg.train.kind == "counting_regression":  # regression heads at <x>/<y>: train/counting_loop.py
        from coordexp_jax.train.counting_loop import prepare

        components, eval_hook = prepare(cfg, components, eval_hook)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        config_lib.write_resolved(cfg, workdir)
    comps = components or build_components(cfg)
    mesh = shd.make_mesh(cfg.mesh)
    T = cfg.train
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    sched_box = {}

    def make_tx(params_abs):
        tx, sched_box["s"] = optim.make_optimizer(cfg, params_abs, T.steps, comps.vocab_size, comps.coord_start)
        return tx

    graphdef, state, shardings, tx = state_lib.create_state(
        comps.make_model, optim.trainable_filter(cfg), make_tx, mesh, cfg.mesh.rules, T.seed,
        ema=T.ema_decay > 0, spec_fn=comps.spec_fn, materialize=comps.materialize)
    trainable_names = [optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    n_train, n_frozen = num_params(state.params), num_params(state.frozen)
    log.info("parameters: %d trainable, %d frozen", n_train, n_frozen)

    writer = MetricsWriter(workdir, T.tensorboard, cfg=cfg)  # W&B fails here (one line) before checkpoints open
    ckpt = ckpt_lib.Checkpointer(workdir, ckpt_lib.fingerprint(cfg, comps.vocab_size, trainable_names),
                                 keep_n=T.keep_n, async_save=T.async_checkpoint)
    restored = ckpt.restore(state_lib.abstract_state(state, shardings), comps.data_iter)
    if restored is not None:
        state = restored[0]
    start = int(jax.device_get(state.step))
    saved_step = start if restored is not None else None  # the latest step with a checkpoint (never saved twice)
    if restored is not None:
        log.info("resumed from step %d", start)

    step_fn = step_lib.jit_train_step(
        step_lib.make_train_step(graphdef, comps.objective, tx, sched_box["s"], T.ema_decay), shardings, mesh)
    hook = eval_hook
    if hook is None and cfg.eval.kind == "detection" and cfg.train.kind != "counting_regression":
        from coordexp_jax.train.eval_hook import detection_eval_hook

        hook = detection_eval_hook(cfg, comps)
    if hook is None:
        hook = default_eval_hook(graphdef, comps.objective, comps.eval_iter_fn, mesh, merge=_merge_size(comps))

    stage2_runner = None
    if cfg.stage2.ratio > 0:
        from coordexp_jax.train.stage2 import Stage2Runner

        stage2_runner = Stage2Runner(cfg, comps, graphdef, mesh=mesh)
    stage2_metrics: dict[int, dict] = {}
    coord_overflow = [0]

    def next_batch(index: int):
        """The batch of step `index` (0-based); on Stage-2 steps its rows are rewritten from rollouts of the
        current weights."""
        micro = [_flat_links(next(comps.data_iter)) for _ in range(T.grad_accum)]
        K = cfg.loss.coord_positions
        if K:
            over = sum(int((np.asarray(m["coord_mask"]).sum(-1) > K).sum()) for m in micro)
            if over:
                coord_overflow[0] += over
                log.warning("step %d: %d rows have more than loss.coord_positions=%d coordinate targets; the extra "
                            "ones get no coord_ce/soft_ce/w1 (%d rows so far)", index + 1, over, K, coord_overflow[0])
        if stage2_runner is not None and stage2_runner.is_rollout_step(index):
            micro, stage2_metrics[index + 1] = stage2_runner.rewrite(micro, state.params, state.frozen)
        return _put_global(_stack(micro), mesh, _merge_size(comps))

    def run_eval(step):
        if hook is None:
            return {}
        params = state.ema if (state.ema is not None and cfg.eval.use_ema) else state.params
        params = jax.tree.map(lambda e, p: e.astype(p.dtype), params, state.params)
        model = nnx.merge(graphdef, params, state.frozen)
        res = hook(model, step, workdir)
        writer.write(step, res, kind="eval")
        log.info("eval at step %d: %s", step, metrics_log.eval_log_line(res, workdir, step))
        return res

    pbar = None
    if T.progress and jax.process_index() == 0:
        from tqdm import tqdm

        pbar = tqdm(total=T.steps, initial=start, desc="train", dynamic_ncols=True)
    t0 = time.time()
    compiles = 0
    skipped = 0
    last: dict[str, float] = {}
    eval_res: dict[str, float] = {}
    step = start
    done_here = 0
    completed = False  # the try block ran to its end (else the W&B run is marked failed)
    out_of_time = False
    reason = "complete" if start >= T.steps else None
    batch = next_batch(start) if start < T.steps else None
    if start and start < T.steps and cfg.eval.every and start % cfg.eval.every == 0:
        # stopped between the checkpoint of an evaluation step and that evaluation (a signal, a crash): the resumed
        # run starts at that step, so the evaluation it missed runs now (never twice: metrics.jsonl has it otherwise)
        missing = start not in read_metrics(workdir, "eval")
        if jax.process_count() > 1:  # only process 0 writes metrics.jsonl; every process must take the same branch
            from jax.experimental import multihost_utils

            missing = bool(multihost_utils.broadcast_one_to_all(np.asarray(missing)))
        if missing:
            eval_res = run_eval(start)
    first_check = comps.extra.get("first_step_check")  # e.g. gradients reach the counting heads and LoRA
    if first_check is not None and start == 0 and batch is not None:
        writer.write(start, first_check(graphdef, state, batch, comps.objective), kind="grad_check")
    try:
        while step < T.steps:
            state, metrics = step_fn(state, batch)
            step += 1
            done_here += 1
            ckpt_step = bool(T.ckpt_every) and step % T.ckpt_every == 0 and step < T.steps
            out_of_time = bool(T.max_minutes) and (time.time() - t0) / 60 >= T.max_minutes
            finishing = step >= T.steps or out_of_time or (stop_after is not None and done_here >= stop_after)
            if not finishing and not ckpt_step:
                batch = next_batch(step)  # host work overlaps the asynchronously dispatched step
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            n_comp = step_fn._cache_size()
            if n_comp != compiles:
                if compiles:
                    log.warning("train step recompiled at step %d (%d compiles): batch shapes changed", step, n_comp)
                compiles = n_comp
            if m["nonfinite"]:
                if T.nan_policy == "stop":
                    ckpt.wait()
                    reason = "nonfinite"
                    raise NonFiniteLossError(
                        f"non-finite loss {m['loss']} (grad norm {m['grad_norm']}) at step {step}; the state was not "
                        "updated. Set train.nan_policy='skip' to skip such batches.")
                skipped += 1
                log.warning("step %d: non-finite loss, batch skipped (%d so far)", step, skipped)
            last = m
            if step % T.log_every == 0 or finishing:
                elapsed = time.time() - t0
                rec = dict(m, compiles=compiles, skipped=float(jax.device_get(state.skipped)),
                           elapsed_s=elapsed, steps_per_s=done_here / max(elapsed, 1e-9))
                writer.write(step, rec)
            if step in stage2_metrics:
                writer.write(step, stage2_metrics.pop(step), kind="stage2")
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{m['loss']:.4f}", skipped=skipped)
            if ckpt_step:  # after this step's metrics are written (a kill after the save loses no record)
                ckpt.save(step, state, comps.data_iter)  # the iterator is exactly at this step's boundary
                saved_step = step
                if not finishing:
                    batch = next_batch(step)
            if cfg.eval.every and step % cfg.eval.every == 0 and step < T.steps:
                eval_res = run_eval(step)
            if finishing:
                reason = "steps" if step >= T.steps else "max_minutes" if out_of_time else "stop_after"
                break
        if saved_step != step:  # a stop on a checkpoint step (or a finished run re-run) has its checkpoint
            ckpt.save(step, state, comps.data_iter, force=True)
            saved_step = step
        ckpt.wait()
        if reason == "complete":  # a re-run of a finished run: the end's evaluation as the earlier call logged it
            # (never re-run: every process must take the same branch, and only process 0 has metrics.jsonl)
            eval_res = {k: v for k, v in read_metrics(workdir, "eval").get(step, {}).items()
                        if k not in ("step", "kind")}
        elif cfg.eval.at_end and reason in ("steps", "max_minutes"):  # the run's end (steps or train.max_minutes)
            eval_res = run_eval(step)
        completed = True
    finally:
        if pbar is not None:
            pbar.close()
        if reason is not None:
            msg = stop_message(reason, step, T.steps, minutes=(time.time() - t0) / 60, max_minutes=T.max_minutes)
            (log.info if reason in ("steps", "complete") else log.warning)("%s", msg)
            writer.event(step, "stop", reason=reason, message=msg, steps_run=done_here)
        writer.close(failed=not completed)
        ckpt.close()
    return {"step": step, "metrics": last, "eval": eval_res, "skipped": skipped, "compiles": compiles,
            "trainable_params": n_train, "frozen_params": n_frozen, "graphdef": graphdef, "state": state,
            "model_config": comps.model_config, "stop_reason": reason, "steps_run": done_here}


def export_model(result: dict, out_dir: str, use_ema: bool = False) -> str:
    """Writes the trained model in the weights package's checkpoint format (model_config.json + params/), LoRA
    merged, for `tools/export_hf.py`. Returns out_dir."""
    from coordexp_jax.train.lora import merge_lora
    from coordexp_jax.weights.checkpoint import save_checkpoint

    st = result["state"]
    params = st.ema if (use_ema and st.ema is not None) else st.params
    params = jax.tree.map(lambda e, p: e.astype(p.dtype), params, st.params)
    model = nnx.merge(result["graphdef"], params, st.frozen)
    merge_lora(model)
    save_checkpoint(out_dir, model, result["model_config"])
    return out_dir


__all__ = ["train", "export_model", "read_metrics", "stop_message", "STOP_REASONS", "NonFiniteLossError",
           "MetricsWriter"]
