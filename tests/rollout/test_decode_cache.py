"""What the rollout's compiled decode loop (`Sampler`'s while loop) copies per generated token, read from XLA's
optimized HLO:
- per-layer layout, batch 1 and 2: nothing of the KV cache's size (no copy, transpose or fresh rewrite: the cache
  is written in place);
- scanned layers: no layer weights (the stacked layers are sliced once, outside the loop:
  `model.scan.unstack_module`). The attention still reads layer i's slice of the stacked cache through a
  materialised slice (one layer's cache per layer and step); that is not asserted here.

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


def _cache_sized_writes(hlo: str, numel: int) -> list[str]:
    """Instructions of the module that produce a float32 array of `numel` elements by copying or by a fusion
    that is not an in-place dynamic-update-slice."""
    out = []
    for line in hlo.splitlines():
        m = INSTR.match(line)
        if not m or not m.group(2):
            continue
        name, dims, op = m.groups()
        if int(np.prod([int(d) for d in dims.split(",")])) != numel:
            continue
        # a fusion rooted at the in-place update is named after it ("copy_dynamic-update-slice_fusion" when it
        # also transposes the few new values); an update that is not in place shows as a copy of the cache
        if op == "copy" or op == "transpose" or (op == "fusion" and "dynamic-update-slice" not in name):
            out.append(line.strip()[:160])
    return out


def _sampler_hlo(scan: bool, batch: int):
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
    return cfg, carry, s._decode.lower(s.state, carry).compile().as_text()


def _while_body(hlo: str) -> str:
    """The text of the decode while loop's body computation."""
    name = re.search(r"while\(.*body=%([\w.\-]+)", hlo).group(1)
    start = hlo.index(f"%{name} (")
    return hlo[start:hlo.index("\n}", start)]


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_loop_updates_the_cache_in_place(batch):
    _, carry, hlo = _sampler_hlo(False, batch)
    layer_cache = carry["cache"]["k"][0]                                          # one layer's [B, nkv, L, hd]
    bad = _cache_sized_writes(_while_body(hlo), int(np.prod(layer_cache.shape)))
    assert not bad, "\n".join(bad)


def test_scanned_decode_loop_does_not_slice_the_weights_per_step():
    cfg, _, hlo = _sampler_hlo(True, 1)
    t = cfg.text
    sizes = {t.hidden_size * t.intermediate_size: "mlp kernel", t.hidden_size * t.num_attention_heads * t.head_dim:
             "q/o kernel"}
    body = _while_body(hlo)
    for numel, what in sizes.items():
        bad = [x for x in _cache_sized_writes(body, numel)]
        bad += [line.strip()[:160] for line in body.splitlines()
                if (m := INSTR.match(line)) and m.group(3) in ("slice", "dynamic-slice") and m.group(2)
                and int(np.prod([int(d) for d in m.group(2).split(",")])) == numel]
        assert not bad, (what, bad)
