"""Prompts and sample encoding: chat format, label mask, coordinate targets, box slots, collate, prompt-only batches."""
import numpy as np
import pytest

from coordexp_jax.coord import codec, protocols
from coordexp_jax.data import image as I
from coordexp_jax.data import prompts as Pr
from coordexp_jax.data import records as R
from coordexp_jax.data import synthetic as S
from coordexp_jax.data import tokenizer as T


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    paths = S.write_split(str(d), "train", 12, seed=2)
    recs, _ = R.read_jsonl(paths["jsonl"])
    g, _ = R.read_jsonl(paths["grounding"])
    return recs, g


@pytest.fixture(scope="module")
def tok():
    return T.small_tokenizer()


CFG = Pr.PromptConfig(image=I.ImageConfig(min_pixels=32 * 32, max_pixels=160 * 160), max_objects=3)


def _answer_text(objs, protocol):
    """Independent rendering of the expected answer (objects sorted by (y1, x1) of their bins)."""
    items = sorted(((codec.box_to_bins(np.asarray(o.box)), o.desc) for o in objs),
                   key=lambda x: (x[0][1], x[0][0], x[0][2], x[0][3]))
    if protocol == "tags":
        return "".join(f"<obj><desc>{d}</desc><box>" + "".join(f"<|coord_{k}|>" for k in b) + "</box></obj>"
                       for b, d in items)
    return '{"objects": [' + ", ".join(
        '{"desc": "%s", "bbox_2d": [%s]}' % (d, ", ".join(f"<|coord_{k}|>" for k in b)) for b, d in items) + "]}"


@pytest.mark.parametrize("protocol", ["coordjson", "tags"])
def test_sample_text_masks_and_coord_targets(data, tok, protocol):
    recs, _ = data
    cfg = Pr.PromptConfig(protocol=protocol, image=CFG.image, max_objects=3, system_prompt="You are a helpful assistant.")
    enc = Pr.SampleEncoder(cfg, tok)
    ids_ = enc.token_ids
    for r in recs[:6]:
        s = enc(r)
        pv, grid, _ = I.process_image(I.load_image(r.image), cfg.image)
        np.testing.assert_array_equal(s["pixel_values"], pv)
        n_img = grid[1] * grid[2] // 4
        instr = cfg.instruction("detection")
        want = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|image_pad|>" * n_img + f"<|vision_end|>{instr}<|im_end|>\n<|im_start|>assistant\n"
                + _answer_text(r.objects, protocol) + "<|im_end|>")
        assert T.decode_ids(tok, s["input_ids"]) == want
        ids, tg, lm = s["input_ids"], s["targets"], s["loss_mask"]
        np.testing.assert_array_equal(tg[:-1], ids[1:])
        # loss exactly on the answer (closing and <|im_end|> included)
        assert T.decode_ids(tok, tg[lm > 0]) == _answer_text(r.objects, protocol) + "<|im_end|>"
        assert lm[-1] == 0 and tg[lm > 0][-1] == ids_.im_end
        # box slots: the targets at box_pos are the codec's bins of box_target (emission order), first M objects
        m = min(len(r.objects), cfg.max_objects)
        assert s["box_pos"].shape == (m, 4) and s["num_objects"] == len(r.objects)
        kb = ids_.bin_of(tg[s["box_pos"]])
        np.testing.assert_array_equal(kb, codec.box_to_bins(s["box_target"].astype(np.float64)))
        # half a bin, plus 1e-6 for box_target's float32 storage (<= 6e-8 on [0, 1])
        assert np.abs(codec.bins_to_box(kb) - s["box_target"]).max() <= 0.5 / 999 + 1e-6
        assert (lm[s["box_pos"]] == 1).all()
        # the protocol parser reads the answer back: all objects, the same bins
        start = int(np.argmax(lm > 0)) + 1
        res = protocols.parse(ids[start:], tok, ids_, protocol)
        assert res.num_dropped == 0 and len(res.objects) == len(r.objects)
        np.testing.assert_array_equal(res.positions()[:m] + start - 1, s["box_pos"])


def test_grounding_and_counting_and_prompt_override(data, tok):
    recs, g = data
    enc = Pr.SampleEncoder(CFG, tok)
    s = enc(g[0])
    text = T.decode_ids(tok, s["input_ids"])
    assert f"give its bounding box: {g[0].objects[0].desc}<|im_end|>" in text
    assert len(s["box_pos"]) == 1
    import dataclasses

    cnt = dataclasses.replace(recs[0], task="counting")
    s = enc(cnt)
    body = T.decode_ids(tok, s["targets"][s["loss_mask"] > 0])
    assert body.startswith('{"count": %d, "points": [[' % len(cnt.objects)) and body.endswith("]]}<|im_end|>")
    assert len(s["box_pos"]) == 0
    res = protocols.parse_count(s["targets"][s["loss_mask"] > 0], tok, enc.token_ids)
    assert res.count == len(cnt.objects) and res.closed
    own = dataclasses.replace(recs[1], prompt="List the shapes.")
    assert "<|vision_end|>List the shapes.<|im_end|>" in T.decode_ids(tok, enc(own)["input_ids"])
    bad = dataclasses.replace(recs[1], task="grounding")
    if len({o.desc for o in bad.objects}) > 1:
        with pytest.raises(Pr.SampleError, match="different descs"):
            enc(bad)


