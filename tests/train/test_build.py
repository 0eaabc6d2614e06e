"""Model construction options: the 2-D sinusoidal ViT position table, and init options apply to random init only
(a loaded checkpoint keeps its trained rows)."""
import numpy as np
import pytest

from coordexp_jax.train import build, config as C
from coordexp_jax.weights.checkpoint import save_checkpoint


def test_sinusoidal_grid_similarity_falls_with_grid_distance():
    g = build.sinusoidal_grid(64, 32, 0.5)
    # float32 table scaled in float64 to std 0.5: its float32 std is off by ~1e-7 relative
    assert g.shape == (64, 32) and g.std() == pytest.approx(0.5, rel=1e-5)
    sim = np.corrcoef(g)
    # Cell (3, 3) = row 27: its right and lower neighbours are more similar than cells 3 steps away, in both axes.
    assert sim[27, 28] > sim[27, 30] and sim[27, 35] > sim[27, 51]
    assert len({tuple(np.round(r, 6)) for r in g}) == 64  # every cell distinct


def test_init_options_apply_to_random_init_only(tmp_path):
    cfg = C.base_config()
    cfg.model.coord_init = "sinusoidal"
    cfg.model.vision_pos_init = "sinusoidal"
    cfg = C.validate(cfg)
    ids = build.token_ids(cfg)
    mc = build.model_config(cfg, ids)
    fresh = build.make_model_fn(cfg, mc, ids)[0]()
    # the float32 tables are copied into the parameters (exact here); atol 1e-5 of each table's std
    np.testing.assert_allclose(np.asarray(fresh.visual.pos_embed[...]), build.sinusoidal_grid(64, 32, 0.5),
                               atol=1e-5 * 0.5)
    emb = np.asarray(fresh.language_model.embed_tokens.embedding[...])
    np.testing.assert_allclose(emb[ids.coord_start:ids.coord_start + 1000],
                               build.sinusoidal_rows(1000, mc.text.hidden_size, 0.02), atol=1e-5 * 0.02)
    # A checkpoint with other rows: loading it with the same options keeps its rows.
    fresh.visual.pos_embed[...] = fresh.visual.pos_embed[...] * 3.0
    fresh.language_model.embed_tokens.embedding[...] = fresh.language_model.embed_tokens.embedding[...] + 1.0
    save_checkpoint(str(tmp_path / "ck"), fresh, mc)
    cfg.model.checkpoint = str(tmp_path / "ck")
    loaded = build.make_model_fn(cfg, build.model_config(cfg, ids), ids)[0]()
    np.testing.assert_array_equal(np.asarray(loaded.visual.pos_embed[...]), np.asarray(fresh.visual.pos_embed[...]))
    np.testing.assert_array_equal(np.asarray(loaded.language_model.embed_tokens.embedding[...]),
                                  np.asarray(fresh.language_model.embed_tokens.embedding[...]))
