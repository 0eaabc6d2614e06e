"""The memory-efficient attention implementations (ModelConfig.attention) equal the dense reference.

"blockwise" runs everywhere and is compared on every row, fully masked left-pad rows included (it reproduces the
dense softmax there too). "cudnn" runs its mask plumbing (row rotation, sequence lengths, segment mask) through
`jax.nn.dot_product_attention(implementation="xla")` on CPU, and "splash" runs the Pallas TPU kernel in interpret
mode; both leave padded query rows undefined (zero / padding-only attention: never used by the model), so they
are compared on real rows, with gradients taken under a cotangent that is zero on padded rows (as the masked loss
gives). The real cuDNN / TPU kernels are compiled and run only when such a backend is present.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coordexp_jax.model.attention import (AttentionConfigError, AttentionMask, attention, blockwise_attention,
                                          cudnn_attention, gqa_attention, splash_attention)
from coordexp_jax.model.config import ConfigError, ModelConfig

S = 11


def _qkv(B, nh, nkv, hd=8, dtype=jnp.float32, seed=0, S=S):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, S, nh, hd)).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, nkv, hd)).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, nkv, hd)).astype(dtype)
    return q, k, v, jax.random.normal(ks[3], (B, S, nh * hd))


def _text_mask(impl, S=S, rows=3):
    """Row 0 unpadded, row 1 left-padded by 3 (its first 3 queries are fully masked), row 2 right-padded by 2."""
    am = np.ones((3, S), np.int32)
    am[1, :3] = 0
    am[2, -2:] = 0
    return AttentionMask.causal_padding(jnp.asarray(am[:rows]), impl)


def _vit_mask(impl):
    """Slot 0: three images and padding (-1); slot 1: one image filling it."""
    seg = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, -1, -1], [0] * S], np.int32)
    return AttentionMask.segments(jnp.asarray(seg), impl)


def _value_and_grads(fn, q, k, v, g):
    """Output and d(sum(out * g))/d(q, k, v) (g cast to the output dtype), one jit."""
    def run(q, k, v, g):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(g.astype(out.dtype))
    return jax.jit(run)(q, k, v, g)


def _close(got, want, ulps, rows=None, what=""):
    """|got - want| <= `ulps` units of want's dtype spacing (2**-7 relative for bf16, 2**-23 for f32) at the
    largest |want| (on `rows`, a [B,S] bool, when given)."""
    eps = 2.0 ** -7 if want.dtype == jnp.bfloat16 else 2.0 ** -23
    got, want = np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
    if rows is not None:
        got, want = got[rows], want[rows]
    np.testing.assert_allclose(got, want, rtol=0, atol=ulps * eps * float(np.abs(want).max()), err_msg=what)


# float32: same float32 softmax, summed in another order (online over key blocks, recomputed in the backward):
# seen <= 4 ulps of the largest value (2.4e-7 on values ~2); 64 ulps leaves margin on AVX2 and AVX-512 alike.
# bfloat16: the blockwise path rounds the unnormalised probabilities (in [0, 1]) to bf16 per tile, the dense path
# the normalised ones, and q/k/v/outputs are bf16: a few bf16 ulps (2**-7 relative) of the largest value; 8 allowed.
ULPS = {jnp.float32: 64, jnp.bfloat16: 8}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blockwise_text_gqa_padding_equals_dense(dtype):
    q, k, v, g = _qkv(3, nh=4, nkv=2, dtype=dtype)
    mask = _text_mask("blockwise")
    dense = jax.jit(lambda q, k, v: gqa_attention(q, k, v, mask.dense(), dtype))
    # blocks of 4 queries x 3 keys: S = 11 padded to 12, several tiles per row, causal tiles fully masked
    blockwise = jax.jit(lambda q, k, v: blockwise_attention(q, k, v, mask, dtype, block_q=4, block_k=3))
    want, dwant = _value_and_grads(dense, q, k, v, g)
    got, dgot = _value_and_grads(blockwise, q, k, v, g)
    assert got.dtype == want.dtype == dtype
    _close(got, want, ULPS[dtype], what="out")  # every row, the fully masked ones too
    for name, a, b in zip("qkv", dgot, dwant):
        assert a.dtype == b.dtype == dtype
        _close(a, b, ULPS[dtype], what="d" + name)
    assert float(jnp.abs(dgot[0][1, :3]).max()) == 0.0  # fully masked queries get no gradient, as in dense


def test_blockwise_vit_segments_equals_dense():
    q, k, v, g = _qkv(2, nh=3, nkv=3, seed=1)
    mask = _vit_mask("blockwise")
    want, dwant = _value_and_grads(lambda q, k, v: gqa_attention(q, k, v, mask.dense(), jnp.float32), q, k, v, g)
    got, dgot = _value_and_grads(lambda q, k, v: attention(q, k, v, mask, jnp.float32), q, k, v, g)  # default blocks
    _close(got, want, ULPS[jnp.float32], what="out")
    for name, a, b in zip("qkv", dgot, dwant):
        _close(a, b, ULPS[jnp.float32], what="d" + name)


@pytest.mark.parametrize("case", ["text", "vit"])
def test_cudnn_plumbing_equals_dense_through_xla(case):
    q, k, v, g = _qkv(3 if case == "text" else 2, nh=4, nkv=2 if case == "text" else 4, seed=2)
    mask = _text_mask("cudnn") if case == "text" else _vit_mask("cudnn")
    real = np.asarray(mask.kv_valid) if case == "text" else np.ones(mask.segment_ids.shape, bool)
    g = g * real[:, :, None]  # padded query rows carry no loss
    want, dwant = _value_and_grads(lambda q, k, v: gqa_attention(q, k, v, mask.dense(), jnp.float32), q, k, v, g)
    got, dgot = _value_and_grads(jax.jit(lambda q, k, v: cudnn_attention(q, k, v, mask, jnp.float32,
                                                                         implementation="xla")), q, k, v, g)
    _close(got, want, ULPS[jnp.float32], rows=real, what="out")
    assert np.isfinite(np.asarray(got)).all()
    if case == "text":
        assert float(jnp.abs(got[~real]).max()) == 0.0  # padded queries output 0
    for name, a, b in zip("qkv", dgot, dwant):
        _close(a, b, ULPS[jnp.float32], what="d" + name)


def test_splash_kernel_interpreted_equals_dense():
    """The Pallas kernel in interpret mode, 2 x 2 blocks of 128 (S = 200 padded to 256): text GQA + left padding."""
    q, k, v, g = _qkv(2, nh=2, nkv=1, hd=8, seed=3, S=200)
    mask = _text_mask("splash", S=200, rows=2)
    real = np.asarray(mask.kv_valid)
    g = g * real[:, :, None]
    want, dwant = _value_and_grads(lambda q, k, v: gqa_attention(q, k, v, mask.dense(), jnp.float32), q, k, v, g)
    got, dgot = _value_and_grads(jax.jit(lambda q, k, v: splash_attention(q, k, v, mask, jnp.float32, block=128,
                                                                          interpret=True)), q, k, v, g)
    _close(got, want, ULPS[jnp.float32], rows=real, what="out")
    for name, a, b in zip("qkv", dgot, dwant):
        _close(a, b, ULPS[jnp.float32], what="d" + name)


def test_decode_mask_is_dense_for_every_implementation():
    """A dense [B,S,L] mask (the KV-cache decode step) bypasses the configured implementation."""
    q, k, v, _ = _qkv(2, nh=4, nkv=2, seed=4)
    mask = jnp.asarray(np.arange(S)[None, None, :] < np.array([5, S])[:, None, None])[:, :1].repeat(1, 1)
    want = jax.jit(gqa_attention, static_argnums=4)(q[:, :1], k, v, mask, jnp.float32)
    got = jax.jit(attention, static_argnums=4)(q[:, :1], k, v, mask, jnp.float32)
    np.testing.assert_array_equal(got, want)


def test_cudnn_refuses_float32_and_config_checks_the_name():
    q, k, v, _ = _qkv(1, nh=2, nkv=2)
    with pytest.raises(AttentionConfigError, match="bfloat16"):
        cudnn_attention(q, k, v, AttentionMask.causal_padding(jnp.ones((1, S), jnp.int32), "cudnn"), jnp.float32)
    with pytest.raises(ConfigError, match="'attention'"):
        ModelConfig(attention="flash")


def _backend():
    return jax.default_backend()


@pytest.mark.skipif(_backend() != "gpu", reason="cuDNN flash attention needs a GPU backend")
@pytest.mark.parametrize("case", ["text", "vit"])
def test_cudnn_kernel_on_gpu_equals_dense(case):
    S_, hd = 256, 64
    q, k, v, g = _qkv(3 if case == "text" else 2, nh=4, nkv=2 if case == "text" else 4, hd=hd, dtype=jnp.bfloat16,
                      seed=5, S=S_)
    if case == "text":
        mask = _text_mask("cudnn", S=S_)
        real = np.asarray(mask.kv_valid)
    else:
        seg = np.repeat(np.array([[0, 1, 2, -1], [0, 0, 0, 0]]), S_ // 4, axis=1).astype(np.int32)
        mask = AttentionMask.segments(jnp.asarray(seg), "cudnn")
        real = np.ones(seg.shape, bool)
    g = g * real[:, :, None]
    want, dwant = _value_and_grads(lambda q, k, v: gqa_attention(q, k, v, mask.dense(), jnp.bfloat16), q, k, v, g)
    got, dgot = _value_and_grads(jax.jit(lambda q, k, v: attention(q, k, v, mask, jnp.bfloat16)), q, k, v, g)
    _close(got, want, 8, rows=real, what="out")
    for name, a, b in zip("qkv", dgot, dwant):
        _close(a, b, 8, what="d" + name)


@pytest.mark.skipif(_backend() != "tpu", reason="the splash kernel needs a TPU backend (interpret mode is tested above)")
def test_splash_kernel_on_tpu_equals_dense():
    S_ = 512
    q, k, v, g = _qkv(3, nh=4, nkv=2, hd=128, dtype=jnp.bfloat16, seed=6, S=S_)
    mask = _text_mask("splash", S=S_)
    real = np.asarray(mask.kv_valid)
    g = g * real[:, :, None]
    want, dwant = _value_and_grads(lambda q, k, v: gqa_attention(q, k, v, mask.dense(), jnp.bfloat16), q, k, v, g)
    got, dgot = _value_and_grads(jax.jit(lambda q, k, v: attention(q, k, v, mask, jnp.bfloat16)), q, k, v, g)
    _close(got, want, 8, rows=real, what="out")
    for name, a, b in zip("qkv", dgot, dwant):
        _close(a, b, 8, what="d" + name)
