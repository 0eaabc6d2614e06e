"""The spatial-linking module (model/spatial_linking.py) and the token geometry of model/inputs.py against numpy /
brute-force references: box masks, attention weights, residual update, empty and invalid boxes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coordexp_jax.model.config import tiny_config
from coordexp_jax.model.inputs import build_model_inputs, merged_token_rects
from coordexp_jax.model.spatial_linking import (LinkingConfig, SpatialLinking, heatmap, link_mask, linking_from_numpy,
                                                linking_to_numpy, token_geometry)

H = 16
_erf = np.vectorize(math.erf)


# ------------------------------------------------------------------------------------------- references
def np_mask(token_image, token_rect, pos, boxes, image):
    """Brute force [B, N, S]: tokens of the slot's image whose centre is inside the box, else (none inside) those
    overlapping it with positive area; nothing for an unusable slot."""
    B, S = token_image.shape
    N = pos.shape[1]
    out = np.zeros((B, N, S), bool)
    for b in range(B):
        for n in range(N):
            x1, y1, x2, y2 = boxes[b, n]
            if not (0 <= pos[b, n] < S and image[b, n] >= 0 and np.all(np.isfinite(boxes[b, n]))
                    and x2 > x1 and y2 > y1):
                continue
            centre, overlap = [], []
            for s in range(S):
                if token_image[b, s] != image[b, n] or token_image[b, s] < 0:
                    continue
                rx1, ry1, rx2, ry2 = token_rect[b, s]
                cx, cy = (rx1 + rx2) / 2, (ry1 + ry2) / 2
                if x1 <= cx <= x2 and y1 <= cy <= y2:
                    centre.append(s)
                if min(rx2, x2) - max(rx1, x1) > 0 and min(ry2, y2) - max(ry1, y1) > 0:
                    overlap.append(s)
            for s in (centre or overlap):
                out[b, n, s] = True
    return out


def np_module(t, cfg, h, mask, pos):
    """float64 numpy forward from the torch-layout tensors of `linking_to_numpy`: returns (h', weights)."""
    h = h.astype(np.float64)
    B, S, _ = h.shape
    N = pos.shape[1]
    nh, hd = cfg.heads, cfg.head_dim

    def rms(x, w):
        return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.eps)

    def lin(x, name):
        return x @ t[f"{name}.weight"].T.astype(np.float64) + t[f"{name}.bias"]

    out, weights = h.copy(), np.zeros((B, N, nh, S))
    for b in range(B):
        kv = rms(h[b], t["kv_norm.weight"])
        k, v = lin(kv, "key").reshape(S, nh, hd), lin(kv, "value").reshape(S, nh, hd)
        for n in range(N):
            sel = np.flatnonzero(mask[b, n])
            if sel.size == 0:
                continue
            q = lin(rms(h[b, pos[b, n]], t["q_norm.weight"]), "query").reshape(nh, hd)
            ctx = np.zeros((nh, hd))
            for j in range(nh):
                sc = k[sel, j] @ q[j] / math.sqrt(hd)
                p = np.exp(sc - sc.max())
                p /= p.sum()
                weights[b, n, j, sel] = p
                ctx[j] = p @ v[sel, j]
            c = ctx.reshape(-1)
            if cfg.refine_mlp:
                mu, var = c.mean(), c.var()
                ln = (c - mu) / np.sqrt(var + cfg.eps) * t["refine_norm.weight"] + t["refine_norm.bias"]
                a = lin(ln, "refine_fc1")
                c = c + lin(0.5 * a * (1 + _erf(a / math.sqrt(2))), "refine_fc2")
            out[b, pos[b, n]] += lin(c, "out")
    return out, weights


@nnx.jit(static_argnames="return_weights")
def _apply(m, h, ti, tr, links, return_weights=False):
    """The module under jit (eager op-by-op dispatch is slower than compiling these small graphs)."""
    return m(h, ti, tr, links, return_weights=return_weights)


