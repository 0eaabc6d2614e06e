"""Run in a subprocess with 8 simulated CPU devices: the GRPO old/reference log-prob forward
(`grpo_loop.make_logp_fn`) with the train step's mesh equals the single-device forward and never holds the whole
`[V, H]` output embedding on a device; without the mesh context the same sharded call gathers it."""

import json
import re

import jax
import numpy as np
from flax import nnx

from coordexp_jax.model.config import tiny_config
from coordexp_jax.model.qwen3vl import Qwen3VL
from coordexp_jax.train import grpo_loop as GL, sharding as shd
from coordexp_jax.train.config import DEFAULT_RULES


def main():
    cfg = tiny_config()
    V, H = cfg.padded_vocab_size, cfg.text.hidden_size
    graphdef, params, frozen = nnx.split(Qwen3VL(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    rng = np.random.default_rng(0)
    N, L, T = 8, 6, 4
    prompts = {"input_ids": rng.integers(1, cfg.vocab_size, (N, L)).astype(np.int32),
               "attention_mask": np.ones((N, L), np.int32),
               "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (3, N, L)).copy()}
    prompts["attention_mask"][1, :2] = 0  # a left-padded row
    lengths = np.array([4, 2, 4, 3, 1, 4, 4, 2])
    mb = GL.completion_batch(prompts, rng.integers(1, cfg.vocab_size, (N, T)), lengths, 0)
    batch = {k: v[None] for k, v in mb.items()}  # one micro-batch: [A=1, ...]
    want = np.asarray(GL.make_logp_fn(graphdef, 0.9, 2)(params, frozen, batch))
    out = {"meshes": {}}
    for shape in ((1, 8, 1), (2, 2, 2)):
        mesh = shd.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
        put = lambda state: jax.device_put(state, shd.tree_shardings(  # noqa: E731
            nnx.get_partition_spec(state), state, mesh, DEFAULT_RULES))
        p_sh, f_sh = put(params), put(frozen)
        b_sh = shd.put_batch(batch, shd.batch_shardings(batch, mesh))
        fn = GL.make_logp_fn(graphdef, 0.9, 2, mesh=mesh)
        got = np.asarray(fn(p_sh, f_sh, b_sh))
        hlo = fn.lower(p_sh, f_sh, b_sh).compile().as_text()
        plain = GL.make_logp_fn(graphdef, 0.9, 2).lower(p_sh, f_sh, b_sh).compile().as_text()
        m = mb["completion_mask"] > 0
        out["meshes"][str(shape)] = {
            "max_abs_diff": float(np.abs(got[0][m] - want[0][m]).max()),
            "scale": float(np.abs(want[0][m]).max()),
            "whole_weight_arrays": sorted(set(re.findall(rf"\w+\[{V},{H}\]", hlo))),
            "whole_weight_arrays_without_mesh": sorted(set(re.findall(rf"\w+\[{V},{H}\]", plain))),
            "whole_vocab_logits": sorted(set(re.findall(rf"\w+\[\d+,\d+,{V}\]", hlo))),
            "whole_vocab_logits_without_mesh": sorted(set(re.findall(rf"\w+\[\d+,\d+,{V}\]", plain))),
            "all_gathers": len(re.findall(r" all-gather\(", hlo)),
            "all_gathers_without_mesh": len(re.findall(r" all-gather\(", plain)),
        }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
