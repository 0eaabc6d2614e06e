"""The synthetic HOI set (data/hoi_synthetic.py): actions match their geometry (checked independently of the
generator's own rule), several pairs per image, determinism, rows that fit the demo's text bucket, and batches
with `links` through the training config (data.kind 'hoi')."""

import json

import numpy as np
import pytest
from PIL import Image

from coordexp_jax.data import hoi
from coordexp_jax.data import hoi_synthetic as hs

CFG = hs.HOISyntheticConfig()


def _classify(p, o):
    """An independent reading of the module's table (written from the docstring, not calling action_of_boxes)."""
    ph = p[3] - p[1]
    overlap_x = min(p[2], o[2]) - max(p[0], o[0])  # > 0: the boxes share columns
    if o[1] > p[1] and p[3] > o[1] and p[3] < o[3] - 0.1 * (o[3] - o[1]) and o[0] < (p[0] + p[2]) / 2 < o[2]:
        return "riding"
    if -overlap_x >= 0.1 * ph:
        return "looking at"
    if overlap_x > 0 and 0.2 * ph <= (o[1] + o[3]) / 2 - p[1] <= 0.65 * ph and o[3] < p[3] - 0.2 * ph:
        return "holding"
    if overlap_x > 0 and abs(o[3] - p[3]) <= 0.1 * ph and o[1] > p[1] + 0.5 * ph:
        return "kicking"
    return None


def _background_like(px, ref):
    """Pixels within 40 levels (per channel) of the background colour `ref` (the image's median; gradient 12 +
    noise 4 sigma = 24 stay inside) or of the ground line (0.55 ref)."""
    px = px.astype(float)
    return (np.abs(px - ref).max(-1) < 40) | (np.abs(px - 0.55 * ref).max(-1) < 40)


def test_actions_match_their_geometry():
    counts = {a: 0 for a in hs.ACTIONS}
    for i in range(120):
        arr, pairs = hs.make_image(hs.image_rng(0, "train", i), CFG)
        assert CFG.min_pairs <= len(pairs) <= CFG.max_pairs
        ref = np.median(arr.reshape(-1, 3), axis=0)
        assert len({(p["action"], p["object"]) for p in pairs}) == len(pairs)  # a grounding query has one answer
        for p in pairs:
            counts[p["action"]] += 1
            pb, ob = p["person_box"], p["object_box"]
            assert _classify(pb, ob) == p["action"], (i, p)
            assert p["action"] in hs.OBJECT_ACTIONS[p["object"]]
            if p["action"] == "looking at":  # no contact in the pixels: the columns between the boxes are background
                lo, hi = (pb[2], ob[0]) if ob[0] >= pb[2] else (ob[2], pb[0])
                band = arr[max(pb[1], ob[1]):min(pb[3], ob[3]), lo:hi]
                assert band.size and _background_like(band, ref).mean() > 0.99, (i, p)
            # tight boxes: the drawn figure reaches every side of its box (a non-background pixel on each edge)
            for b in (pb, ob):
                crop = arr[b[1]:b[3], b[0]:b[2]]
                fg = ~_background_like(crop, ref)
                assert fg[0].any() and fg[-1].any() and fg[:, 0].any() and fg[:, -1].any(), (i, p)
        # pairs never touch each other
        for j, p in enumerate(pairs):
            for q in pairs[j + 1:]:
                u, v = hoi.union_box(p["person_box"], p["object_box"]), hoi.union_box(q["person_box"], q["object_box"])
                assert min(u[2], v[2]) <= max(u[0], v[0]) or min(u[3], v[3]) <= max(u[1], v[1])
    assert min(counts.values()) >= 20, counts


def test_generator_is_deterministic_and_rule_agrees():
    a, pa = hs.make_image(hs.image_rng(3, "val", 7), CFG)
    b, pb = hs.make_image(hs.image_rng(3, "val", 7), CFG)
    assert np.array_equal(a, b) and pa == pb
    c, _ = hs.make_image(hs.image_rng(3, "val", 8), CFG)
    assert not np.array_equal(a, c)
    assert all(hs.action_of_boxes(p["person_box"], p["object_box"]) == p["action"] for p in pa)