def _random_module(cfg, seed):
    m = SpatialLinking(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    t = {k: (v + rng.standard_normal(v.shape).astype(np.float32) * 0.3) for k, v in linking_to_numpy(m).items()}
    return linking_from_numpy(cfg, t), t


def _geometry(B=2, S=24, seed=0):
    """Two images per row of 4x4 and 2x3 merged tokens (32 px cells) at fixed positions, text elsewhere."""
    rng = np.random.default_rng(seed)
    ti = np.full((B, S), -1, np.int32)
    tr = np.zeros((B, S, 4), np.float32)
    r0, r1 = merged_token_rects(1, 8, 8), merged_token_rects(1, 4, 6)
    for b in range(B):
        ti[b, 2:18], tr[b, 2:18] = 0, r0
        if b == 0:
            ti[b, 18:24][:6], tr[b, 18:24] = 1, r1
    h = rng.standard_normal((B, S, H)).astype(np.float32)
    return h, ti, tr


LINKS = dict(  # pos, box (pixels), image
    pos=np.array([[19, 20, 21, 22, 1, -1], [20, 21, 22, 23, 0, 1]], np.int32),
    boxes=np.array([
        [[0, 0, 64, 64], [40, 40, 127, 90], [35, 35, 45, 45], [0, 0, 96, 64], [200, 200, 300, 300], [0, 0, 50, 50]],
        [[0, 0, 128, 128], [33, 33, 33, 60], [np.nan, 0, 10, 10], [60, 60, 70, 70], [0, 0, 32, 32], [0, 0, 64, 64]],
    ], np.float32),
    # slot (0, 3) looks at image 1; (1, 5) names image 1, which row 1 does not have
    image=np.array([[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1]], np.int32),
)


# ------------------------------------------------------------------------------------------------- tests
def test_link_mask_matches_brute_force():
    _, ti, tr = _geometry()
    got = np.asarray(link_mask(jnp.asarray(ti), jnp.asarray(tr), **{k: jnp.asarray(v) for k, v in LINKS.items()}))
    want = np_mask(ti, tr, LINKS["pos"], LINKS["boxes"], LINKS["image"])
    np.testing.assert_array_equal(got, want)
    # the cases are what they claim: centre rule, fallback of a tiny box, empty/NaN/outside/absent-image slots
    assert want[0, 0].sum() == 4  # 64x64 box: the 2x2 cells whose centres lie inside
    assert want[0, 2].sum() == 1  # 10 px box inside one 32 px cell: no centre inside, the overlapped cell
    assert want[0, 3].sum() == 6 and set(np.flatnonzero(want[0, 3])) <= set(range(18, 24))  # image 1 only
    assert not want[0, 4].any() and not want[0, 5].any()  # outside the image; pos -1
    assert not want[1, 1].any() and not want[1, 2].any() and not want[1, 5].any()  # no area; NaN; no image 1


@pytest.mark.parametrize("refine", [True, False])
def test_module_matches_numpy(refine):
    cfg = LinkingConfig(hidden_size=H, heads=2, dim=8 if refine else 0, refine_mlp=refine, zero_init=False)
    m, t = _random_module(cfg, 1 + refine)
    h, ti, tr = _geometry()
    links = {k: jnp.asarray(v) for k, v in LINKS.items()}
    out, w = _apply(m, jnp.asarray(h), jnp.asarray(ti), jnp.asarray(tr), links, return_weights=True)
    mask = np_mask(ti, tr, LINKS["pos"], LINKS["boxes"], LINKS["image"])
    ref_out, ref_w = np_module(t, cfg, h, mask, LINKS["pos"])
    # float32 vs float64 through three 16-wide layers of O(1) values: a few float32 ulps of O(1)
    np.testing.assert_allclose(np.asarray(w), ref_w, atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5 * max(1.0, np.abs(ref_out).max()), rtol=0)
    w = np.asarray(w)
    usable = mask.any(-1)
    # weights: sum 1 over the selected tokens of a usable slot, exactly 0 outside the box and for empty slots
    np.testing.assert_allclose(w.sum(-1)[usable], 1.0, atol=1e-6)  # a float32 sum of <= 16 terms
    assert np.all(w[~np.broadcast_to(mask[:, :, None, :], w.shape)] == 0)
    # residual: every position that no usable slot points at is bit-identical
    touched = np.zeros(h.shape[:2], bool)
    for b, n in zip(*np.nonzero(usable)):
        touched[b, LINKS["pos"][b, n]] = True
    np.testing.assert_array_equal(np.asarray(out)[~touched], h[~touched])
    assert np.all(np.abs(np.asarray(out)[touched] - h[touched]).max(-1) > 0)


def test_empty_links_change_nothing_and_give_finite_gradients():
    cfg = LinkingConfig(hidden_size=H, heads=4, zero_init=False)
    m, _ = _random_module(cfg, 3)
    h, ti, tr = _geometry()
    empty = dict(pos=jnp.array([[-1, 5], [3, 30]]), image=jnp.array([[0, -1], [0, 0]]),
                 boxes=jnp.array([[[0, 0, 64, 64]] * 2, [[5, 5, 5, 50], [0, 0, 64, 64]]], jnp.float32))
    out, w = _apply(m, jnp.asarray(h), jnp.asarray(ti), jnp.asarray(tr), empty, return_weights=True)
    np.testing.assert_array_equal(np.asarray(out), h)
    assert np.all(np.asarray(w) == 0)
    graphdef, state = nnx.split(m)

    def loss(state, h):
        return jnp.sum(nnx.merge(graphdef, state)(h, jnp.asarray(ti), jnp.asarray(tr), empty) ** 2)

    gs, gh = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, jnp.asarray(h))
    for g in jax.tree.leaves(gs) + [gh]:
        assert np.all(np.isfinite(np.asarray(g)))
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(gs))  # nothing used the module
    # a text-only row (no image token at all) with a box: also nothing, no NaN
    out = _apply(m, jnp.asarray(h), jnp.full(ti.shape, -1), jnp.zeros_like(jnp.asarray(tr)),
                 {k: jnp.asarray(v) for k, v in LINKS.items()})
    np.testing.assert_array_equal(np.asarray(out), h)


