"""layers.linear (the CPU custom-VJP matmul) against plain jnp.dot autodiff, and param's required std."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coordexp_jax.model.layers import _linear_cpu, linear, param


@pytest.mark.parametrize("shape", [(7, 5), (2, 3, 5), (2, 1, 4, 5)])
def test_linear_value_and_gradients_match_jnp_dot(shape):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, shape, jnp.float32)
    w = jax.random.normal(kw, (5, 11), jnp.float32)
    g = jax.random.normal(kg, shape[:-1] + (11,), jnp.float32)

    def loss(f):
        return lambda x, w: jnp.sum(f(x, w) * g)

    assert jax.default_backend() == "cpu"  # so linear takes the custom-VJP path tested here
    # float32 dots of length 5/11: a few ulps of the largest entry, on any ISA (seen: bit-equal)
    ref = np.asarray(jnp.dot(x, w))
    np.testing.assert_allclose(linear(x, w), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    got = jax.jit(jax.grad(loss(linear), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(jnp.dot), argnums=(0, 1)))(x, w)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())  # seen <= 7e-8 of the max


def test_linear_bf16_with_float32_output():
    """The lm_head case: bf16 operands, float32 logits; gradients come back in the operands' dtypes."""
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 8), jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(2), (8, 6), jnp.bfloat16)
    y = linear(x, w, preferred_element_type=jnp.float32)
    assert y.dtype == jnp.float32
    ref = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
    # bf16 operands and their products are exact in float32; with float32 accumulation only float32 rounding is
    # left (seen: bit-equal). A bf16-rounded output would be off by up to 2**-8 relative and fail.
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    dx, dw = jax.grad(lambda x, w: jnp.sum(jnp.sin(linear(x, w, preferred_element_type=jnp.float32))),
                      argnums=(0, 1))(x, w)
    rdx, rdw = jax.grad(lambda x, w: jnp.sum(jnp.sin(jnp.dot(x, w, preferred_element_type=jnp.float32))),
                        argnums=(0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
    # gradients rounded to bf16 (2**-8 relative) after bf16 dot operands: a few bf16 ulps of the largest entry
    # (seen: 2.4e-3 of it); atol = 2**-6 of the largest, rtol as before
    np.testing.assert_allclose(dx.astype(np.float32), rdx, rtol=3e-2, atol=2**-6 * np.abs(rdx).max())
    np.testing.assert_allclose(dw.astype(np.float32), rdw, rtol=3e-2, atol=2**-6 * np.abs(rdw).max())


def test_unused_weight_gradient_is_not_computed():
    """With the weight frozen (LoRA base, frozen tower) XLA drops the custom VJP's dW matmul: no [K,N] dot left."""
    x = jnp.ones((64, 48))
    w = jnp.ones((48, 80))
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(_linear_cpu(x, w, None) ** 2))).lower(x).compile().as_text()
    assert "f32[48,80]{1,0} dot(" not in hlo.replace("%", "")
    assert "f32[64,48]" in hlo  # dx is still computed


def test_param_normal_init_needs_std():
    with pytest.raises(ValueError, match="initializer_range"):
        param(None, (2, 2), ("a", "b"), jnp.float32)
