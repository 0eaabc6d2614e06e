"""Grain input pipelines: per-source shuffle/repeat/shard, weighted fusion, transforms in workers, static batches.

Per source (`SourceSpec`, read and validated once with `records.read_jsonl`)::

    MapDataset.source(records).shuffle(seed + k).repeat()[shard_index::shard_count].map(transform)
        .to_iter_dataset()

then `IterDataset.mix({name: ds}, {name: weight})` (named, so a checkpoint restores component states by name),
`filter` (drops samples the transform rejected, e.g. an image that fails to decode), `batch(batch_fn=collate)` and
`mp_prefetch(num_workers)`: decoding, resizing, patchifying, tokenising and collating all run in worker processes.

Errors are raised when the pipeline is built, before any training step: a wrong source or fusion key, a weight
that is not a positive number (`DataConfigError`), a missing file (`SourceNotFoundError`), a record that breaks
the contract (`records.RecordError`, per the source's validation policy), a source with no usable record. Images
the processor would refuse at this image config (aspect ratio over 200, more patches than a fixed slot, a
forbidden resize) are refused then too (`unprocessable_image`, counted skip by default). An exception that still
escapes the per-record transform in a worker is re-raised as a `RecordError` naming the record's `file:line`.

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
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from coordexp_jax.coord import codec
from coordexp_jax.data import image as image_lib
from coordexp_jax.data import records as records_lib
from coordexp_jax.errors import CoordExpError

log = logging.getLogger(__name__)

DataConfigError = records_lib.DataConfigError


class SourceNotFoundError(CoordExpError, FileNotFoundError):
    """A source's JSONL file does not exist (or is not a file); the message names the source and the path."""


