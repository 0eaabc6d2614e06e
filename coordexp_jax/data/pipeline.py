"""Grain input pipelines: per-source shuffle/repeat/shard, weighted fusion, transforms in workers, static batches.

Per source (`SourceSpec`, read and validated once with `records.read_jsonl`)::

    MapDataset.source(records).shuffle(seed + k).repeat()[shard_index::shard_count].map(transform)
        .to_iter_dataset()

then `IterDataset.mix({name: ds}, {name: weight})` (named, so a checkpoint restores component states by name),
`filter` (drops samples the transform rejected, e.g. an image that fails to decode), `batch(batch_fn=collate)` and
`mp_prefetch(num_workers)`: decoding, resizing, patchifying, tokenising and collating all run in worker processes.

Exact resume: `DataIterator.get_state()` / `set_state()` (Grain's own iterator state: the mix position and every
component's position, per worker). A resumed run yields exactly the batches an uninterrupted run would. The
training loop saves `DataIterator.iterator` as an orbax item with `grain.checkpoint.CheckpointSave/Restore`.

Fusion configs are ml_collections ConfigDicts (`fusion_config`), the JAX analogue of CoordExp's targets/sources
files::

    cfg.sources = [dict(name="coco", path="data/coco/train.jsonl", weight=3.0),
                   dict(name="refcoco", path="data/refcoco/train.jsonl", weight=1.0, task="grounding")]
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from coordexp_jax.data import records as records_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One dataset of a fusion. `weight` is its share of the mixed stream (normalised over sources)."""

    name: str
    path: str
    weight: float = 1.0
    image_root: str | None = None
    box_format: str = "pixel"
    pixel_mode: str = "continuous"
    check_images: str = "header"
    policy: Mapping[str, str] | None = None
    task: str | None = None  # override the records' task (e.g. read detection data as grounding)
    max_records: int | None = None  # use only the first N valid records

    def __post_init__(self):
        if not self.name:
            raise ValueError("SourceSpec.name must be non-empty")
        if not (self.weight > 0 and np.isfinite(self.weight)):
            raise ValueError(f"source {self.name!r}: weight must be positive, got {self.weight}")
        if self.task is not None and self.task not in records_lib.TASKS:
            raise ValueError(f"source {self.name!r}: task must be one of {records_lib.TASKS}, got {self.task!r}")


def fusion_config(sources: Sequence[Mapping[str, Any]]):
    """An ml_collections ConfigDict `{sources: [...]}` from a list of SourceSpec-like dicts."""
    import ml_collections

    return ml_collections.ConfigDict({"sources": [dict(s) for s in sources]})


def specs_from_config(cfg) -> list[SourceSpec]:
    """SourceSpecs from a fusion config (`cfg.sources`: a list of dicts, or a dict name -> dict). Unknown keys and
    duplicate names raise naming the source."""
    raw = cfg["sources"] if isinstance(cfg, Mapping) or hasattr(cfg, "__getitem__") else cfg.sources
    items = list(raw.items()) if isinstance(raw, Mapping) or hasattr(raw, "items") else [(None, s) for s in raw]
    fields = {f.name for f in dataclasses.fields(SourceSpec)}
    out = []
    for name, s in items:
        d = dict(s.to_dict() if hasattr(s, "to_dict") else s)
        if name is not None:
            d.setdefault("name", name)
        bad = sorted(set(d) - fields)
        if bad:
            raise ValueError(f"fusion source {d.get('name', name)!r}: unknown keys {bad}; known: {sorted(fields)}")
        if "path" not in d or "name" not in d:
            raise ValueError(f"fusion source {d!r}: needs 'name' and 'path'")
        out.append(SourceSpec(**d))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"fusion sources have duplicate names: {names}")
    if not out:
        raise ValueError("fusion config has no sources")
    return out


def load_source(spec: SourceSpec) -> tuple[list[records_lib.Record], records_lib.ValidationReport]:
    """Reads and validates a source (one full pass: this report is the per-epoch count of skips and changes)."""
    if not os.path.exists(spec.path):
        raise FileNotFoundError(f"source {spec.name!r}: {spec.path} not found")
    recs, rep = records_lib.read_jsonl(spec.path, image_root=spec.image_root, box_format=spec.box_format,
                                       pixel_mode=spec.pixel_mode, check_images=spec.check_images, policy=spec.policy)
    if spec.task is not None:
        recs = [dataclasses.replace(r, task=spec.task) for r in recs]
    if spec.max_records is not None:
        recs = recs[: spec.max_records]
    if not recs:
        raise ValueError(f"source {spec.name!r}: no valid records in {spec.path}\n{rep.summary()}")
    log.info("source %s: %d records\n%s", spec.name, len(recs), rep.summary())
    return recs, rep


