"""Orbax checkpoints of training in `workdir/checkpoints`: items {state, data_iter, meta}, async, keep-N, resume.

- `state`: the TrainState pytree (params, frozen, opt_state, step, rng, ema, skipped), restored into abstract arrays
  that carry the *target* shardings (jax_lessons.md: nnx.eval_shape drops shardings, flax #5110; a different device
  count needs new shardings, orbax #648).
- `data_iter`: the Grain iterator state, one file per process (`grain.checkpoint.CheckpointHandler`).
- `meta`: JSON fingerprint of what makes a checkpoint compatible (model config, LoRA, vocabulary, the trainable
  parameter set, and the data loader's worker count). Resuming in a workdir whose checkpoint differs raises
  `IncompatibleCheckpointError` naming the differing keys or parameters instead of an orbax shape error deep in a
  restore. The Grain iterator state of one `data.worker_count` does not restore into another (its per-worker
  positions would be an IndexError/KeyError inside Grain), so a different count is refused naming both counts;
  a restore without the data iterator (exporting a model) ignores it.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from coordexp_jax.errors import CoordExpError

log = logging.getLogger(__name__)


class IncompatibleCheckpointError(CoordExpError, RuntimeError):
    """The workdir holds a checkpoint of a different model/config; the message names what differs."""


class MissingCheckpointError(CoordExpError, FileNotFoundError):
    """The checkpoint step asked for is not in the workdir; the message lists the steps that are."""


class _StateAdapter:
    """Gives any iterator with JSON-able `get_state()`/`set_state()` the interface Grain's handler expects."""

    def __init__(self, it):
        self.it = it

    def get_state(self) -> bytes:
        return json.dumps(self.it.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.it.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:
        pass


def _grain_item(data_iter):
    inner = getattr(data_iter, "iterator", data_iter)
    if isinstance(inner, grain.DatasetIterator):
        return inner
    return _StateAdapter(data_iter)


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple, str]]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        out[name] = (tuple(leaf.shape), str(leaf.dtype))
    return out


def _diff_meta(saved: dict, current: dict, prefix: str = "") -> list[str]:
    diffs = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _diff_meta(a, b, f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix}{k}: checkpoint {a!r}, this run {b!r}")
    return diffs


class Checkpointer:
    """A CheckpointManager over `workdir/checkpoints` for TrainStates and data iterators.

    Args:
      workdir: the run directory.
      meta: JSON-able fingerprint of this run (model config, lora, vocab, ...), compared on restore.
      keep_n: checkpoints kept.
      async_save: write in a background thread (the step loop goes on while arrays are written).
    """

    def __init__(self, workdir: str, meta: dict, keep_n: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.meta = json.loads(json.dumps(meta))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep_n, enable_async_checkpointing=async_save,
                                                 create=True),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data_iter": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any | None = None, force: bool = False) -> bool:
        """Starts saving (async); the data iterator state is captured now, at the same batch boundary as `state`."""
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(self.meta)}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointSave(_grain_item(data_iter))
        return self.manager.save(int(step), args=ocp.args.Composite(**args), force=force)

    def check_compatible(self, step: int, abstract_state: Any, data_iter: bool = True) -> None:
        """Raises IncompatibleCheckpointError naming what differs between checkpoint `step` and this run.
        `data_iter`: the data iterator is restored too (then its worker count must match)."""
        try:
            saved_meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001
            raise IncompatibleCheckpointError(
                f"{self.directory}/{step}: cannot read the checkpoint's metadata ({type(e).__name__}: {e}); "
                "it was not written by this trainer - use a fresh --workdir") from e
        saved_meta, current = dict(saved_meta), dict(self.meta)
        saved_it, this_it = saved_meta.pop("data_iter", None), current.pop("data_iter", None)
        if data_iter and saved_it is not None and this_it is not None:  # (checkpoints of older code have none)
            a, b = saved_it.get("worker_count"), this_it.get("worker_count")
            if a != b:
                raise IncompatibleCheckpointError(
                    f"the checkpoint in {self.directory} (step {step}) holds the data iterator state of "
                    f"data.worker_count={a}, but this run has data.worker_count={b}; Grain cannot restore one into "
                    f"the other: resume with --config.data.worker_count={a}, or use a fresh --workdir")
        diffs = _diff_meta(saved_meta, current)
        if not diffs:
            saved = self.manager.item_metadata(step)["state"]
            if saved is not None:
                have = _flat_shapes(saved)
                want = _flat_shapes(abstract_state)
                missing = sorted(set(want) - set(have))
                extra = sorted(set(have) - set(want))
                shape = [f"{k}: checkpoint {have[k][0]}, this run {want[k][0]}" for k in sorted(set(have) & set(want))
                         if have[k][0] != want[k][0]]
                diffs = ([f"missing in checkpoint: {k}" for k in missing[:5]]
                         + [f"not in this run: {k}" for k in extra[:5]] + shape[:5])
        if diffs:
            raise IncompatibleCheckpointError(
                f"the checkpoint in {self.directory} (step {step}) does not match this run:\n  "
                + "\n  ".join(diffs[:12])
                + "\nUse a fresh --workdir, or the original config, to resume.")

    def restore(self, abstract_state: Any, data_iter: Any | None = None, step: int | None = None) -> tuple[Any, int] | None:
        """Restores checkpoint `step` (default: the latest) into `abstract_state` (ShapeDtypeStructs with the target
        shardings) and `data_iter` (in place). Returns (state, step), or None when the workdir has no checkpoint."""
        if step is not None and step not in self.manager.all_steps():
            raise MissingCheckpointError(f"{self.directory}: no checkpoint of step {step} (steps: "
                                         f"{sorted(self.manager.all_steps()) or 'none'})")
        step = self.manager.latest_step() if step is None else step
        if step is None:
            return None
        self.check_compatible(step, abstract_state, data_iter=data_iter is not None)
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data_iter"] = grain.checkpoint.CheckpointRestore(_grain_item(data_iter))
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        log.info("restored checkpoint step %d from %s", step, self.directory)
        return restored["state"], step

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def fingerprint(cfg, vocab_size: int, trainable_names: list[str]) -> dict:
    """The fields of a run that a checkpoint must share to be resumed (not lr, steps, logging, ...). `data_iter`
    (the loader's worker count) matters only when the data iterator is restored too."""
    c = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    model = dict(c["model"])
    model.pop("remat", None)  # recomputation does not change the parameters
    model.pop("attention", None)  # nor does the attention implementation
    model.pop("dtype", None)
    out = {
        "model": json.loads(json.dumps(model)),
        "lora": json.loads(json.dumps(c["lora"])),
        "vocab_size": int(vocab_size),
        "trainable": {"count": len(trainable_names), "hash": _hash(trainable_names)},
        "data_iter": {"worker_count": int(c.get("data", {}).get("worker_count", 0))},
    }
    kind = c.get("train", {}).get("kind", "sft")
    if kind != "sft":  # a GRPO state counts updates, not steps: never resumed as an SFT run (nor the reverse)
        out["train_kind"] = kind
    return out


def _hash(names: list[str]) -> str:
    import hashlib

    return hashlib.sha1("\n".join(sorted(names)).encode()).hexdigest()[:16]


__all__ = ["Checkpointer", "IncompatibleCheckpointError", "MissingCheckpointError", "fingerprint"]