def test_unreadable_image_and_too_long_are_dropped(data, tok, tmp_path):
    import dataclasses

    recs, _ = data
    enc = Pr.SampleEncoder(dataclasses.replace(CFG, max_text_len=40), tok)
    assert enc(recs[0]) is None and enc.counts == {"too_long": 1}
    (tmp_path / "t.png").write_bytes(open(recs[0].image, "rb").read()[:300])
    enc = Pr.SampleEncoder(CFG, tok)
    assert enc(dataclasses.replace(recs[0], image=str(tmp_path / "t.png"))) is None
    assert enc.counts == {"unreadable_image": 1}


def test_collate_static_shapes_and_prompt_batch(data, tok):
    recs, _ = data
    enc = Pr.SampleEncoder(CFG, tok)
    samples = [enc(r) for r in recs[:3]]
    coll = Pr.Collator(CFG, enc.token_ids, Pr.released_model_config(CFG, enc.token_ids))
    b = coll(samples)
    B, S_ = b["input_ids"].shape
    L = [len(s["input_ids"]) for s in samples]
    assert S_ == Pr.bucket_len(max(L), CFG) and S_ & (S_ - 1) == 0
    P = b["pixel_values"].shape[1]
    assert b["pixel_values"].shape == (3, P, 1536) and P % 4 == 0
    for i, s in enumerate(samples):
        n = L[i]
        assert b["attention_mask"][i].sum() == n and (b["loss_mask"][i, n:] == 0).all()
        np.testing.assert_array_equal(b["input_ids"][i, :n], s["input_ids"])
        vi = b["visual_index"][i][b["input_ids"][i] == enc.token_ids.image_pad]
        np.testing.assert_array_equal(vi, i * P // 4 + np.arange(len(vi)))  # slot i holds sample i's image
        np.testing.assert_array_equal(b["pixel_values"][i, :len(s["pixel_values"])], s["pixel_values"])
        m = len(s["box_pos"])
        assert b["box_valid"][i].sum() == m and (b["box_pos"][i, :m] == s["box_pos"]).all()
        # targets at box slots are coordinate bins
        assert b["coord_mask"][i][b["box_pos"][i, :m]].all()
    assert b["coord_mask"].sum() == 4 * sum(s["num_objects"] for s in samples)
    # prompt-only batch: left-padded, ends with the generation prompt, the same 3-D positions as training rows
    pb = Pr.encode_prompts(recs[:3], enc, model_config=Pr.released_model_config(enc.cfg, enc.token_ids))
    Sp = pb["input_ids"].shape[1]
    for i in range(3):
        n = int(pb["prompt_lengths"][i])
        assert pb["attention_mask"][i, : Sp - n].sum() == 0
        assert T.decode_ids(tok, pb["input_ids"][i, -3:]) == "<|im_start|>assistant\n"
        np.testing.assert_array_equal(pb["input_ids"][i, Sp - n:], b["input_ids"][i, :n])
        np.testing.assert_array_equal(pb["positions"][:, i, Sp - n:], b["positions"][:, i, :n])
        assert pb["rope_deltas"][i] == b["rope_deltas"][i] - 0  # deltas depend only on the image run
    for k in ("pixel_values", "vision_segment_ids", "vision_pos_taps", "vision_pos_weights", "vision_rope_rc"):
        np.testing.assert_array_equal(pb[k], b[k])


def test_rope_positions_follow_the_image_grid(data, tok):
    """Text after the image continues at start + max(gh, gw)/2 (spec §3.4), checked by hand on one row."""
    recs, _ = data
    enc = Pr.SampleEncoder(CFG, tok)
    s = enc(recs[0])
    b = Pr.Collator(CFG, enc.token_ids, Pr.released_model_config(CFG, enc.token_ids))([s])
    ids = b["input_ids"][0]
    img = np.flatnonzero(ids == enc.token_ids.image_pad)
    st = img[0]
    gh, gw = s["grid_thw"][1] // 2, s["grid_thw"][2] // 2
    pos = b["positions"][:, 0]
    np.testing.assert_array_equal(pos[:, :st], np.broadcast_to(np.arange(st), (3, st)))
    np.testing.assert_array_equal(pos[1, img], st + np.repeat(np.arange(gh), gw))
    np.testing.assert_array_equal(pos[2, img], st + np.tile(np.arange(gw), gh))
    after = img[-1] + 1
    n = int(b["attention_mask"][0].sum())
    np.testing.assert_array_equal(pos[0, after:n], st + max(gh, gw) + np.arange(n - after))


def test_pipeline_end_to_end_resume(data, tok, tmp_path):
    """Real samples through Grain (fusion of detection + grounding), N batches, state, M more == restored M."""
    from coordexp_jax.data import pipeline as P

    recs, g = data
    enc = Pr.SampleEncoder(Pr.PromptConfig(image=CFG.image, order="random"), tok)
    coll = Pr.Collator(enc.cfg, enc.token_ids, Pr.released_model_config(enc.cfg, enc.token_ids))
    ds = P.build_dataset({"det": recs, "grd": g}, {"det": 2.0, "grd": 1.0}, transform=enc, batch_size=2,
                         batch_fn=coll, seed=0)
    it = P.DataIterator(ds, {})
    [next(it) for _ in range(3)]
    st = it.get_state()
    want = [next(it) for _ in range(3)]
    it2 = P.DataIterator(ds, {})
    it2.set_state(st)
    for w in want:
        got = next(it2)
        assert got.keys() == w.keys()
        for k in w:
            np.testing.assert_array_equal(got[k], w[k], err_msg=k)


def test_model_config_is_required_for_vision_inputs():
    """The vision index arrays depend on the model's pos-embed table: no silent default (a released-size default
    once gave a tiny model out-of-range taps and NaN features)."""
    ids = T.token_ids_from_tokenizer(T.small_tokenizer())
    with pytest.raises(ValueError, match="model_config is required"):
        Pr.Collator(CFG, ids, None)