def _ensure_absl_flags() -> None:
    """Grain's worker pool reads absl flags; outside an absl app they are unparsed (then defaults are used)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _not_none(x) -> bool:
    return x is not None


@dataclasses.dataclass
class DataIterator:
    """The training-side handle: `next(it)` gives a batch; `get_state()`/`set_state()` for exact resume.

    `iterator` is the underlying Grain `DatasetIterator` (save it with `grain.checkpoint.CheckpointSave`).
    `reports` are the per-source validation reports (one full pass over each source).
    """

    dataset: Any
    reports: dict
    iterator: Any = None

    def __post_init__(self):
        if self.iterator is None:
            self.iterator = iter(self.dataset)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.iterator)

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state) -> None:
        self.iterator.set_state(state)

    def report_summary(self) -> str:
        return "\n".join(f"[{k}] {v.summary()}" for k, v in self.reports.items())


def build_dataset(sources: Mapping[str, Sequence[Any]], weights: Mapping[str, float], *, transform: Callable,
                  batch_size: int, batch_fn: Callable | None = None, seed: int = 0, shard_index: int = 0,
                  shard_count: int = 1, num_workers: int = 0, drop_remainder: bool = True,
                  per_worker_buffer_size: int = 2, read_options: grain.ReadOptions | None = None):
    """The Grain IterDataset of batches for in-memory sources (name -> list of records).

    `transform(record) -> sample | None` (or `transform(record, rng)` when it has `needs_rng = True`) runs per element (in workers when `num_workers > 0`); None drops it.
    `batch_fn(list of samples) -> batch` pads to static shapes. Source k is shuffled with seed `seed + k` in the
    sorted order of names, so adding a source does not reshuffle the others.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    # The transforms are CPU-bound Python: a few threads suffice (Grain's default 16 threads x 500 prefetched
    # elements per source only burn CPU that the training step needs).
    read_options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)
    if set(sources) != set(weights):
        raise ValueError(f"sources {sorted(sources)} and weights {sorted(weights)} name different datasets")
    parts = {}
    for k, name in enumerate(sorted(sources)):
        recs = sources[name]
        if not len(recs):
            raise ValueError(f"source {name!r} is empty")
        ds = grain.MapDataset.source(list(recs)).shuffle(seed=(seed + k) % 2**32).repeat()
        ds = ds[shard_index::shard_count]
        # A transform with `needs_rng` (e.g. random object order) gets Grain's per-element generator, seeded by
        # the element's index in the repeated stream: deterministic, and different in every epoch.
        ds = (ds.random_map(transform, seed=(seed + 7919 * (k + 1)) % 2**32) if getattr(transform, "needs_rng", False)
              else ds.map(transform))
        parts[name] = ds.to_iter_dataset(read_options)
    total = float(sum(weights.values()))
    mixed = grain.IterDataset.mix(parts, {n: float(w) / total for n, w in weights.items()})
    ds = mixed.filter(_not_none).batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn)
    if num_workers > 0:
        _ensure_absl_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=per_worker_buffer_size))
    return ds


def build_pipeline(specs: Sequence[SourceSpec] | Any, *, transform: Callable, batch_size: int,
                   batch_fn: Callable | None = None, seed: int = 0, shard_index: int | None = None,
                   shard_count: int | None = None, num_workers: int = 0) -> DataIterator:
    """Reads the sources of a fusion config (or SourceSpecs), builds the dataset and returns a `DataIterator`.

    Shards default to this JAX process (`jax.process_index()` of `jax.process_count()`).
    """
    if not (isinstance(specs, Sequence) and all(isinstance(s, SourceSpec) for s in specs)):
        specs = specs_from_config(specs)
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    loaded = {s.name: load_source(s) for s in specs}
    ds = build_dataset({n: v[0] for n, v in loaded.items()}, {s.name: s.weight for s in specs}, transform=transform,
                       batch_size=batch_size, batch_fn=batch_fn, seed=seed, shard_index=shard_index,
                       shard_count=shard_count, num_workers=num_workers)
    return DataIterator(ds, {n: v[1] for n, v in loaded.items()})


def make_train_iterator(specs, prompt_cfg, *, batch_size: int, tokenizer=None, tokenizer_dir: str | None = None,
                        seed: int = 0, num_workers: int = 0, model_config, shard_index: int | None = None,
                        shard_count: int | None = None) -> DataIterator:
    """The training input: sources (fusion config or SourceSpecs) -> `SampleEncoder` -> `Collator` batches with
    the training-batch contract of docs/architecture.md. Pass `tokenizer_dir` (loaded once per worker) when
    `num_workers > 0`."""
    from coordexp_jax.data.prompts import Collator, SampleEncoder

    enc = SampleEncoder(prompt_cfg, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir, seed=seed)
    coll = Collator(prompt_cfg, enc.token_ids, model_config)
    return build_pipeline(specs, transform=enc, batch_size=batch_size, batch_fn=coll, seed=seed,
                          shard_index=shard_index, shard_count=shard_count, num_workers=num_workers)
