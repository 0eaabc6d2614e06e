"""The GRPO objective against an independent torch implementation written from TRL's definitions (loss and its
gradient with respect to logp), the first-iteration identities, clipping (zero gradient where the clip is active,
asymmetric ε_high), and chunked token log-probs against a numpy log_softmax gather."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import enable_x64

from coordexp_jax.train.grpo import AGGREGATIONS, grpo_loss, token_logprobs

N, T = 6, 9


def _batch(seed=0, spread=0.4):
    """logp / old / ref [N, T] with ρ = exp(logp - old) spread over both clip boundaries, ragged masks (row 5
    empty), advantages of both signs (row 4: 0)."""
    rng = np.random.default_rng(seed)
    old = rng.uniform(-3, -0.1, (N, T))
    logp = old + rng.uniform(-spread, spread, (N, T))
    ref = old + rng.normal(0, 0.3, (N, T))
    lengths = np.array([9, 5, 1, 7, 4, 0])
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
    adv = np.array([1.3, -0.7, 0.4, -1.9, 0.0, 0.8])
    return logp, old, ref, adv, mask


def torch_grpo(logp, old, ref, adv, mask, eps, eps_high, beta, loss_type, max_len=None):
    """TRL GRPOTrainer._compute_loss, rewritten: per-token PPO-clip + β k3, loss types grpo / dapo / dr_grpo.
    Rows without completion tokens are left out of the "grpo" mean (the convention of grpo_loss; TRL's
    `.mean()` keeps them, which only differs when a row is empty)."""
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    m = torch.tensor(mask, dtype=torch.float64)
    o = torch.tensor(old, dtype=torch.float64)
    a = torch.tensor(adv, dtype=torch.float64).unsqueeze(1)
    coef_1 = torch.exp(lp - o)
    coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps_high)
    per_token = -torch.min(coef_1 * a, coef_2 * a)
    if beta:
        r = torch.tensor(ref, dtype=torch.float64)
        per_token = per_token + beta * (torch.exp(r - lp) - (r - lp) - 1)
    if loss_type == "grpo":
        rows = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        keep = m.sum(-1) > 0
        loss = rows[keep].mean()
    elif loss_type == "dapo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
    else:
        loss = (per_token * m).sum() / (per_token.size(0) * (max_len or per_token.size(1)))
    loss.backward()
    loss = loss.detach()
    low = ((coef_1 < 1 - eps) & (a < 0)).double()
    high = ((coef_1 > 1 + eps_high) & (a > 0)).double()
    frac = lambda x: float((x * m).sum() / m.sum())  # noqa: E731
    clip = {"low": frac(low), "high": frac(high), "region": frac(((low + high) > 0).double())}
    return float(loss), lp.grad.numpy(), clip


TRL_NAME = {"token_mean": "dapo", "seq_mean_token_mean": "grpo", "drgrpo": "dr_grpo"}


@pytest.fixture
def x64():
    with enable_x64():  # float64 on the jax side too: the comparisons with torch float64 hold to rounding
        yield


def _grad(logp, old, ref, adv, mask, **kw):
    """Loss, d loss / d logp, metrics. old and ref enter as functions of the traced logp (logp + a constant
    offset, same values up to one rounding), so the gradient is right only if grpo_loss holds them constant."""
    d_old = jnp.asarray(old - logp)
    d_ref = None if ref is None else jnp.asarray(ref - logp)
    f = lambda lp: grpo_loss(lp, lp + d_old, None if ref is None else lp + d_ref, adv, mask, **kw)  # noqa: E731
    (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    return float(loss), np.asarray(g), metrics


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("eps_high", [None, 0.28])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_grad_vs_torch(x64, aggregation, eps_high, beta):
    logp, old, ref, adv, mask = _batch()
    kw = dict(epsilon=0.2, epsilon_high=eps_high, beta=beta, aggregation=aggregation)
    loss, g, met = _grad(logp, old, ref if beta else None, adv, mask, **kw)
    t_loss, t_g, t_clip = torch_grpo(logp, old, ref, adv, mask, 0.2, eps_high or 0.2, beta, TRL_NAME[aggregation])
    # float64 on both sides, sums of <= 54 terms of order 1: agreement to ~1e-15 relative; 1e-12 is ample
    assert loss == pytest.approx(t_loss, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(g, t_g, rtol=1e-12, atol=1e-14)
    assert float(met["clip_fraction_low"]) == pytest.approx(t_clip["low"])
    assert float(met["clip_fraction_high"]) == pytest.approx(t_clip["high"])
    assert float(met["clip_fraction"]) == pytest.approx(t_clip["region"])
    assert 0 < t_clip["region"] < 1  # the batch exercises both the clipped and the unclipped branch
    assert np.all(g[mask == 0] == 0.0)


def test_first_iteration_ratio_one_kl_zero(x64):
    logp, _, _, adv, mask = _batch(1)
    # old and ref are the traced logp itself (one update per rollout, as a loop passes it): they must act as
    # constants (stop_gradient), or ρ = exp(0) would carry no gradient
    f = lambda lp: grpo_loss(lp, lp, lp, adv, mask, beta=0.04)  # noqa: E731
    (loss, met), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
    loss, g = float(loss), np.asarray(g)
    assert float(met["ratio_mean"]) == 1.0 and float(met["ratio_min"]) == 1.0 and float(met["ratio_max"]) == 1.0
    assert float(met["kl"]) == 0.0 and float(met["clip_fraction"]) == 0.0
    n = mask.sum()
    # token_mean at ρ = 1: loss = -Σ A_i |o_i| / Σ|o_i|, gradient -A_i / Σ|o_i| on completion tokens (the k3 gradient
    # 1 - exp(ref - logp) vanishes at logp = ref); float64, exact up to one rounding
    assert loss == pytest.approx(-(adv * mask.sum(1)).sum() / n, rel=1e-14)
    np.testing.assert_allclose(g, -adv[:, None] * mask / n, rtol=1e-14, atol=0)


def test_clipped_tokens_have_zero_gradient(x64):
    logp, old, _, adv, mask = _batch(2, spread=0.6)
    ratio = np.exp(logp - old)
    a = np.broadcast_to(adv[:, None], ratio.shape)
    on = mask > 0
    for eps_high in (0.2, 0.28):
        _, g, _ = _grad(logp, old, None, adv, mask, epsilon=0.2, epsilon_high=eps_high, beta=0.0)
        clipped = on & (((ratio > 1 + eps_high) & (a > 0)) | ((ratio < 0.8) & (a < 0)))
        live = on & ~clipped & (a != 0)
        assert clipped.sum() >= 3 and live.sum() >= 3
        assert np.all(g[clipped] == 0.0)
        # unclipped tokens: d/dlogp of -ρA / n_tok = -ρ A / n_tok (token_mean)
        np.testing.assert_allclose(g[live], (-ratio * a / mask.sum())[live], rtol=1e-13)


def test_epsilon_high_asymmetric(x64):
    # one row, A > 0: ρ = 1.25 is clipped under ε = 0.2, live under ε_high = 0.28; A < 0: ρ = 0.75 is clipped by
    # ε = 0.2 whatever ε_high is
    old = np.zeros((2, 1))
    logp = np.log(np.array([[1.25], [0.75]]))
    adv = np.array([1.0, -1.0])
    mask = np.ones((2, 1))
    _, g_sym, m_sym = _grad(logp, old, None, adv, mask, epsilon=0.2, beta=0.0)
    _, g_asym, m_asym = _grad(logp, old, None, adv, mask, epsilon=0.2, epsilon_high=0.28, beta=0.0)
    assert g_sym[0, 0] == 0.0 and g_asym[0, 0] == pytest.approx(-1.25 / 2, rel=1e-14)
    assert g_sym[1, 0] == 0.0 and g_asym[1, 0] == 0.0
    assert float(m_sym["clip_fraction_high"]) == 0.5 and float(m_asym["clip_fraction_high"]) == 0.0
    assert float(m_sym["clip_fraction_low"]) == 0.5 and float(m_asym["clip_fraction_low"]) == 0.5


def test_masked_garbage_is_ignored_and_jit():
    logp, old, ref, adv, mask = (x.astype(np.float32) for x in _batch(3))
    bad = logp.copy()
    bad[mask == 0] = np.nan
    bad_old = old.copy()
    bad_old[mask == 0] = -np.inf
    f = jax.jit(jax.value_and_grad(lambda lp, o: grpo_loss(lp, o, ref, adv, mask)[0]))
    l1, g1 = f(jnp.asarray(logp), jnp.asarray(old))
    l2, g2 = f(jnp.asarray(bad), jnp.asarray(bad_old))
    assert np.isfinite(float(l2)) and np.all(np.isfinite(np.asarray(g2)))
    assert float(l1) == float(l2) and np.array_equal(np.asarray(g1), np.asarray(g2))


def test_errors():
    logp, old, ref, adv, mask = _batch()
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, old, ref, adv, mask, aggregation="sum")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, None, adv, mask, beta=0.04)
    with pytest.raises(ValueError, match=r"\[N, T\]"):
        grpo_loss(logp, old[:, :3], ref, adv, mask)


# -------------------------------------------------------------------------------------------- token_logprobs
@pytest.fixture(scope="module")
def lm():
    rng = np.random.default_rng(0)
    b, t, h, v, real_v = 2, 13, 16, 40, 37  # 3 padded vocabulary rows
    hidden = rng.normal(0, 1, (b, t, h)).astype(np.float32)
    w = rng.normal(0, 0.5, (v, h)).astype(np.float32)
    tgt = rng.integers(0, real_v, (b, t))
    return hidden, w, tgt, real_v


def _numpy_logprobs(hidden, w, tgt, real_v, temperature=1.0):
    z = (hidden.astype(np.float64) @ w.astype(np.float64).T)[..., :real_v] / temperature
    z = z - z.max(-1, keepdims=True)
    lsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
    logp = np.take_along_axis(lsm, tgt[..., None], -1)[..., 0]
    ent = -(np.exp(lsm) * lsm).sum(-1)
    return logp, ent


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_token_logprobs_chunked_vs_numpy(lm, chunk):
    hidden, w, tgt, real_v = lm
    for temperature in ((1.0, 0.7) if chunk == 5 else (1.0,)):
        logp, ent = token_logprobs(jnp.asarray(hidden), jnp.asarray(w), jnp.asarray(tgt), chunk, vocab_size=real_v,
                                   temperature=temperature, return_entropy=True)
        ref_lp, ref_ent = _numpy_logprobs(hidden, w, tgt, real_v, temperature)
        assert logp.shape == ent.shape == tgt.shape and logp.dtype == jnp.float32
        # float32 logits of 16-term dot products (|z| <~ 10): log-probs of magnitude <~ 20 agree to ~1e-5 absolute
        np.testing.assert_allclose(np.asarray(logp), ref_lp, rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(ent), ref_ent, rtol=1e-5, atol=2e-5)
    if chunk != 4:
        return
    # without entropy: the log-probs alone, same values
    lp_only = token_logprobs(jnp.asarray(hidden), jnp.asarray(w), jnp.asarray(tgt), chunk, vocab_size=real_v)
    np.testing.assert_allclose(np.asarray(lp_only), _numpy_logprobs(hidden, w, tgt, real_v)[0], rtol=1e-5, atol=2e-5)


def test_token_logprobs_gradient_matches_full(lm):
    hidden, w, tgt, real_v = lm
    wts = jnp.asarray(np.random.default_rng(1).normal(0, 1, tgt.shape).astype(np.float32))

    def full(h, wm):
        z = jnp.einsum("bth,vh->btv", h, wm)
        z = jnp.where(jnp.arange(z.shape[-1]) < real_v, z, -jnp.inf)
        lsm = jax.nn.log_softmax(z, -1)
        return jnp.sum(wts * jnp.take_along_axis(lsm, jnp.asarray(tgt)[..., None], -1)[..., 0])

    def chunked(h, wm):
        lp, ent = token_logprobs(h, wm, jnp.asarray(tgt), 5, vocab_size=real_v, return_entropy=True)
        return jnp.sum(wts * lp) + 0.0 * jnp.sum(ent)  # entropy in the graph: its gradient must stay finite

    g_full = jax.grad(full, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(w))
    g_chunk = jax.grad(chunked, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(w))
    for a, b in zip(g_chunk, g_full):
        assert np.all(np.isfinite(np.asarray(a)))
        # the same float32 ops in another order (chunked scan vs one einsum): ~1e-6 relative to gradients of O(1)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(g_chunk[1])[real_v:] == 0.0)  # padded vocabulary rows get no gradient
