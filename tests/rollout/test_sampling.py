"""Sampling math against numpy/scipy references: empirical frequencies, log-probs, coordinate expectation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax, softmax

from coordexp_jax.rollout import sampling

N = 200_000  # samples per distribution check


def _reference_probs(row, temperature, top_k, top_p):
    """Independent numpy reference: temperature, then top-k, then top-p on the renormalised top-k distribution."""
    x = np.asarray(row, np.float64) / temperature
    keep = np.ones_like(x, bool)
    if top_k:
        keep &= x >= np.sort(x)[::-1][top_k - 1]
    p = softmax(np.where(keep, x, -np.inf))
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        n_keep = int(np.searchsorted(cum, top_p) + 1)  # smallest prefix with mass >= top_p
        kept = np.zeros_like(keep)
        kept[order[:n_keep]] = True
        p = np.where(kept, p, 0.0)
        p /= p.sum()
    return p


ROW = np.array([2.0, 1.5, 1.2, 0.3, 0.0, -0.4, -1.0, 0.8, 1.9, -2.5, 0.1, 0.55], np.float32)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.7), (0.7, 6, 0.8), (1.6, 0, 0.95)])
def test_empirical_frequencies_match_renormalised_softmax(temperature, top_k, top_p):
    ref = _reference_probs(ROW, temperature, top_k, top_p)
    logits = jnp.broadcast_to(jnp.asarray(ROW), (N, ROW.size))
    tok, lp = jax.jit(lambda k, x: sampling.sample(k, x, temperature=temperature, top_k=top_k, top_p=top_p))(
        jax.random.key(1), logits)
    tok, lp = np.asarray(tok), np.asarray(lp)
    freq = np.bincount(tok, minlength=ROW.size) / N
    # never outside the support
    assert np.all(freq[ref == 0] == 0), (freq, ref)
    # every category within 5 standard errors of its probability (binomial)
    se = np.sqrt(ref * (1 - ref) / N)
    assert np.all(np.abs(freq - ref) <= 5 * se + 1e-12), np.abs(freq - ref) / np.maximum(se, 1e-12)
    # sample log-prob = log of the renormalised probability of the drawn token (float32 log-softmax of logits of
    # order 1: a few ulps of the largest |log-prob|, seen 4e-8 of it)
    want = np.log(ref[tok])
    np.testing.assert_allclose(lp, want, atol=4e-6 * np.abs(want).max())


def test_greedy_is_argmax_and_zero_sample_logprob():
    x = jax.random.normal(jax.random.key(0), (7, 50))
    tok, lp = sampling.sample(jax.random.key(1), x, temperature=0.0, top_k=3, top_p=0.5)
    np.testing.assert_array_equal(np.asarray(tok), np.argmax(np.asarray(x), -1))
    assert np.all(np.asarray(lp) == 0)


@pytest.mark.parametrize("V", [1000, 152064, 151937])  # 1000: the plain path; 151937: padded to the block grid
def test_blocked_argmax_equals_numpy_argmax_with_ties_and_inf(V):
    # integer-valued logits give many exact ties; numpy's argmax returns the first maximum (and the first NaN)
    rng = np.random.default_rng(V)
    x = rng.integers(-50, 50, (6, V)).astype(np.float32)
    x[1, :] = -np.inf                       # all -inf: index 0
    x[2, [7, V // 2, V - 1]] = 1e4          # tie across blocks: the first one
    x[3, [V - 3, V - 1]] = 1e4              # maxima in the last (possibly padded) block
    x[4, V // 3] = np.inf                   # one +inf
    x[5, [V // 5, V // 5 + 1]] = np.inf
    got = np.asarray(jax.jit(sampling.argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, -1))
    tok, _ = sampling.sample(None, jnp.asarray(x), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(tok), np.argmax(x, -1))


def test_top_p_with_masked_entries_and_candidates():
    # -inf entries (constraint masks) must carry no mass; the candidate-limited sort must agree with the full one
    x = np.array(jax.random.normal(jax.random.key(3), (5, 300))) * 2
    x[:, ::3] = -np.inf
    full = np.asarray(sampling.top_p_mask(jnp.asarray(x), 0.6))
    for b in range(5):
        ref = _reference_probs(np.where(np.isfinite(x[b]), x[b], -1e30), 1.0, 0, 0.6) > 0
        np.testing.assert_array_equal(np.isfinite(full[b]), ref)
    k = np.asarray(sampling.process_logits(jnp.asarray(x), temperature=1.0, top_k=40, top_p=0.6))
    for b in range(5):
        ref = _reference_probs(np.where(np.isfinite(x[b]), x[b], -1e30), 1.0, 40, 0.6) > 0
        np.testing.assert_array_equal(np.isfinite(k[b]), ref)


def test_token_logprob_matches_scipy():
    x = np.array(jax.random.normal(jax.random.key(4), (6, 1000))) * 4
    t = np.array([0, 5, 999, 17, 300, 42])
    got = np.asarray(sampling.token_logprob(jnp.asarray(x), jnp.asarray(t)))
    want = log_softmax(x.astype(np.float64), -1)[np.arange(6), t]
    np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max())  # float32: ulps of |log p| (seen 4e-8 of it)


def test_coord_expectation():
    V, start = 1200, 150
    x = np.array(jax.random.normal(jax.random.key(5), (4, V))) * 3
    got = np.asarray(sampling.coord_expectation(jnp.asarray(x), start, 1000, tau=0.7))
    p = softmax(x[:, start:start + 1000].astype(np.float64) / 0.7, -1)
    # in [0, 1]: float32 softmax sums over 1000 bins, reduction order ISA-dependent (~1e-6 at worst; seen 1.1e-7)
    np.testing.assert_allclose(got, p @ (np.arange(1000) / 999), atol=1e-5)
    # coordexp_method.md §4 test case: p(0) = p(999) = 0.5 -> 0.5
    y = np.full((1, V), -np.inf, np.float32)
    y[0, start] = y[0, start + 999] = 0.0
    y[0, 0] = 50.0  # non-coordinate logits do not matter
    assert abs(float(sampling.coord_expectation(jnp.asarray(y), start)[0]) - 0.5) < 1e-6  # exact in float32
