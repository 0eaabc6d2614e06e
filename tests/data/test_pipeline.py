"""Grain pipeline: exact resume (in process and with worker processes), fusion weights, sharding, fusion configs."""
import collections

import numpy as np
import pytest

from coordexp_jax.data import pipeline as P


class Tag:
    """Keeps the element and drops one in seven (a transform that rejects samples, like a bad image)."""

    def __call__(self, x):
        return None if x % 7 == 3 else {"v": np.asarray(x, np.int64)}


def stack(xs):
    return {"v": np.stack([x["v"] for x in xs])}


SRC = {"a": list(range(0, 60)), "b": list(range(1000, 1011))}


def _run_resume(num_workers, n=5, m=6):
    ds = P.build_dataset(SRC, {"a": 3, "b": 1}, transform=Tag(), batch_size=4, batch_fn=stack, seed=3,
                         num_workers=num_workers)
    it = P.DataIterator(ds, {})
    [next(it) for _ in range(n)]
    state = it.get_state()
    want = [next(it)["v"] for _ in range(m)]
    it2 = P.DataIterator(ds, {})
    it2.set_state(state)
    got = [next(it2)["v"] for _ in range(m)]
    if num_workers:  # each fresh iterator starts worker processes: compare with the uninterrupted run only
        return want, got, want
    fresh = P.DataIterator(ds, {})
    uninterrupted = [next(fresh)["v"] for _ in range(n + m)][n:]
    return want, got, uninterrupted


def test_resume_exact_in_process():
    want, got, unint = _run_resume(0)
    for a, b, c in zip(want, got, unint):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    flat = np.concatenate(want)
    assert not np.any(flat % 7 == 3)  # rejected samples never reach a batch


def test_resume_exact_with_worker_processes():
    want, got, unint = _run_resume(2, n=3, m=4)
    for a, b, c in zip(want, got, unint):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_mixing_weights_epochs_and_shards():
    ds = P.build_dataset({"a": list(range(100)), "b": list(range(1000, 1100))}, {"a": 3, "b": 1},
                         transform=lambda x: x, batch_size=1, batch_fn=lambda xs: xs[0], seed=0)
    it = iter(ds)
    xs = [next(it) for _ in range(400)]
    n_b = sum(x >= 1000 for x in xs)
    assert abs(n_b / 400 - 0.25) < 0.02
    a = [x for x in xs if x < 1000]
    assert sorted(a[:100]) == list(range(100))  # every record once per epoch
    assert a[:100] != a[100:200] and sorted(a[100:200]) == list(range(100))  # reshuffled each epoch
    shards = []
    for i in range(2):
        d = P.build_dataset({"a": list(range(10))}, {"a": 1}, transform=lambda x: x, batch_size=1,
                            batch_fn=lambda xs: xs[0], seed=0, shard_index=i, shard_count=2)
        it = iter(d)
        shards.append([next(it) for _ in range(5)])
    assert sorted(shards[0] + shards[1]) == list(range(10))  # disjoint shards cover an epoch


def test_fusion_config(tmp_path):
    for name in ("x", "y"):
        (tmp_path / f"{name}.jsonl").write_text(
            '{"images": ["i.png"], "width": 10, "height": 10, "objects": [{"desc": "d", "bbox_2d": [1, 1, 5, 5]}]}\n'
            '{"images": ["i.png"], "width": 10, "height": 10, "objects": [], "bogus": 1}\n')
    cfg = P.fusion_config([dict(name="x", path=str(tmp_path / "x.jsonl"), weight=2.0, check_images="none"),
                           dict(name="y", path=str(tmp_path / "y.jsonl"), task="grounding", check_images="none")])
    specs = P.specs_from_config(cfg)
    assert [(s.name, s.weight, s.task) for s in specs] == [("x", 2.0, None), ("y", 1.0, "grounding")]
    it = P.build_pipeline(cfg, transform=lambda r: r.task, batch_size=2, batch_fn=list, shard_index=0, shard_count=1)
    assert dict(it.reports["x"].counts) == {"no_objects": 1, "unknown_field": 1}
    tasks = collections.Counter(t for _ in range(30) for t in next(it))
    assert tasks["grounding"] > 0 and tasks["detection"] > tasks["grounding"]
    with pytest.raises(ValueError, match="unknown keys \\['wieght'\\]"):
        P.specs_from_config(P.fusion_config([dict(name="x", path="p", wieght=1.0)]))
    with pytest.raises(ValueError, match="duplicate"):
        P.specs_from_config(P.fusion_config([dict(name="x", path="p"), dict(name="x", path="q")]))
    with pytest.raises(FileNotFoundError, match="source 'z'"):
        P.build_pipeline([P.SourceSpec("z", str(tmp_path / "none.jsonl"))], transform=str, batch_size=1,
                         shard_index=0, shard_count=1)
