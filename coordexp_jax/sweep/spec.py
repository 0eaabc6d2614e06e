"""What a sweep is: the list of runs (each a dict of config overrides) expanded from a config file's `get_sweep()`
and/or `--sweep key=v1,v2` flags, and each run's name.

Forms `get_sweep()` may return (keys are dotted config keys, as in `--config.optim.lr`; a leading 'config.' is
dropped):
- a list of override dicts: one run per dict, as given;
- a grid, a dict `{key: [values]}`: the Cartesian product in key order (the first key varies slowest, as
  `itertools.product`); a value that is not a list is the same in every run (a tuple is one value, for tuple keys);
- `{"grid": {...}, "random": {"num": N, "seed": S, "space": {key: dist}}}` (either part optional): N random
  samples, each combined with every grid point. `dist` is a list (uniform choice), `("uniform", lo, hi)`,
  `("loguniform", lo, hi)` (log-uniform, lo > 0) or `("int", lo, hi)` (uniform integer, both ends included); the
  samples are drawn with `numpy.random.default_rng(S)`, sample by sample, keys in the order given.
`--sweep key=v1,v2,...` flags add grid axes (strings, parsed by the training CLI as `--config.key=v` is); an axis
the config's grid also has is replaced by the flag's values.

Run names: `short_key=value` pairs joined by ',' (`lr=0.01,sigma=0.5`), each key shortened to its shortest dotted
suffix that is unique among the sweep's keys; a run without overrides is 'base'; repeated names get '-2', '-3'.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from coordexp_jax.errors import CoordExpError

RESERVED = ("grid", "random")
DISTRIBUTIONS = ("uniform", "loguniform", "int")
MAX_NAME = 120  # characters of a run's directory name before it is shortened with a hash


class SweepError(CoordExpError, ValueError):
    """A sweep definition that cannot be expanded (a bad entry, distribution or flag); the message names it."""


def _key(k: Any, where: str) -> str:
    if not isinstance(k, str) or not k.strip():
        raise SweepError(f"{where}: sweep key {k!r} is not a dotted config key (e.g. 'optim.lr')")
    k = k.strip()
    return k[len("config."):] if k.startswith("config.") else k


def grid(space: Mapping[str, Any], where: str = "get_sweep()") -> list[dict]:
    """The Cartesian product of `space`'s list values (first key slowest); non-list values are fixed.

    Raises SweepError naming the key with an empty list of values.
    """
    keys = [_key(k, where) for k in space]
    axes = []
    for k, v in zip(keys, space.values()):
        vals = list(v) if isinstance(v, list) else [v]
        if not vals:
            raise SweepError(f"{where}: sweep key '{k}' has an empty list of values")
        axes.append(vals)
    return [dict(zip(keys, combo)) for combo in itertools.product(*axes)]


def _sample(rng: np.random.Generator, key: str, dist: Any, where: str) -> Any:
    if isinstance(dist, list):
        if not dist:
            raise SweepError(f"{where}: random space key '{key}' has an empty list of values")
        return dist[int(rng.integers(len(dist)))]
    if not (isinstance(dist, tuple) and len(dist) == 3 and dist[0] in DISTRIBUTIONS):
        raise SweepError(f"{where}: random space key '{key}' = {dist!r}: must be a list of values or "
                         f"(kind, lo, hi) with kind one of {DISTRIBUTIONS}")
    kind, lo, hi = dist
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (lo, hi)) or not lo < hi:
        raise SweepError(f"{where}: random space key '{key}' = {dist!r}: needs numbers lo < hi")
    if kind == "uniform":
        return float(rng.uniform(lo, hi))
    if kind == "loguniform":
        if lo <= 0:
            raise SweepError(f"{where}: random space key '{key}' = {dist!r}: loguniform needs lo > 0")
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    if not (float(lo).is_integer() and float(hi).is_integer()):
        raise SweepError(f"{where}: random space key '{key}' = {dist!r}: int needs integer bounds")
    return int(rng.integers(int(lo), int(hi) + 1))


def random_search(num: int, seed: int, space: Mapping[str, Any], where: str = "get_sweep()") -> list[dict]:
    """`num` dicts of values drawn from `space` (see the module docstring) with `numpy.random.default_rng(seed)`,
    sample by sample, keys in the order given (floats are Python floats, ints Python ints).

    Raises SweepError naming the key with an unknown distribution or bad bounds, or a bad `num`.
    """
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise SweepError(f"{where}: random 'num' = {num!r}: must be an integer >= 1")
    rng = np.random.default_rng(seed)
    keys = [_key(k, where) for k in space]
    return [{k: _sample(rng, k, d, where) for k, d in zip(keys, space.values())} for _ in range(num)]


def _is_compound(spec: Mapping) -> bool:
    return any(k in RESERVED for k in spec)


def expand(spec: Any, cli_axes: Mapping[str, list] | None = None, where: str = "get_sweep()") -> list[dict]:
    """The runs (override dicts) of a `get_sweep()` result `spec` (None: no sweep in the config) crossed with the
    `--sweep` grid `cli_axes` ({key: [values]}). A key of `cli_axes` replaces the same axis of a grid; in a list
    or random sweep it is an error.

    Raises SweepError naming the entry or key that is malformed or set twice.
    """
    cli_axes = {_key(k, "--sweep"): list(v) for k, v in (cli_axes or {}).items()}
    if spec is None:
        if not cli_axes:
            raise SweepError("no sweep: the config file defines no get_sweep() and no --sweep key=v1,v2 was given")
        return grid(cli_axes, "--sweep")
    if isinstance(spec, (list, tuple)):
        runs = []
        for i, entry in enumerate(spec):
            if not isinstance(entry, Mapping):
                raise SweepError(f"{where}: entry {i} is a {type(entry).__name__}, not a dict of overrides")
            runs.append({_key(k, f"{where} entry {i}"): v for k, v in entry.items()})
        if not runs:
            raise SweepError(f"{where}: the list of runs is empty")
        return _cross(runs, cli_axes, where, replace=False)
    if not isinstance(spec, Mapping):
        raise SweepError(f"{where} returned a {type(spec).__name__}: expected a list of override dicts, a grid dict "
                         "{key: [values]} or {'grid': ..., 'random': ...}")
    if not _is_compound(spec):
        return grid(_replace_axes(spec, cli_axes, where), where)
    extra = [k for k in spec if k not in RESERVED]
    if extra:
        raise SweepError(f"{where}: keys {extra} next to 'grid'/'random' (put grid axes under 'grid')")
    g = spec.get("grid") or {}
    if not isinstance(g, Mapping):
        raise SweepError(f"{where}: 'grid' must be a dict {{key: [values]}}")
    runs = grid(_replace_axes(g, cli_axes, where), where) if g or cli_axes else [{}]
    r = spec.get("random")
    if r is not None:
        if not isinstance(r, Mapping) or not isinstance(r.get("space"), Mapping):
            raise SweepError(f"{where}: 'random' must be {{'num': N, 'seed': S, 'space': {{key: dist}}}}")
        unknown = sorted(set(r) - {"num", "seed", "space"})
        if unknown:
            raise SweepError(f"{where}: unknown 'random' field(s) {unknown} (fields: num, seed, space)")
        samples = random_search(r.get("num", 0), int(r.get("seed", 0)), r["space"], where)
        both = sorted(set(samples[0]) & (set(runs[0]) | set(cli_axes)))
        if both:
            raise SweepError(f"{where}: sweep key '{both[0]}' is both in the random space and in the grid/--sweep")
        runs = [dict(gr, **s) for gr in runs for s in samples]
    return runs


def _replace_axes(space: Mapping, cli_axes: Mapping[str, list], where: str) -> dict:
    out = {_key(k, where): v for k, v in space.items()}
    out.update(cli_axes)
    return out


def _cross(runs: list[dict], cli_axes: Mapping[str, list], where: str, replace: bool) -> list[dict]:
    if not cli_axes:
        return runs
    both = sorted({k for r in runs for k in r} & set(cli_axes))
    if both and not replace:
        raise SweepError(f"sweep key '{both[0]}' is set by both {where} (a list of runs) and --sweep")
    return [dict(r, **c) for r in runs for c in grid(cli_axes, "--sweep")]


def parse_sweep_flag(text: str) -> tuple[str, list[str]]:
    """'optim.lr=1e-3,3e-3' -> ('optim.lr', ['1e-3', '3e-3']). Raises SweepError for a flag without '=' or values."""
    key, eq, vals = str(text).partition("=")
    values = [v.strip() for v in vals.split(",")] if eq else []
    if not eq or not key.strip() or not values or any(v == "" for v in values):
        raise SweepError(f"--sweep {text!r}: expected key=v1,v2,... (e.g. --sweep optim.lr=1e-3,3e-3)")
    return _key(key, "--sweep"), values


def flag_value(v: Any) -> str:
    """The text of `--config.key=<text>` for a sweep value: the training CLI (ml_collections) parses it back to `v`
    (floats by repr, bools True/False, tuples/lists/dicts by repr for ast.literal_eval; strings as they are)."""
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, int)) or v is None:
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return flag_value(v.item())
    return repr(v)


def short_keys(keys: Sequence[str]) -> dict[str, str]:
    """Each dotted key -> its shortest dotted suffix not shared with another key ('optim.lr' -> 'lr')."""
    keys = list(dict.fromkeys(keys))
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != k and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out[k] = suffix
    return out


def format_value(v: Any) -> str:
    """A value as it appears in a run name: floats with 6 significant digits ('0.0003', '3e-05'), sequences
    joined by '-'."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "-".join(format_value(x) for x in v)
    return str(v)


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,\-]")


def run_names(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """A directory name per run (see the module docstring): unique, filesystem-safe, stable for the same runs."""
    short = short_keys([k for r in runs for k in r])
    names, seen = [], {}
    for r in runs:
        name = ",".join(f"{short[k]}={format_value(v)}" for k, v in r.items()) or "base"
        name = _UNSAFE.sub("_", name).lstrip(".")
        if len(name) > MAX_NAME:
            name = name[: MAX_NAME - 9] + "~" + hashlib.sha1(name.encode()).hexdigest()[:8]
        n = seen.get(name, 0) + 1
        seen[name] = n
        names.append(name if n == 1 else f"{name}-{n}")
    return names


__all__ = ["SweepError", "grid", "random_search", "expand", "parse_sweep_flag", "flag_value", "short_keys",
           "format_value", "run_names"]
