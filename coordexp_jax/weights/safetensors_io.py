"""Minimal safetensors reading/writing, one tensor at a time (bf16 via ml_dtypes; never pickle).

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, raw data.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from .names import WeightsError

_DT = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_DT_REV = {np.dtype(v): k for k, v in _DT.items()}


def read_header(path: str) -> tuple[dict, int]:
    """(tensor entries without __metadata__, byte offset of the data section)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise WeightsError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise WeightsError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: cannot read safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensor(path: str, info: dict, data_start: int, name: str = "") -> np.ndarray:
    """Reads one tensor into a fresh numpy array."""
    dt = _DT.get(info["dtype"])
    if dt is None:
        raise WeightsError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    b0, b1 = info["data_offsets"]
    shape = tuple(info["shape"])
    count = int(np.prod(shape)) if shape else 1
    if b1 - b0 != count * np.dtype(dt).itemsize:
        raise WeightsError(f"{path}: tensor {name} byte range does not match shape {shape} {info['dtype']}")
    with open(path, "rb") as f:
        f.seek(data_start + b0)
        buf = f.read(b1 - b0)
    if len(buf) != b1 - b0:
        raise WeightsError(f"{path}: tensor {name} is truncated")
    return np.frombuffer(buf, dtype=dt).reshape(shape).copy()


# Safetensors files of add-on modules written beside an HF model (not Qwen3-VL tensors): the regression heads of
# sequential counting (weights/checkpoint.py save_heads) and the spatial-linking module (save_linking).
ADDON_FILES = ("regression_heads.safetensors", "spatial_linking.safetensors")


def index_checkpoint(hf_dir: str) -> dict[str, tuple[str, dict, int]]:
    """name -> (file, header entry, data start) over `model.safetensors.index.json` or every *.safetensors file
    (add-on files, `ADDON_FILES`, excluded)."""
    if not os.path.isdir(hf_dir):
        raise WeightsError(f"{hf_dir}: not a directory")
    idx_path = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(idx_path):
        try:
            with open(idx_path) as f:
                wm = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{idx_path}: cannot read weight_map ({e})") from None
        files = sorted(set(wm.values()))
    else:
        files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors") and f not in ADDON_FILES)
        wm = None
    if not files:
        raise WeightsError(f"{hf_dir}: no *.safetensors files (only safetensors checkpoints are read)")
    out: dict[str, tuple[str, dict, int]] = {}
    for fn in files:
        path = os.path.join(hf_dir, fn)
        if not os.path.exists(path):
            raise WeightsError(f"{idx_path}: names shard {fn}, which does not exist")
        header, start = read_header(path)
        for name, info in header.items():
            if name in out:
                raise WeightsError(f"{path}: tensor {name} also appears in {out[name][0]}")
            if wm is not None and wm.get(name) != fn:
                raise WeightsError(f"{path}: tensor {name} is not mapped to this file in {idx_path}")
            out[name] = (path, info, start)
    if wm is not None:
        for name, fn in wm.items():
            if name not in out:
                raise WeightsError(f"{idx_path}: tensor {name} listed but absent from {fn}")
    return out


def write_file(path: str, tensors: list[tuple[str, tuple, np.dtype]], produce, metadata: dict | None = None) -> int:
    """Writes a safetensors file streaming one tensor at a time: `produce(name)` returns the array when needed.

    tensors: (name, shape, dtype) in file order. Returns the number of data bytes.
    """
    header = {"__metadata__": dict(metadata or {"format": "pt"})}
    off = 0
    for name, shape, dt in tensors:
        n = int(np.prod(shape)) * np.dtype(dt).itemsize
        header[name] = {"dtype": _DT_REV[np.dtype(dt)], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, dt in tensors:
            arr = np.ascontiguousarray(produce(name))
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dt):
                raise WeightsError(f"tensor {name}: produced {arr.shape} {arr.dtype}, header says {tuple(shape)} {np.dtype(dt)}")
            f.write(arr.tobytes())
    return off


def tensors_equal(a: tuple[str, dict, int], b: tuple[str, dict, int], chunk_bytes: int = 1 << 26) -> bool:
    """True when two indexed tensors (`index_checkpoint` entries) have the same shape and equal values.

    Values are compared as numbers (`==`, as `torch.equal` does: -0.0 equals 0.0, NaN equals nothing), in a common
    float64 view when the dtypes differ. Streams `chunk_bytes` at a time, so neither tensor is held whole.
    """
    (pa, ia, sa), (pb, ib, sb) = a, b
    if tuple(ia["shape"]) != tuple(ib["shape"]):
        return False
    da, db = _DT.get(ia["dtype"]), _DT.get(ib["dtype"])
    if da is None or db is None:
        raise WeightsError(f"{pa if da is None else pb}: unsupported dtype {ia['dtype'] if da is None else ib['dtype']}")
    da, db = np.dtype(da), np.dtype(db)
    n = int(np.prod(ia["shape"])) if ia["shape"] else 1
    step = max(1, chunk_bytes // max(da.itemsize, db.itemsize))
    with open(pa, "rb") as fa, open(pb, "rb") as fb:
        for i in range(0, n, step):
            k = min(step, n - i)
            chunks = []
            for f, info, start, dt in ((fa, ia, sa, da), (fb, ib, sb, db)):
                f.seek(start + info["data_offsets"][0] + i * dt.itemsize)
                buf = f.read(k * dt.itemsize)
                if len(buf) != k * dt.itemsize:
                    raise WeightsError(f"{f.name}: tensor data is truncated")
                chunks.append(np.frombuffer(buf, dtype=dt))
            x, y = chunks
            if da != db:
                x, y = x.astype(np.float64), y.astype(np.float64)
            if not np.array_equal(x, y):
                return False
    return True