def _positive_weight(w) -> bool:
    return (isinstance(w, (int, float, np.integer, np.floating)) and not isinstance(w, bool)
            and math.isfinite(float(w)) and w > 0)


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
        """Checks every key; raises `DataConfigError` naming the source and the key."""
        if not isinstance(self.name, str) or not self.name:
            raise DataConfigError(f"fusion source key 'name' must be a non-empty string, got {self.name!r}")
        where = f"fusion source {self.name!r}"
        if not isinstance(self.path, str) or not self.path:
            raise DataConfigError(f"{where}: key 'path' must be a non-empty string, got {self.path!r}")
        if not _positive_weight(self.weight):
            raise DataConfigError(f"{where}: key 'weight' must be a positive finite number (leave a source out "
                                  f"rather than weighting it 0), got {self.weight!r}")
        for key, allowed in (("box_format", records_lib.BOX_FORMATS), ("pixel_mode", codec.MODES),
                             ("check_images", records_lib.CHECK_IMAGES)):
            if getattr(self, key) not in allowed:
                raise DataConfigError(f"{where}: key {key!r} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.task is not None and self.task not in records_lib.TASKS:
            raise DataConfigError(f"{where}: key 'task' must be one of {records_lib.TASKS}, got {self.task!r}")
        if self.image_root is not None and not isinstance(self.image_root, str):
            raise DataConfigError(f"{where}: key 'image_root' must be a path or None, got {self.image_root!r}")
        if self.max_records is not None and not (isinstance(self.max_records, (int, np.integer))
                                                 and not isinstance(self.max_records, bool) and self.max_records > 0):
            raise DataConfigError(f"{where}: key 'max_records' must be a positive integer or None, "
                                  f"got {self.max_records!r}")
        if self.policy is not None and not hasattr(self.policy, "items"):
            raise DataConfigError(f"{where}: key 'policy' must map reasons to actions, got {self.policy!r}")
        try:
            records_lib._check_policy(self.policy)
        except DataConfigError as e:
            raise DataConfigError(f"{where}: key 'policy': {e}") from None


def fusion_config(sources: Sequence[Mapping[str, Any]]):
    """An ml_collections ConfigDict `{sources: [...]}` from a list of SourceSpec-like dicts."""
    import ml_collections

    return ml_collections.ConfigDict({"sources": [dict(s) for s in sources]})


def specs_from_config(cfg) -> list[SourceSpec]:
    """SourceSpecs from a fusion config (`cfg.sources`: a list of dicts, or a dict name -> dict).

    Raises `DataConfigError` naming the source and key: unknown or missing keys, a bad value (see `SourceSpec`),
    duplicate names, no sources."""
    try:
        raw = cfg["sources"] if isinstance(cfg, Mapping) or hasattr(cfg, "__getitem__") else cfg.sources
    except (KeyError, AttributeError, TypeError):
        raise DataConfigError(f"a fusion config needs a 'sources' key (a list of sources), got {cfg!r}"[:300]) from None
    if isinstance(raw, Mapping) or hasattr(raw, "items"):
        items = list(raw.items())
    elif isinstance(raw, (list, tuple)):
        items = [(None, s) for s in raw]
    else:
        raise DataConfigError(f"fusion config key 'sources' must be a list of sources, got {raw!r}"[:300])
    fields = {f.name for f in dataclasses.fields(SourceSpec)}
    out = []
    for i, (name, s) in enumerate(items):
        if not (isinstance(s, Mapping) or hasattr(s, "to_dict")):
            raise DataConfigError(f"fusion config 'sources[{name if name is not None else i}]' must be a dict of "
                                  f"source keys, got {s!r}"[:300])
        d = dict(s.to_dict() if hasattr(s, "to_dict") else s)
        if name is not None:
            d.setdefault("name", name)
        label = repr(d["name"]) if "name" in d else f"sources[{i}]"
        bad = sorted(set(d) - fields, key=str)
        if bad:
            raise DataConfigError(f"fusion source {label}: unknown keys {bad}; known: {sorted(fields)}")
        missing = [k for k in ("name", "path") if k not in d]
        if missing:
            raise DataConfigError(f"fusion source {label}: missing key(s) {missing}")
        out.append(SourceSpec(**d))
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataConfigError(f"fusion sources have duplicate names {dup}")
    if not out:
        raise DataConfigError("fusion config key 'sources' is empty")
    return out


def load_source(spec: SourceSpec, record_check: Callable[[records_lib.Record], str | None] | None = None
                ) -> tuple[list[records_lib.Record], records_lib.ValidationReport]:
    """Reads and validates a source (one full pass: this report is the per-epoch count of skips and changes).

    `record_check(record)` returns why the processor would refuse the record's image at this config (or None); such
    records are handled by the source's `unprocessable_image` policy (counted skip, or `RecordError`).
    Raises `SourceNotFoundError` (no file), `records.RecordError` (a record whose policy is `error`) or
    `DataConfigError` (not UTF-8 text; no usable record: empty, or every record skipped), each on one line.
    """
    if not os.path.isfile(spec.path):
        raise SourceNotFoundError(f"fusion source {spec.name!r}: key 'path': {spec.path} "
                                  + ("is a directory, not a JSONL file" if os.path.isdir(spec.path) else "not found"))
    rep = records_lib.ValidationReport()
    try:  # iter_jsonl, not read_jsonl: the report is logged once, below, with the processor's skips in it
        recs = list(records_lib.iter_jsonl(spec.path, image_root=spec.image_root, box_format=spec.box_format,
                                           pixel_mode=spec.pixel_mode, check_images=spec.check_images,
                                           policy=spec.policy, report=rep))
    except UnicodeDecodeError as e:
        raise DataConfigError(f"fusion source {spec.name!r}: {spec.path} is not UTF-8 JSONL text ({e.reason} at "
                              f"byte {e.start})") from None
    if spec.task is not None:
        recs = [dataclasses.replace(r, task=spec.task) for r in recs]
    if record_check is not None:
        recs = _apply_record_check(recs, record_check, rep, records_lib._check_policy(spec.policy))
    if spec.max_records is not None:
        recs = recs[: spec.max_records]
    if not recs:
        what = "the file has no records" if rep.records_read == 0 else f"every record was skipped: {rep.one_line()}"
        raise DataConfigError(f"fusion source {spec.name!r}: no usable record in {spec.path} ({what})")
    # a skipped record is a warning (shown by every command, evaluate's WARNING-level log included), else info
    (log.warning if len(recs) < rep.records_read else log.info)(
        "source %s (%s): %d records\n%s", spec.name, spec.path, len(recs), rep.summary())
    return recs, rep


def _apply_record_check(recs, check, report: records_lib.ValidationReport, policy: Mapping[str, str]) -> list:
    kept = []
    for r in recs:
        problem = check(r)
        if problem is None:
            kept.append(r)
            continue
        if policy["unprocessable_image"] == "error":
            raise records_lib.RecordError(r.source, "unprocessable_image", f"{r.image}: {problem}")
        report.add("unprocessable_image", r.source, f"{r.image}: {problem}")
        report.records_kept -= 1
    return kept


def image_check(image_cfg: image_lib.ImageConfig, patches_per_slot: int | None = None):
    """`record -> problem or None`: what the processor refuses at this image config (`image.processing_problem`)."""
    def check(r: records_lib.Record) -> str | None:
        return image_lib.processing_problem(r.height, r.width, image_cfg, patches_per_slot)
    return check


def _ensure_absl_flags() -> None:
    """Grain's worker pool reads absl flags; outside an absl app they are unparsed (then defaults are used)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _not_none(x) -> bool:
    return x is not None


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class NamedTransform:
    """Wraps a per-record transform so that an exception raised in it (in a worker process too: Grain re-raises it
    in the main process) names the record: a `CoordExpError` whose message already holds the record's `source`
    (`file:line`) passes unchanged, anything else becomes `records.RecordError(source, "sample_failed", ...)`
    carrying the original type and message. Keeps the transform's `needs_rng`."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.needs_rng = bool(getattr(fn, "needs_rng", False))

    def __call__(self, record, rng=None):
        try:
            return self.fn(record, rng) if self.needs_rng else self.fn(record)
        except Exception as e:
            where = getattr(record, "source", None) or _one_line(f"record {record!r}", 200)
            if isinstance(e, CoordExpError) and where in str(e):
                raise
            raise records_lib.RecordError(where, "sample_failed", _one_line(f"{type(e).__name__}: {e}")) from e


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

    `transform(record) -> sample | None` (or `transform(record, rng)` when it has `needs_rng = True`) runs per
    element (in workers when `num_workers > 0`); None drops it; an exception names the record (`NamedTransform`).
    `batch_fn(list of samples) -> batch` pads to static shapes. Source k is shuffled with seed `seed + k` in the
    sorted order of names, so adding a source does not reshuffle the others. `weights` are relative (normalised
    over sources), each a positive finite number; a bad weight, an empty source or sources and weights that name
    different datasets raise `DataConfigError` naming the source.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if set(sources) != set(weights):
        raise DataConfigError(f"sources {sorted(sources)} and weights {sorted(weights)} name different datasets")
    if not sources:
        raise DataConfigError("no sources to read")
    for name in sorted(sources):
        if not _positive_weight(weights[name]):
            raise DataConfigError(f"fusion source {name!r}: key 'weight' must be a positive finite number, got "
                                  f"{weights[name]!r}")
        if not len(sources[name]):
            raise DataConfigError(f"fusion source {name!r} is empty")
    if not isinstance(transform, NamedTransform):
        transform = NamedTransform(transform)
    # The transforms are CPU-bound Python: a few threads suffice (Grain's default 16 threads x 500 prefetched
    # elements per source only burn CPU that the training step needs).
    read_options = read_options or grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)
    parts = {}
    for k, name in enumerate(sorted(sources)):
        recs = sources[name]
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
                   shard_count: int | None = None, num_workers: int = 0,
                   record_check: Callable | None = None) -> DataIterator:
    """Reads the sources of a fusion config (or SourceSpecs), builds the dataset and returns a `DataIterator`.

    Shards default to this JAX process (`jax.process_index()` of `jax.process_count()`). `record_check`: see
    `load_source`. Every data error is raised here, before the first batch (see the module docstring).
    """
    if not (isinstance(specs, Sequence) and all(isinstance(s, SourceSpec) for s in specs)):
        specs = specs_from_config(specs)
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    loaded = {s.name: load_source(s, record_check) for s in specs}
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
                          shard_index=shard_index, shard_count=shard_count, num_workers=num_workers,
                          record_check=image_check(prompt_cfg.image, prompt_cfg.patches_per_slot))
