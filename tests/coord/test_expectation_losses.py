"""Expectation decoding and every loss against independent numpy references; gradients vs finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import enable_x64

from coordexp_jax.coord import boxes, expectation, losses

K = 1000


def np_softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def np_lse(x, axis=-1):
    m = x.max(axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis, keepdims=True)))[..., 0]


# ---------------------------------------------------------------------------------------------- expectation
def test_expectation_values_and_modes():
    # Expectations lie in [0, 1], so absolute tolerances here are fractions of the range: float32 softmax-weighted
    # sums over 1000 bins in any order stay within ~1e-6 of float64 (seen <= 1.8e-7, AVX2 and AVX-512).
    rng = np.random.default_rng(0)
    s = rng.normal(0, 3, (5, 7, K)).astype(np.float32)
    for tau in (1.0, 0.7):
        ref = np_softmax(s.astype(np.float64) / tau) @ (np.arange(K) / 999)
        np.testing.assert_allclose(expectation.expectation(s, tau), ref, atol=1e-5)
    # k / 999 in float32: half an ulp (6e-8 relative), one ulp if XLA multiplies by 1/999; a wrong k is 1e-3 off
    np.testing.assert_allclose(expectation.hard(s), np.argmax(s, -1) / 999, rtol=2**-21)
    st = expectation.straight_through(s, 0.7)
    np.testing.assert_allclose(st, np.argmax(s, -1) / 999, atol=1e-6)  # hard + (soft - soft): ulps of 1
    # top-k: only the k largest logits keep mass
    top = np.sort(s, -1)[..., -5:]
    masked = np.where(s >= top[..., :1], s, -np.inf)
    np.testing.assert_allclose(expectation.expectation(s, 1.0, top_k=5), np_softmax(masked) @ (np.arange(K) / 999),
                               atol=1e-5)
    # full logits + coord_start == sliced logits
    full = np.concatenate([rng.normal(size=(5, 7, 13)), s, rng.normal(size=(5, 7, 3))], -1).astype(np.float32)
    np.testing.assert_allclose(expectation.decode(full, "exp", 0.7, coord_start=13), expectation.expectation(s, 0.7),
                               atol=1e-5)  # both float32, reductions possibly in another order
    with pytest.raises(ValueError, match="last axis"):
        expectation.expectation(full)
    with pytest.raises(ValueError, match="mode"):
        expectation.decode(s, "mean")
    # bf16 input: computed in float32
    assert expectation.expectation(jnp.asarray(s, jnp.bfloat16)).dtype == jnp.float32


def test_half_half_gives_half():
    s = np.full(K, -np.inf, np.float32)
    s[0] = s[999] = 2.0
    # exact in float32 (p = 0.5 twice, 0 * 0.5 + 1 * 0.5); abs 1e-7 = 2 ulps at 0.5
    assert float(expectation.expectation(s)) == pytest.approx(0.5, abs=1e-7)
    assert float(expectation.expectation(s, tau=0.3)) == pytest.approx(0.5, abs=1e-7)


def test_gradient_identity_and_st_gradient():
    rng = np.random.default_rng(1)
    s_np = rng.normal(0, 2, (3, K))
    for tau in (1.0, 0.7):
        p = np_softmax(s_np / tau)
        c = p @ (np.arange(K) / 999)
        ident = (1 / tau) * p * (np.arange(K) / 999 - c[:, None])
        with enable_x64():  # float64: the identity holds to rounding (1000-term sums: << 1e-13 of the largest entry)
            g = jax.vmap(jax.grad(lambda x: expectation.expectation(x, tau)))(jnp.asarray(s_np))
            np.testing.assert_allclose(g, ident, rtol=1e-10, atol=1e-13 * np.abs(ident).max())
        s = jnp.asarray(s_np, jnp.float32)
        g = jax.vmap(jax.grad(lambda x: expectation.expectation(x, tau)))(s)
        # float32: p_k (k/999 - c) / tau with c good to ~1e-7: error ~1e-7 of the largest entry (seen 1e-6 of it)
        np.testing.assert_allclose(g, ident, rtol=1e-5, atol=1e-5 * np.abs(ident).max())
        g_st = jax.vmap(jax.grad(lambda x: expectation.straight_through(x, tau)))(s)
        # the same gradient graph (bit-equal here); 1e-6 of the largest entry in case XLA fuses it differently
        np.testing.assert_allclose(g_st, g, rtol=1e-6, atol=1e-6 * np.abs(np.asarray(g)).max())
    assert float(jnp.abs(jax.grad(lambda x: expectation.hard(x).sum())(s)).max()) == 0.0


def test_gather_boxes_and_step_stats():
    rng = np.random.default_rng(2)
    b, s_len, v, cs = 2, 9, 1010, 7
    logits = rng.normal(0, 2, (b, s_len, v)).astype(np.float32)
    pos = rng.integers(0, s_len, (b, 3, 4))
    got = expectation.expectation_boxes(logits, pos, tau=0.7, coord_start=cs)
    ref = np.array([[[np_softmax(logits[i, pos[i, m, j], cs:cs + K] / 0.7) @ (np.arange(K) / 999)
                      for j in range(4)] for m in range(3)] for i in range(b)])
    np.testing.assert_allclose(got, ref, atol=1e-5)  # expectations in [0, 1]: float32 softmax sums, ~1e-7
    z = logits[:, 0]
    tok = np.array([cs + 5, 3])
    stats = jax.jit(lambda z, t: expectation.step_stats(z, t, cs, tau=0.9))(z, tok)
    lp = z / 0.9 - np_lse(z / 0.9)[:, None]
    # log-probs: float32 z / tau - lse, a few ulps of the largest |log-prob| (~10); coord mass in [0, 1]
    np.testing.assert_allclose(stats.token_logprob, lp[np.arange(2), tok], atol=1e-6 * np.abs(lp).max())
    np.testing.assert_allclose(stats.coord_mass, np.exp(lp[:, cs:cs + K]).sum(-1), atol=1e-5)
    assert stats.is_coord.tolist() == [True, False]


# ---------------------------------------------------------------------------------------------------- losses
@pytest.fixture(scope="module")
def batch():
    """A random training batch in the architecture contract, with V = 1100 and bins at [50, 1050)."""
    rng = np.random.default_rng(3)
    b, s, v, cs = 2, 12, 1100, 50
    logits = rng.normal(0, 2, (b, s, v)).astype(np.float32)
    is_coord = rng.random((b, s)) < 0.4
    targets = np.where(is_coord, cs + rng.integers(0, K, (b, s)), rng.integers(0, cs, (b, s)))
    loss_mask = (rng.random((b, s)) < 0.8).astype(np.float32)
    coord_mask = is_coord & (loss_mask > 0)
    return dict(logits=logits, targets=targets, loss_mask=loss_mask, coord_mask=coord_mask, cs=cs, rng=rng)


def test_ce_and_gates_vs_numpy(batch):
    # sums of positive per-token terms: float32 vs float64 agree to ~1e-6 relative (rel 1e-5)
    z, t, lm, cm, cs = (batch[k] for k in ("logits", "targets", "loss_mask", "coord_mask", "cs"))
    z64 = z.astype(np.float64)
    logp = z64 - np_lse(z64)[..., None]
    text = lm * (~cm)
    nll = -np.take_along_axis(logp, t[..., None], -1)[..., 0]
    s, c = losses.ce(z, t, lm, cm)
    assert float(c) == text.sum() and float(s) == pytest.approx((nll * text).sum(), rel=1e-5)
    tau = 0.7
    p = np_softmax(z64 / tau)
    mass = p[..., cs:cs + K].sum(-1)
    s, c = losses.gate(z, cm, cs, tau)
    assert float(c) == cm.sum() and float(s) == pytest.approx((-np.log(mass) * cm).sum(), rel=1e-5)
    s, c = losses.text_gate(z, lm, cm, cs, tau)
    assert float(c) == text.sum() and float(s) == pytest.approx((-np.log(1 - mass) * text).sum(), rel=1e-5)
    # padded vocabulary ids are excluded (a longer row changes the float32 reduction order: ulps; the 28 pad
    # logits of 5.0 would move it by a few %)
    zp = np.concatenate([z, np.full(z.shape[:-1] + (28,), 5.0, np.float32)], -1)
    assert float(losses.ce(zp, t, lm, cm, vocab_size=z.shape[-1])[0]) == pytest.approx(float(losses.ce(z, t, lm, cm)[0]),
                                                                                        rel=1e-5)


def test_chunked_ce_matches_plain():
    rng = np.random.default_rng(4)
    b, s, h, v, cs = 2, 21, 16, 1030, 20
    hid = jnp.asarray(rng.normal(size=(b, s, h)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(v, h)) * 0.3, jnp.float32)
    # half the targets outside the coordinate block (ids < cs or >= cs + K), so CE counts real positions
    t_np = np.where(rng.random((b, s)) < 0.5, rng.integers(0, cs, (b, s)), rng.integers(cs, v, (b, s)))
    t = jnp.asarray(t_np)
    lm = jnp.asarray(rng.random((b, s)) < 0.8, jnp.float32)
    cm = jnp.asarray((t >= cs) & (t < cs + K)) & (lm > 0)
    n_text = int(((np.asarray(lm) > 0) & ~np.asarray(cm)).sum())
    assert n_text >= 5, n_text  # the comparison below must see non-coordinate CE positions

    def plain(hid, emb):
        return losses.ce(jnp.einsum("bsh,vh->bsv", hid, emb), t, lm, cm)[0]

    def chunked(hid, emb):
        return losses.ce_chunked(hid, emb, t, lm, cm, chunk_size=8)[0]

    # the same float32 math in chunks (other reduction order): ~1e-6 relative / of the largest entry
    assert float(plain(hid, emb)) > 0.1  # CE of random logits over 1030 ids is ~ln(1030): not a vacuous 0 == 0
    assert float(chunked(hid, emb)) == pytest.approx(float(plain(hid, emb)), rel=1e-5)
    g1, g2 = jax.grad(plain, (0, 1))(hid, emb), jax.jit(jax.grad(chunked, (0, 1)))(hid, emb)
    assert float(np.abs(np.asarray(g1[0])).max()) > 0  # gradients are compared where they are non-zero
    for a, b_ in zip(g1, g2):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(b_)).max())
    st_plain = losses.vocab_stats(jnp.einsum("bsh,vh->bsv", hid, emb), t, cs, 0.7)
    st_chunk = losses.chunked_vocab_stats(hid, emb, t, cs, 0.7, chunk_size=16)
    for k in st_plain:
        np.testing.assert_allclose(st_chunk[k], st_plain[k], rtol=1e-5, atol=1e-5 * np.abs(np.asarray(st_plain[k])).max(),
                                   err_msg=k)


def np_gauss(k, sigma, trunc):
    i = np.arange(K)
    w = np.exp(-0.5 * ((i - k) / sigma) ** 2) * (np.abs(i - k) <= trunc)
    return w / w.sum()


def test_coord_distribution_losses_vs_numpy():
    rng = np.random.default_rng(5)
    s = rng.normal(0, 2, (3, 4, K)).astype(np.float32)
    kb = rng.integers(0, K, (3, 4))
    kb[0, 0], kb[0, 1] = 0, 999  # edges: the truncated Gaussian is one-sided
    mask = rng.random((3, 4)) < 0.7
    s64 = s.astype(np.float64)
    logp = s64 - np_lse(s64)[..., None]
    nll = -np.take_along_axis(logp, kb[..., None], -1)[..., 0]
    out, c = losses.coord_ce(s, kb, mask)  # float32 sums of positive terms vs float64: relative tolerances
    assert float(c) == mask.sum() and float(out) == pytest.approx((nll * mask).sum(), rel=1e-5)
    for tau, sigma, trunc in ((0.7, 1.0, 8), (1.0, 2.5, 3)):
        lpt = s64 / tau - np_lse(s64 / tau)[..., None]
        q = np.array([[np_gauss(k, sigma, trunc) for k in row] for row in kb])
        ref = (-(q * lpt).sum(-1) * mask).sum()
        assert float(losses.soft_ce(s, kb, mask, tau, sigma, trunc)[0]) == pytest.approx(ref, rel=1e-5)
        p = np.exp(lpt)
        w1ref = np.array([[sum(abs(p[i, j, :n + 1].sum() - q[i, j, :n + 1].sum()) for n in range(K)) / 999
                           for j in range(4)] for i in range(3)])
        assert float(losses.w1(s, kb, mask, tau, sigma, trunc)[0]) == pytest.approx((w1ref * mask).sum(), rel=1e-4)
    # sigma = 0: one-hot target; W1 to a point mass is E|c - c*|
    p = np_softmax(s64)
    w1_hard = (p * np.abs(np.arange(K) - kb[..., None])).sum(-1) / 999
    assert float(losses.w1(s, kb, mask, 1.0, sigma=0.0)[0]) == pytest.approx((w1_hard * mask).sum(), rel=1e-4)


def np_box_terms(p, t):
    """Vectorised numpy reference for 1-GIoU and 1-CIoU of canonicalised boxes."""
    def canon(b):
        return np.clip(np.stack([np.minimum(b[..., 0], b[..., 2]), np.minimum(b[..., 1], b[..., 3]),
                                 np.maximum(b[..., 0], b[..., 2]), np.maximum(b[..., 1], b[..., 3])], -1), 0, 1)
    p, t = canon(p), canon(t)
    wp, hp = p[..., 2] - p[..., 0], p[..., 3] - p[..., 1]
    wt, ht = t[..., 2] - t[..., 0], t[..., 3] - t[..., 1]
    iw = np.clip(np.minimum(p[..., 2], t[..., 2]) - np.maximum(p[..., 0], t[..., 0]), 0, None)
    ih = np.clip(np.minimum(p[..., 3], t[..., 3]) - np.maximum(p[..., 1], t[..., 1]), 0, None)
    inter = iw * ih
    union = wp * hp + wt * ht - inter
    iou = inter / (union + 1e-7)
    cw = np.maximum(p[..., 2], t[..., 2]) - np.minimum(p[..., 0], t[..., 0])
    ch = np.maximum(p[..., 3], t[..., 3]) - np.minimum(p[..., 1], t[..., 1])
    giou = iou - (cw * ch - union) / (cw * ch + 1e-7)
    rho2 = ((p[..., 0] + p[..., 2] - t[..., 0] - t[..., 2]) / 2) ** 2 + ((p[..., 1] + p[..., 3] - t[..., 1] - t[..., 3]) / 2) ** 2
    v = 4 / math.pi**2 * (np.arctan(wt / np.maximum(ht, 1e-7)) - np.arctan(wp / np.maximum(hp, 1e-7))) ** 2
    alpha = v / (1 - iou + v + 1e-7)
    return 1 - giou, 1 - (iou - rho2 / (cw**2 + ch**2 + 1e-7) - alpha * v)


def test_geometry_losses_vs_numpy():
    rng = np.random.default_rng(6)
    p = rng.uniform(-0.1, 1.1, (4, 5, 4))
    t = rng.uniform(0, 1, (4, 5, 4))
    valid = rng.random((4, 5)) < 0.6
    l1 = np.abs(p - t).sum(-1)
    d = np.abs(p - t)
    sl1 = np.where(d < 1, 0.5 * d**2, d - 0.5).sum(-1)
    g, ci = np_box_terms(p, t)
    pf, tf = p.astype(np.float32), t.astype(np.float32)
    for fn, ref in ((losses.l1, l1), (losses.smooth_l1, sl1), (losses.giou, g), (losses.ciou, ci)):
        s, c = fn(pf, tf, valid)
        assert float(c) == valid.sum()
        # float32 sums of ~12 non-negative terms of order 1 (each a few ulps off): rel 1e-5; abs 1e-5 of one term
        assert float(s) == pytest.approx((ref * valid).sum(), rel=1e-5, abs=1e-5), fn.__name__
    # smooth_l1 with beta < distances
    d2 = np.where(d < 0.1, 0.5 * d**2 / 0.1, d - 0.05).sum(-1)
    assert float(losses.smooth_l1(pf, tf, valid, beta=0.1)[0]) == pytest.approx((d2 * valid).sum(), rel=1e-5)


def _fd_check(f, x, rng, n_dirs=2, h=1e-6, rtol=1e-5):
    """Directional central differences vs forward-mode derivatives of a vector of losses, float64."""
    f = jax.jit(f)
    jvp = jax.jit(lambda x, v: jax.jvp(f, (x,), (v,))[1])
    for _ in range(n_dirs):
        v = jnp.asarray(rng.normal(size=x.shape))
        fd = np.asarray((f(x + h * v) - f(x - h * v)) / (2 * h))
        an = np.asarray(jvp(x, v))
        # float64: truncation h^2 f''' ~1e-12, rounding eps |f| / h ~1e-10 |f|; atol as a fraction of the largest term
        np.testing.assert_allclose(fd, an, rtol=rtol, atol=rtol * np.abs(an).max())
    # reverse mode agrees with forward mode (float64, other association: ~1e-15 relative)
    g = jax.jit(jax.jacrev(f))(x)
    np.testing.assert_allclose(np.tensordot(np.asarray(g), np.asarray(v), axes=v.ndim), an, rtol=1e-9,
                               atol=1e-12 * np.abs(an).max())


def test_gradients_vs_finite_differences():
    rng = np.random.default_rng(7)
    with enable_x64():
        s = jnp.asarray(rng.normal(0, 2, (2, 4, K)))
        kb = jnp.asarray(rng.integers(0, K, (2, 4)))
        mask = jnp.ones((2, 4), bool)
        tgt_box = jnp.asarray([[0.1, 0.2, 0.5, 0.7], [0.3, 0.3, 0.9, 0.6]])
        bv = jnp.ones((2,), bool)

        def coord_terms(x):
            b = expectation.expectation(x, 0.7)
            return jnp.stack([
                b.sum(), losses.coord_ce(x, kb, mask)[0], losses.soft_ce(x, kb, mask, 0.7, 1.0, 8)[0],
                losses.w1(x, kb, mask, 0.7)[0], losses.l1(b, tgt_box, bv)[0], losses.smooth_l1(b, tgt_box, bv)[0],
                losses.giou(b, tgt_box, bv)[0],
                # CIoU with alpha differentiated (the loss treats alpha as a constant, like torchvision)
                (1 - boxes.ciou(boxes.canonicalize(b), tgt_box, stop_alpha_grad=False)).sum()])

        _fd_check(coord_terms, s, rng)
        z = jnp.asarray(rng.normal(0, 2, (2, 3, 1040)))
        cm = jnp.asarray([[True, False, True], [False, True, False]])
        lm = jnp.ones((2, 3))
        t = jnp.asarray(rng.integers(0, 1040, (2, 3)))
        _fd_check(lambda x: jnp.stack([losses.gate(x, cm, 30, 0.7)[0], losses.text_gate(x, lm, cm, 30, 0.7)[0],
                                       losses.ce(x, t, lm, cm)[0]]), z, rng)


def test_finite_grads_degenerate_boxes_jit_vmap():
    tgt = jnp.asarray([[0.2, 0.2, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1], [0.0, 0.0, 1.0, 1.0], [0.4, 0.1, 0.4, 0.8]])
    pred = jnp.asarray([[0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5], [1.2, -0.3, 0.6, 0.6], [0.4, 0.1, 0.4, 0.8]])
    valid = jnp.ones(4, bool)
    fns = (losses.l1, losses.smooth_l1, losses.giou, losses.ciou)
    s = jnp.zeros((4, 4, K)).at[:, :, 0].set(80.0)  # extreme logits: all mass on bin 0

    @jax.jit
    def all_terms(pred, s):
        grads = [jax.grad(lambda p: fn(p, tgt, valid)[0])(pred) for fn in fns]
        # vmap over boxes gives the per-example terms
        per = [jax.vmap(lambda p, t: fn(p[None], t[None], jnp.ones(1, bool))[0])(pred, tgt) for fn in fns]
        full = [fn(pred, tgt, valid)[0] for fn in fns]
        gs = [jax.grad(lambda x: fn(expectation.expectation(x), tgt, valid)[0])(s) for fn in fns]
        return grads, per, full, gs

    grads, per, full, gs = all_terms(pred, s)
    for fn, g, p, f, g2 in zip(fns, grads, per, full, gs):
        assert bool(jnp.all(jnp.isfinite(g))) and bool(jnp.all(jnp.isfinite(g2))), fn.__name__
        # 4 non-negative float32 terms from other fusions, summed in another order: a few ulps relative
        assert float(p.sum()) == pytest.approx(float(f), rel=1e-5)
    # bf16 inputs: float32 math, float32 outputs
    out = losses.soft_ce(jnp.zeros((2, K), jnp.bfloat16), jnp.array([3, 4]), jnp.ones(2))
    assert out[0].dtype == jnp.float32 and float(out[0]) == pytest.approx(2 * math.log(K), rel=1e-5)