def test_zero_output_projection_adds_exactly_zero_and_dropout_only_with_rng():
    cfg = LinkingConfig(hidden_size=H, heads=2, dropout=0.5)  # zero_init: output projection 0
    m = SpatialLinking(cfg, rngs=nnx.Rngs(0))
    h, ti, tr = _geometry()
    links = {k: jnp.asarray(v) for k, v in LINKS.items()}
    np.testing.assert_array_equal(np.asarray(_apply(m, jnp.asarray(h), jnp.asarray(ti), jnp.asarray(tr), links)), h)
    m2, _ = _random_module(LinkingConfig(hidden_size=H, heads=2, dropout=0.5, zero_init=False), 4)
    args = (jnp.asarray(h), jnp.asarray(ti), jnp.asarray(tr))
    det = np.asarray(_apply(m2, *args, links))
    np.testing.assert_array_equal(det, np.asarray(_apply(m2, *args, links)))  # no rng: deterministic
    d1 = np.asarray(_apply(m2, *args, dict(links, rng=jax.random.key(1))))
    d2 = np.asarray(_apply(m2, *args, dict(links, rng=jax.random.key(1))))
    np.testing.assert_array_equal(d1, d2)  # a given key: reproducible
    assert np.abs(d1 - det).max() > 1e-3  # and a different forward (half the weights dropped)


def test_token_geometry_matches_brute_force_several_images_and_padding():
    """visual_image / vision_token_rect from build_model_inputs vs walking the placeholders of each row: the k-th
    image run of a row is image k, and its j-th placeholder is merged cell (j // (w/2), j % (w/2)) of 32 px."""
    cfg = tiny_config()
    img, vs, ve = cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id
    grids = [(1, 4, 6), (1, 2, 2), (1, 6, 4)]  # row 0: two images; row 1: one
    toks = [g[1] * g[2] // 4 for g in grids]
    rows = [[5, vs] + [img] * toks[0] + [ve, 7, vs] + [img] * toks[1] + [ve, 9],
            [vs] + [img] * toks[2] + [ve, 11, 12]]
    S = max(map(len, rows)) + 2
    ids = np.zeros((2, S), np.int32)
    am = np.zeros((2, S), np.int32)
    for b, r in enumerate(rows):  # left padding
        ids[b, S - len(r):], am[b, S - len(r):] = r, 1
    pvs = [np.zeros((g[1] * g[2], cfg.vision.patch_dim), np.float32) for g in grids]
    p = cfg.vision.patch_size
    for pack in (False, True):
        inp = build_model_inputs(ids, am, grids, pvs, config=cfg, pack=pack, patches_per_slot=64 if pack else None)
        ti, tr = (np.asarray(x) for x in token_geometry({k: jnp.asarray(v) for k, v in inp.items()}))
        want_i = np.full(ids.shape, -1)
        want_r = np.zeros(ids.shape + (4,))
        g = iter(grids)
        for b in range(2):
            k, s = -1, 0
            while s < S:
                if ids[b, s] != img:
                    s += 1
                    continue
                k += 1
                _, gh, gw = next(g)
                for j in range(gh * gw // 4):
                    r, c = divmod(j, gw // 2)
                    want_i[b, s + j] = k
                    want_r[b, s + j] = (c * 2 * p, r * 2 * p, (c + 1) * 2 * p, (r + 1) * 2 * p)
                s += gh * gw // 4
        np.testing.assert_array_equal(ti, want_i)
        np.testing.assert_array_equal(tr, want_r)
    # each image's rectangles tile it exactly: w * patch x h * patch pixels, no overlap
    for (_, gh, gw), sel in zip(grids, [(0, 0), (0, 1), (1, 0)]):
        cover = np.zeros((gh * p, gw * p), int)
        for x1, y1, x2, y2 in tr[sel[0]][ti[sel[0]] == sel[1]].astype(int):
            cover[y1:y2, x1:x2] += 1
        assert np.all(cover == 1)


def test_heatmap_mass_inside_box():
    _, ti, tr = _geometry()
    mask = np_mask(ti, tr, LINKS["pos"], LINKS["boxes"], LINKS["image"])
    w = mask[0, 0].astype(np.float32) / mask[0, 0].sum()
    hm = heatmap(np.stack([w, w]), ti[0], tr[0], 0, 128, 128)
    assert abs(hm.sum() - 1.0) < 1e-5  # the painted map keeps the attention mass (float32 sum of 16k pixels)
    assert abs(hm[:64, :64].sum() - 1.0) < 1e-5  # all of it inside the 64x64 box
