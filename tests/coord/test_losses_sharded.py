"""The vocabulary-parallel chunked head (`coord.losses.chunked_vocab_stats`, `train.grpo.token_logprobs`) on 8
simulated CPU devices equals the unsharded computation and never holds the whole `[V, H]` weight or gradient on a
device; the head matmul runs in the compute dtype with float32 accumulation."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from coordexp_jax.coord import losses as L

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from _simulated_devices import run_check  # noqa: E402


def test_vocab_parallel_equals_unsharded_without_whole_weight():
    res = run_check(os.path.join(HERE, "_vocab_parallel_check.py"))
    for shape, m in res["meshes"].items():
        # float32 log-sum-exps over 2304 ids reduced in another order (partial per device, then across devices):
        # ~1e-7 relative to the statistic's magnitude (~16 nats); gradients within ~1e-6 of their largest entry
        np.testing.assert_allclose(m["loss"], res["ref_loss"], rtol=1e-5, err_msg=shape)
        for k, d in m["stat_diff"].items():
            assert d <= 2e-6 * m["stat_scale"][k], (shape, k, d)
        assert max(m["grad_rel"]) < 1e-5, (shape, m["grad_rel"])
        # no device builds the whole [V, H] weight or gradient (in any dtype) ...
        assert m["whole_weight_arrays"] == [], (shape, m["whole_weight_arrays"])
        # nor whole-vocabulary logits: the coordinate bins' log-sum-exp is a masked one, not a slice whose gradient
        # is padded back to [B, C, V]
        assert m["whole_vocab_logits"] == [], (shape, m["whole_vocab_logits"])
    # ... which the same search does find when the head is traced without the mesh (fsdp=8 gathers the weight)
    assert res["meshes"]["(1, 8, 1)"]["whole_weight_arrays_without_mesh"], res


def test_head_matmul_in_compute_dtype_with_f32_accumulation():
    rng = np.random.default_rng(1)
    b, s, h, v = 2, 12, 32, 512
    hid = jnp.asarray(rng.normal(size=(b, s, h)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(v, h)) * 0.3, jnp.float32)
    t = jnp.asarray(rng.integers(0, v, (b, s)))

    def f(hid, emb):
        return L.chunked_vocab_stats(hid, emb, t, None, 1.0, 8, dtype=jnp.bfloat16)["logp"]

    jaxpr = jax.make_jaxpr(f)(hid, emb)
    text = str(jaxpr)
    assert "dot_general" in text and "preferred_element_type=float32" in text
    assert "bf16[" in text  # the operands are cast to the compute dtype inside the chunk
    # reference: float64 on the bfloat16-rounded operands (bf16 x bf16 products are exact in float32, so only the
    # float32 accumulation over H = 32 terms differs: ~1e-7 of the ~6 nats log-probabilities)
    rh = np.asarray(hid.astype(jnp.bfloat16), np.float64)
    rw = np.asarray(emb.astype(jnp.bfloat16), np.float64)
    z = np.einsum("bsh,vh->bsv", rh, rw)
    ref = np.take_along_axis(z, np.asarray(t)[..., None], -1)[..., 0] - np.log(np.exp(z).sum(-1))
    np.testing.assert_allclose(np.asarray(f(hid, emb)), ref, rtol=1e-5)
    # and not the float32 product: bfloat16 rounding of the operands moves the log-probs by far more than 1e-5
    assert np.max(np.abs(np.asarray(L.chunked_vocab_stats(hid, emb, t, None, 1.0, 8)["logp"]) - ref)) > 1e-3
