"""The rollout's decode loop writes the KV cache in place: the compiled while loop of `Sampler` holds no copy,
transpose or fresh rewrite of a cache-sized array (loop and scanned layers, batch 1 and 2). With scanned layers
the one exception is the read of layer i's slice of the stacked cache inside the layer scan (a dynamic-slice,
which XLA:CPU materialises for the attention matmul): one layer's cache per layer and step, never the stack.

Each such array would be a read and a write of a whole layer's cache per step, which at long contexts costs as
much as the weights (BENCHMARKS.md, decode at batch 1). The property is read from XLA's optimized HLO."""

import os
import re
import sys

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "model"))
from _prompts import make_batch  # noqa: E402  (the model tests' prompt builder)

from coordexp_jax.data.tokenizer import TokenIds  # noqa: E402
from coordexp_jax.model.config import tiny_config  # noqa: E402
from coordexp_jax.model.inputs import build_model_inputs  # noqa: E402
from coordexp_jax.model.qwen3vl import Qwen3VL  # noqa: E402
from coordexp_jax.rollout.sampler import Sampler, SamplerConfig, bucket_inputs  # noqa: E402

INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = f32\[([0-9,]*)\]\{[0-9,]*\} (\w[\w-]*)\(")


def _cache_sized_writes(hlo: str, numel: int, allow_slice: bool = False) -> list[str]:
    """Instructions of the module that produce a float32 array of `numel` elements by copying or by a fusion
    that is not an in-place dynamic-update-slice (nor, with `allow_slice`, a dynamic-slice)."""
    out = []
    for line in hlo.splitlines():
        m = INSTR.match(line)
        if not m or not m.group(2):
            continue
        name, dims, op = m.groups()
        if int(np.prod([int(d) for d in dims.split(",")])) != numel:
            continue
        fused_ok = "dynamic-update-slice" in name or (allow_slice and name.startswith("dynamic-slice"))
        if op == "copy" or op == "transpose" or (op == "fusion" and not fused_ok):
            out.append(line.strip()[:160])
    return out


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_decode_loop_updates_the_cache_in_place(scan, batch):
    cfg = tiny_config().replace(scan_layers=scan)
    model = Qwen3VL(cfg, rngs=nnx.Rngs(0))
    ids, mask, items = make_batch(cfg, np.random.default_rng(0), [[4, ("img", (1, 4, 6)), 3]] * batch)
    inp = build_model_inputs(ids, mask, config=cfg, **items)
    tid = TokenIds(vocab_size=cfg.vocab_size, endoftext=0, im_start=1, im_end=-1,
                   vision_start=cfg.vision_start_token_id, vision_end=cfg.vision_end_token_id,
                   image_pad=cfg.image_token_id, video_pad=cfg.video_token_id, coord_wildcard=399, coord_start=400,
                   num_bins=500)
    s = Sampler(model, tid, SamplerConfig(max_new_tokens=8))
    dev = jax.tree.map(jax.numpy.asarray, bucket_inputs(inp, pad_id=tid.pad)[0])
    carry = s._prefill(s.state, dev, jax.random.key(0))
    k = carry["cache"]["k"]
    layer_cache = k[0] if isinstance(k, list) else k[0]          # one layer's [B, nkv, L, hd]
    hlo = s._decode.lower(s.state, carry).compile().as_text()
    assert "while" in hlo
    bad = _cache_sized_writes(hlo, int(np.prod(layer_cache.shape)), allow_slice=scan)
    if scan:
        bad += _cache_sized_writes(hlo, int(np.prod(k.shape)))
    assert not bad, "\n".join(bad)
