"""Run in a subprocess with 8 simulated CPU devices: `chunked_vocab_stats` and `train.grpo.token_logprobs` (values and
gradients) under (data, fsdp, tensor) meshes against the same functions without a mesh, and the compiled HLO of
the sharded gradient searched for a whole `[V, H]` array and for whole-vocabulary `[B, C, V]` logits. Prints one JSON line after 'RESULT '."""

import json
import re

import jax

jax.config.update("jax_default_matmul_precision", "highest")
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from coordexp_jax.coord import losses as L  # noqa: E402
from coordexp_jax.train.grpo import token_logprobs  # noqa: E402

B, S, H, V, REAL_V, CS = 8, 40, 48, 2304, 2300, 1200  # V = 9 * 256 (divisible by 8), padded rows >= REAL_V


def fn(hid, emb, t, w):
    """A scalar of every statistic (weighted so that each gradient path is exercised) and the statistics."""
    st = L.chunked_vocab_stats(hid, emb, t, CS, 0.7, 16, REAL_V)
    lp, ent = token_logprobs(hid, emb, t, 16, vocab_size=REAL_V, temperature=0.9, return_entropy=True)
    st = {**st, "tlp": lp, "ent": ent}
    return sum(jnp.sum(w[i] * v) for i, v in enumerate(st.values())), st


def main():
    rng = np.random.default_rng(0)
    hid = jnp.asarray(rng.normal(size=(B, S, H)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(V, H)) * 0.3, jnp.float32)
    t = jnp.asarray(rng.integers(0, REAL_V, (B, S)), jnp.int32)
    w = jnp.asarray(rng.normal(size=(6, B, S)), jnp.float32)
    grad = jax.value_and_grad(fn, (0, 1), has_aux=True)
    (l1, st1), g1 = jax.jit(grad)(hid, emb, t, w)
    out = {"ref_loss": float(l1), "meshes": {}}
    for shape in ((1, 8, 1), (2, 2, 2)):
        mesh = Mesh(np.asarray(jax.devices()).reshape(shape), ("data", "fsdp", "tensor"))
        emb_sh = NamedSharding(mesh, P("tensor", "fsdp"))  # the parameter's own sharding (vocab, embed rules)
        row_sh = NamedSharding(mesh, P(("data", "fsdp")))

        def under_mesh(*a):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return grad(*a)

        f = jax.jit(under_mesh, out_shardings=((None, None), (row_sh, emb_sh)))
        args = (jax.device_put(hid, row_sh), jax.device_put(emb, emb_sh), jax.device_put(t, row_sh),
                jax.device_put(w, NamedSharding(mesh, P(None, ("data", "fsdp")))))
        (l8, st8), g8 = f(*args)
        hlo = f.lower(*args).compile().as_text()
        whole = sorted(set(re.findall(rf"\w+\[{V},{H}\]", hlo)))
        # the same computation without the mesh context: GSPMD gathers the weight (the old behaviour)
        plain = "" if shape != (1, 8, 1) else jax.jit(
            grad, out_shardings=((None, None), (row_sh, emb_sh))).lower(*args).compile().as_text()
        out["meshes"][str(shape)] = {
            "loss": float(l8),
            "stat_diff": {k: float(np.max(np.abs(np.asarray(st8[k]) - np.asarray(st1[k])))) for k in st1},
            "stat_scale": {k: float(np.max(np.abs(np.asarray(st1[k])))) for k in st1},
            "grad_rel": [float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(a))))
                         for a, b in zip(g1, g8)],
            "whole_weight_arrays": whole,
            # [B, C, V] logits (or their gradient) over the whole vocabulary on one device
            "whole_vocab_logits": sorted(set(re.findall(rf"\w+\[\d+,\d+,{V}\]", hlo))),
            "whole_weight_arrays_without_mesh": sorted(set(re.findall(rf"\w+\[{V},{H}\]", plain))),
        }
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
