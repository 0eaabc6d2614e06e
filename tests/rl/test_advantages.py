"""Group advantages against TRL's torch formula, an explicit leave-one-out loop, and exact zeros for
zero-variance groups; numpy and jitted jax agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from coordexp_jax.rl.advantages import group_advantages


def _rewards(seed=0, b=6, g=8):
    rng = np.random.default_rng(seed)
    r = rng.uniform(0, 3, (b, g))
    r[1] = 0.1  # all equal
    # equal up to 1e-9 (std 3.5e-10 <= zero_std_tol): the z-score alone would give ~3e-6, not 0
    r[3] = [1.0, 1.0 + 1e-9] + [1.0] * (g - 2)
    return r


def test_grpo_vs_trl_torch_formula():
    r = _rewards()
    adv, frac = group_advantages(r, "grpo")
    # TRL / the seed: (r - mean) / (std + 1e-4) with torch's default (unbiased, ddof=1) std
    t = torch.tensor(r, dtype=torch.float64)
    ref = ((t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-4)).numpy()
    keep = np.array([0, 2, 4, 5])
    # float64 on both sides, 8-term means: ~1e-15 relative to advantages of order 1
    np.testing.assert_allclose(adv[keep], ref[keep], rtol=1e-12, atol=1e-12)
    assert frac == pytest.approx(2 / 6)
    # sample std, not population: the population std would give advantages smaller by sqrt((G-1)/G)
    assert not np.allclose(adv[keep], ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4))[keep])


def test_zero_variance_groups_exactly_zero():
    r = _rewards()
    for kind in ("grpo", "drgrpo", "rloo"):
        adv, frac = group_advantages(r, kind)
        assert np.all(adv[1] == 0.0) and np.all(adv[3] == 0.0), kind
        assert frac == pytest.approx(2 / 6)
        assert np.all(adv[[0, 2, 4, 5]] != 0.0)
    # a batch of constant groups: all zero, every group counted
    adv, frac = group_advantages(np.full((2, 5), 0.3), "grpo")
    assert np.all(adv == 0.0) and frac == 1.0


def test_rloo_vs_loop_and_drgrpo():
    r = _rewards(1)
    adv, _ = group_advantages(r, "rloo")
    b, g = r.shape
    loop = np.zeros_like(r)
    for i in range(b):
        for j in range(g):
            loop[i, j] = r[i, j] - np.mean([r[i, k] for k in range(g) if k != j])
    keep = np.array([0, 2, 4, 5])
    np.testing.assert_allclose(adv[keep], loop[keep], rtol=1e-12, atol=1e-12)  # float64, 7-term means
    dr, _ = group_advantages(r, "drgrpo")
    np.testing.assert_allclose(dr[keep], (r - r.mean(1, keepdims=True))[keep], rtol=1e-12, atol=1e-12)
    # every kind is mean-centred per group
    for a in (adv, dr, group_advantages(r, "grpo")[0]):
        np.testing.assert_allclose(a.sum(1), 0.0, atol=1e-12)


def test_jax_jit_matches_numpy():
    r = _rewards(2).astype(np.float32)
    f = jax.jit(group_advantages, static_argnames=("kind",))
    for kind in ("grpo", "drgrpo", "rloo"):
        a_np, frac_np = group_advantages(r, kind)
        a_j, frac_j = f(jnp.asarray(r), kind)
        assert isinstance(a_j, jax.Array) and a_j.shape == r.shape
        # float32 (jax) vs float32-promoted numpy: advantages of order 1, ~1e-6 relative on any CPU
        np.testing.assert_allclose(np.asarray(a_j), a_np, rtol=1e-5, atol=1e-5)
        assert np.all(np.asarray(a_j)[[1, 3]] == 0.0)
        assert float(frac_j) == pytest.approx(frac_np)


def test_single_completion_groups_and_errors():
    adv, frac = group_advantages(np.array([[1.0], [2.0]]), "grpo")
    assert np.all(adv == 0.0) and frac == 1.0
    with pytest.raises(ValueError, match="kind"):
        group_advantages(np.zeros((2, 2)), "ppo")
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        group_advantages(np.zeros(4), "grpo")
