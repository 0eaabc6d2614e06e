"""The CPU attention (text decoder and ViT) with its hand-written VJP equals the einsum attention that XLA differentiates itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coordexp_jax.model.attention import _attention_cpu, _attention_einsum, cache_attention, gqa_attention


def _inputs(B=2, S=6, T=6, nh=4, nkv=2, hd=8, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, S, nh, hd))
    k = jax.random.normal(ks[1], (B, T, nkv, hd))
    v = jax.random.normal(ks[2], (B, T, nkv, hd))
    g = jax.random.normal(ks[3], (B, S, nh * hd))
    # row 0: causal; row 1: left-padded by 2, so its first two queries are fully masked
    causal = np.tril(np.ones((S, T), bool), k=T - S)
    valid = np.ones((B, T), bool)
    valid[1, :2] = False
    mask = jnp.asarray(causal[None] & valid[:, None, :])
    return q, k, v, mask, g


@pytest.mark.parametrize("nh,nkv", [(4, 2), (4, 4), (6, 1)])
def test_cpu_attention_value_and_gradients_match_einsum(nh, nkv):
    q, k, v, mask, g = _inputs(nh=nh, nkv=nkv)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, mask, jnp.float32) * g)

    # float32, the same math in another order (blocked softmax, hand-written VJP): a few ulps of the largest
    # output / gradient (seen <= 2e-7 of it, AVX2 and AVX-512); atol 1e-5 of the largest leaves ~50x margin
    want = np.asarray(_attention_einsum(q, k, v, mask, jnp.float32))
    np.testing.assert_allclose(_attention_cpu(q, k, v, mask, jnp.float32), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    got = jax.jit(jax.grad(loss(_attention_cpu), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(_attention_einsum), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=name)
    assert float(jnp.abs(got[0][1, :2]).max()) == 0.0  # fully masked queries get no gradient


def test_cpu_attention_against_a_cache_longer_than_the_queries():
    """Decode shape: 1 query against an L-slot cache (forward only, no gradient in decoding)."""
    q, k, v, _, _ = _inputs(S=1, T=9)
    mask = jnp.asarray(np.arange(9)[None, None, :] < np.array([5, 9])[:, None, None])
    want = np.asarray(_attention_einsum(q, k, v, mask, jnp.float32))  # float32: a few ulps of the largest output
    np.testing.assert_allclose(gqa_attention(q, k, v, mask, jnp.float32), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("S,nh,nkv", [(1, 4, 2), (3, 4, 2), (1, 6, 1), (2, 4, 4)])
def test_cache_attention_equals_attention_over_the_cache_with_the_new_keys_written_in(S, nh, nkv):
    """`cache_attention` (the decode step: head-major cache read before the write, new keys apart) against the
    einsum reference over the cache after the write, brute-force built in numpy: keys at slots [0, n_old) of each
    row (row 1 left-padded by 3), the S new keys at slots n_old..n_old+S-1, seen causally."""
    B, L, hd, n_old = 2, 11, 8, 6
    rng = np.random.default_rng(S * 10 + nh + nkv)
    q = rng.standard_normal((B, S, nh, hd)).astype(np.float32)
    k_new = rng.standard_normal((B, S, nkv, hd)).astype(np.float32)
    v_new = rng.standard_normal((B, S, nkv, hd)).astype(np.float32)
    k_cache = np.zeros((B, nkv, L, hd), np.float32)
    v_cache = np.zeros((B, nkv, L, hd), np.float32)
    k_cache[:, :, :n_old] = rng.standard_normal((B, nkv, n_old, hd))
    v_cache[:, :, :n_old] = rng.standard_normal((B, nkv, n_old, hd))
    valid = np.zeros((B, L), bool)
    valid[:, :n_old] = True
    valid[1, :3] = False  # left padding
    got = cache_attention(jnp.asarray(q), jnp.asarray(k_cache), jnp.asarray(v_cache),
                          jnp.asarray(np.broadcast_to(valid[:, None], (B, S, L))), jnp.asarray(k_new),
                          jnp.asarray(v_new), jnp.float32)
    # the reference: write the new keys into slots n_old.., then every query sees the valid old slots and the new
    # slots up to its own
    k_full, v_full = k_cache.transpose(0, 2, 1, 3).copy(), v_cache.transpose(0, 2, 1, 3).copy()   # [B,L,nkv,hd]
    k_full[:, n_old:n_old + S], v_full[:, n_old:n_old + S] = k_new, v_new
    mask = np.zeros((B, S, L), bool)
    for s in range(S):
        mask[:, s] = valid
        mask[:, s, n_old:n_old + s + 1] = True
    want = np.asarray(_attention_einsum(jnp.asarray(q), jnp.asarray(k_full), jnp.asarray(v_full), jnp.asarray(mask),
                                        jnp.float32))
    assert got.shape == (B, S, nh * hd)
    # float32, the same products summed in another order: a few ulps of the largest output
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_cpu_attention_bf16_matches_einsum_bf16():
    q, k, v, mask, g = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in _inputs())
    a = _attention_cpu(q, k, v, mask, jnp.bfloat16)
    b = _attention_einsum(q, k, v, mask, jnp.bfloat16)
    assert a.dtype == b.dtype == jnp.bfloat16
    # bf16 keeps 8 significant bits (spacing 2**-7 relative): two bf16 pipelines differ by a few bf16 ulps of the
    # largest value (seen: 0 forward, 1 ulp in dq); atol = 4 ulps at the largest magnitude
    b32 = b.astype(np.float32)
    np.testing.assert_allclose(a.astype(np.float32), b32, rtol=2e-2, atol=2**-5 * np.abs(b32).max())
    da = jax.grad(lambda q: jnp.sum(_attention_cpu(q, k, v, mask, jnp.bfloat16).astype(jnp.float32)
                                    * g.astype(jnp.float32)))(q)
    db = jax.grad(lambda q: jnp.sum(_attention_einsum(q, k, v, mask, jnp.bfloat16).astype(jnp.float32)
                                    * g.astype(jnp.float32)))(q)
    assert da.dtype == jnp.bfloat16
    db32 = db.astype(np.float32)
    np.testing.assert_allclose(da.astype(np.float32), db32, rtol=5e-2, atol=2**-5 * np.abs(db32).max())