def test_dataset_records_rows_fit(tmp_path):
    from coordexp_jax.data.image import ImageConfig
    from coordexp_jax.data.prompts import PromptConfig
    from coordexp_jax.data.tokenizer import SMALL_TOKENIZER_DIR, decode_ids, load_tokenizer

    cfg = hs.HOISyntheticConfig(tool_ratio=0.5)
    paths = hs.ensure_dataset(str(tmp_path / "s"), 6, 2, seed=1, cfg=cfg)
    assert hs.ensure_dataset(str(tmp_path / "s"), 6, 2, seed=1, cfg=cfg) == paths  # reused
    with pytest.raises(ValueError, match="num_train"):
        hs.ensure_dataset(str(tmp_path / "s"), 7, 2, seed=1, cfg=cfg)
    ref, rep = hoi.read_hoi_file(paths["train"]["referring"])
    grd, _ = hoi.read_hoi_file(paths["train"]["grounding"])
    assert rep.records_kept == rep.records_read == len(ref) == len(grd) >= 12
    assert any(len(r.images) == 2 for r in ref) and any(len(r.images) == 1 for r in ref)
    tok = load_tokenizer(SMALL_TOKENIZER_DIR)
    pc = PromptConfig(image=ImageConfig(min_pixels=4096, max_pixels=160 * 160), max_text_len=1024, text_bucket=1024,
                      patches_per_slot=100)
    lens = {}
    for form in ("text", "tokens"):
        enc = hoi.HOIEncoder(pc, hoi.HOIConfig(box_text=form, max_images=2), tokenizer=tok)
        for r in ref + grd:
            s = enc(r)
            key = (form, r.task_type, len(r.images))
            lens[key] = max(lens.get(key, 0), len(s["input_ids"]))
            m = r.metadata
            if r.task_type == "referring":
                # the answer is the pair's action and object; the links' boxes are its boxes (grid rounding only)
                assert decode_ids(tok, s["targets"][s["loss_mask"] > 0]).endswith(f"{m['action']} {m['object']}"
                                                                                   "<|im_end|>")
                # the records write the 0..1000 grid (half a step of rounding); the tokens form rounds that again
                # to the bins (another half step of 1/999), in pixels of the 160-px image
                grid = (0.5 / 1000 + (0.5 / 999 if form == "tokens" else 0.0)) * 160
                np.testing.assert_allclose(s["link_boxes"][0], m["person_box"], atol=grid + 1e-3)
                np.testing.assert_allclose(s["link_boxes"][1], m["object_box"], atol=grid + 1e-3)
                np.testing.assert_allclose(s["link_boxes"][2], hoi.union_box(m["person_box"], m["object_box"]),
                                           atol=grid + 1e-3)
    # the demo's buckets: single-image rows fit 128 tokens in the tokens form and 256 in the text form
    assert max(v for (f, t, n), v in lens.items() if f == "tokens" and n == 1) <= 128, lens
    assert max(v for (f, t, n), v in lens.items() if f == "text") <= 256, lens


def test_training_config_gives_batches_with_links(tmp_path, monkeypatch):
    from coordexp_jax.train import build
    from coordexp_jax.train.config import ConfigError, base_config, validate

    monkeypatch.setenv("COORDEXP_CACHE", str(tmp_path))
    c = base_config()
    c.data.kind = "hoi"
    c.data.image_size = 160
    c.data.num_train = 4
    c.data.num_eval = 2
    c.data.seq_len = 256
    c.data.batch_size = 4
    c.data.hoi.box_text = "tokens"
    c.data.hoi.grounding_weight = 0.0
    c = validate(c)
    tdir = build.tokenizer_dir(c)
    ids = build.token_ids(c)
    mc = build.model_config(c, ids)
    it, eval_fn, eval_recs = hoi.build_train_data(c, build.prompt_config(c, mc), mc, tdir, 4, 2)
    state = it.get_state()
    b = next(it)
    it.set_state(state)  # exact resume: the same batch again
    again = next(it)
    assert all(np.array_equal(b[k], again[k]) for k in ("input_ids", "pixel_values")) and all(
        np.array_equal(b["links"][k], again["links"][k]) for k in b["links"])
    L = b["links"]
    assert L["pos"].shape == (4, hoi.HOIConfig().max_boxes) and b["input_ids"].shape == (4, 256)
    assert (L["kind"][:, :3] == [0, 1, 2]).all()  # referring only (grounding weight 0): person, object, union
    rows = np.arange(4)[:, None]
    assert (b["input_ids"][rows, L["pos"][:, :3]] == _box_end(tdir)).all()
    assert eval_recs and all(r.task_type == "referring" for r in eval_recs)
    bad = base_config()
    bad.data.hoi.box_text = "json"
    with pytest.raises(ConfigError, match="data.hoi.box_text"):
        validate(bad)


def _box_end(tdir):
    from coordexp_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(tdir).convert_tokens_to_ids("<|box_end|>")
