"""HOI records (data/hoi.py): the seed's record shapes, validation, box text, loss mask, and the `links` batch key."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from coordexp_jax.data import hoi
from coordexp_jax.data.image import ImageConfig
from coordexp_jax.data.prompts import PromptConfig
from coordexp_jax.data.records import RecordError, ValidationReport
from coordexp_jax.data.tokenizer import SMALL_TOKENIZER_DIR, decode_ids, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SMALL_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def img_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hoi_imgs")
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a.png": (200, 150), "b.png": (64, 96)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / name)
    return d


def _model_config(tok):
    from coordexp_jax.model.config import ModelConfig, VisionConfig
    from coordexp_jax.data.tokenizer import token_ids_from_tokenizer

    ids = token_ids_from_tokenizer(tok)
    return ModelConfig(vision=VisionConfig(patch_size=16, temporal_patch_size=2, spatial_merge_size=2),
                       image_token_id=ids.image_pad, video_token_id=ids.video_pad)


PCFG = PromptConfig(image=ImageConfig(min_pixels=32 * 32 * 4, max_pixels=128 * 128), max_text_len=512,
                    text_bucket=512, patches_per_slot=64)

REFERRING = {
    "messages": [{"role": "system", "content": "You are a helpful assistant."},
                 {"role": "user", "content": "<image>What is the person <|box_start|>(100,200),(400,900)<|box_end|> "
                                             "doing with <|box_start|>(350,500),(700,800)<|box_end|>?"},
                 {"role": "assistant", "content": "riding bicycle"}],
    "images": ["a.png"], "refer_boxes": [[[100, 200, 400, 900]], [[350, 500, 700, 800]]], "task_type": "referring"}
GROUNDING = {
    "messages": [{"role": "user", "content": "<image>Who is riding a bicycle?"},
                 {"role": "assistant", "content": "<|object_ref_start|>person<|object_ref_end|><|box_start|>(100,200),"
                                                  "(400,900)<|box_end|><|object_ref_start|>bicycle<|object_ref_end|>"
                                                  "<|box_start|>(350,500),(700,800)<|box_end|>"}],
    "images": ["a.png"], "task_type": "grounding"}
TOOL = {
    "messages": [{"role": "system", "content": "You are helpful.\n<tools>zoom_in</tools>"},
                 {"role": "user", "content": "<image> What action is the person <|box_start|>(100,200),(400,900)"
                                             "<|box_end|> doing with <|box_start|>(350,500),(700,800)<|box_end|>?"},
                 {"role": "assistant",
                  "content": "<think>small</think>\n<tool_call>{\"name\": \"zoom_in\"}</tool_call>"},
                 {"role": "user", "content": "<image> (zoomed) the cup <|box_start|>(0,0),(500,500)<|box_end|>"},
                 {"role": "assistant", "content": "<think>ok</think>\n<answer>holding cup</answer>"}],
    "images": ["a.png", "b.png"], "uses_tool": True}


def _parse(rec, img_dir, **kw):
    return hoi.parse_hoi_record(json.loads(json.dumps(rec)), where="t.jsonl:1", image_root=str(img_dir), **kw)


# ----------------------------------------------------------------------------------------------- box text
def test_box_text_round_trip():
    rng = np.random.default_rng(1)
    for _ in range(200):
        a, b = np.sort(rng.uniform(0, 1, (2, 2)), axis=0)
        box = np.asarray([a[0], a[1], b[0], b[1]])
        t = hoi.format_box(box, "text")
        assert re.fullmatch(r"<\|box_start\|>\(\d+,\d+\),\(\d+,\d+\)<\|box_end\|>", t)
        (m,) = hoi.parse_box_mentions("x " + t + " y")
        np.testing.assert_array_equal(m.values, np.rint(box * 1000).astype(int))  # the seed's 0..1000 grid
        assert np.abs(m.norm() - box).max() <= 0.5 / 1000 + 1e-12  # rounding to the grid: at most half a unit
        (k,) = hoi.parse_box_mentions(hoi.format_box(box, "tokens"))
        np.testing.assert_array_equal(k.values, np.rint(box * 999).astype(int))
        assert np.abs(k.norm() - box).max() <= 0.5 / 999 + 1e-12
    msgs = TOOL["messages"]
    assert hoi.extract_refer_boxes(msgs) == [[100, 200, 400, 900], [350, 500, 700, 800], [0, 0, 500, 500]]
    for bad in ("<|box_start|>(1,2),(3)<|box_end|>", "<|box_start|>(1,2),(3,4)", "(1,2)<|box_end|>",
                "<|box_start|>(1,2),(3,1001)<|box_end|>", "<|box_start|>(1.5,2),(3,4)<|box_end|>"):
        with pytest.raises(hoi.BoxTextError):
            hoi.parse_box_mentions(bad)


# ----------------------------------------------------------------------------------------------- records
def test_record_shapes_parse(img_dir, tmp_path):
    r = _parse(REFERRING, img_dir)
    assert r.task_type == "referring" and r.sizes == ((200, 150),) and len(r.turns) == 3
    pb = r.prompt_boxes()
    assert [p.kind for p in pb] == [hoi.PERSON, hoi.OBJECT] and all(p.image == 0 for p in pb)
    np.testing.assert_allclose(pb[0].box, [0.1, 0.2, 0.4, 0.9])
    g = _parse(GROUNDING, img_dir)
    assert g.prompt_boxes() == [] and [lb for lb, _ in g.answer_boxes()] == ["person", "bicycle"]
    t = _parse(TOOL, img_dir)
    assert t.extra == {"uses_tool": True} and t.sizes == ((200, 150), (64, 96))
    assert [(p.kind, p.image) for p in t.prompt_boxes()] == [(0, 0), (1, 0), (3, 1)]  # the crop's box: image 1
    # a JSON list file (the seed's datasets) with one bad record, skipped by policy and counted
    bad = dict(REFERRING, messages=REFERRING["messages"][:2])
    p = tmp_path / "data.json"
    p.write_text(json.dumps([REFERRING, bad, TOOL]))
    recs, rep = hoi.read_hoi_file(str(p), image_root=str(img_dir), policy={"bad_value": "skip"})
    assert len(recs) == 2 and rep.counts["bad_value"] == 1 and f"{p}:[1]" in rep.examples["bad_value"][0]


@pytest.mark.parametrize("change,reason", [
    (lambda r: r.pop("messages"), "missing_field"),
    (lambda r: r.update(images=["a.png", "b.png"]), "bad_value"),  # 1 <image> for 2 images
    (lambda r: r["messages"][1].update(content="<image><|box_start|>(1,2),(3)<|box_end|>"), "bad_value"),
    (lambda r: r.update(refer_boxes=[[100, 200, 400, 900]]), "bad_value"),  # 1 refer box, 2 in the text
    (lambda r: r.update(refer_boxes=[[100, 200, 400, 900], [350, 500, 700, 803]]), "bad_value"),  # 3 units off
    (lambda r: r["messages"].pop(), "bad_value"),  # the last message is not the assistant's
    (lambda r: r["messages"][1].update(content="<image><|box_start|>(400,200),(100,900)<|box_end|> x "
                                               "<|box_start|>(1,2),(3,4)<|box_end|>"), "degenerate_box"),
    (lambda r: r["messages"][0].update(role="narrator"), "bad_value"),
    (lambda r: r.update(task_type="detection"), "bad_value"),
    (lambda r: r.update(images=["nope.png"]), "missing_image"),
])
def test_bad_records_error_or_skip(img_dir, change, reason):
    rec = json.loads(json.dumps(REFERRING))
    change(rec)
    policy = {reason: "error"}
    with pytest.raises(RecordError) as e:
        _parse(rec, img_dir, policy=policy)
    msg = str(e.value)
    assert msg.startswith(f"t.jsonl:1: {reason}: ") and "\n" not in msg
    rep = ValidationReport()
    skip = "skip" if reason != "degenerate_box" else "drop"
    assert _parse(rec, img_dir, policy={reason: skip}, report=rep) is None
    assert rep.counts[reason] == 1 and rep.records_kept == 0


def test_refer_boxes_with_the_interaction_box_ask_for_it(img_dir):
    # the seed's [[person], [object], [interaction]] where the prompt writes only person and object
    rec = dict(REFERRING, refer_boxes=[[[100, 200, 400, 900]], [[350, 500, 700, 800]], [[100, 200, 700, 900]]])
    r = _parse(rec, img_dir)
    assert r.interaction_box is True
    turns = hoi.row_turns(r, hoi.HOIConfig(interaction_box=False))  # the record asks: added even when off
    assert [(p.kind, p.box) for t in turns for p in t.parts if p.is_box][2] == (hoi.INTERACTION, (0.1, 0.2, 0.7, 0.9))
    bad = dict(rec, refer_boxes=rec["refer_boxes"][:2] + [[[100, 200, 700, 950]]])  # not the union
    with pytest.raises(RecordError, match="refer_boxes has 3 boxes but the prompt writes 2"):
        _parse(bad, img_dir)


def test_refer_boxes_pixel_format(img_dir):
    rec = dict(REFERRING, refer_boxes=[[20, 30, 80, 135], [70, 75, 140, 120]])  # 200 x 150 px
    assert _parse(rec, img_dir, refer_format="pixel") is not None
    rec = dict(REFERRING, refer_boxes=[[20, 30, 80, 135], [70, 75, 150, 120]])  # 10 px off
    with pytest.raises(RecordError, match="refer_boxes\\[1\\]"):
        _parse(rec, img_dir, refer_format="pixel")


# ----------------------------------------------------------------------------------------------- rows
def test_loss_mask_only_on_assistant_turns(img_dir, tok):
    r = _parse(TOOL, img_dir)
    enc = hoi.HOIEncoder(PCFG, hoi.HOIConfig(max_images=2, interaction_box=False), tokenizer=tok)
    s = enc(r)
    masked = decode_ids(tok, s["targets"][s["loss_mask"] > 0])
    want = "".join(m["content"] + "<|im_end|>" for m in TOOL["messages"] if m["role"] == "assistant")
    assert masked == want
    # everything else is the chat scaffold and the non-assistant turns
    full = decode_ids(tok, [i for i in s["input_ids"] if i != enc.token_ids.image_pad])
    assert full.startswith("<|im_start|>system\nYou are helpful.") and full.endswith("<answer>holding cup</answer>"
                                                                                     "<|im_end|>")
    assert full.count("<|vision_start|><|vision_end|>") == 2


def _brute_force_links(ids, tok, grids, image_cfg):
    """From the decoded row: each prompt box's <|box_end|> position, its box in resized pixels, its image."""
    text_ids = list(ids)
    out = []
    vs = tok.convert_tokens_to_ids("<|vision_start|>")
    bs, be = tok.convert_tokens_to_ids("<|box_start|>"), tok.convert_tokens_to_ids("<|box_end|>")
    ast = tok.encode("<|im_start|>assistant\n", add_special_tokens=False)
    in_assistant = False
    for i, t in enumerate(text_ids):
        if text_ids[i:i + len(ast)] == ast:
            in_assistant = True
        if t == tok.convert_tokens_to_ids("<|im_end|>"):
            in_assistant = False if not in_assistant else "end"
        if in_assistant == "end":
            in_assistant = False
            continue
        if t == be and not in_assistant:
            j = max(k for k in range(i) if text_ids[k] == bs)
            inner = decode_ids(tok, text_ids[j + 1:i])
            img = sum(1 for k in range(i) if text_ids[k] == vs) - 1
            g = grids[img]
            W, H = g[2] * image_cfg.patch_size, g[1] * image_cfg.patch_size
            m = re.fullmatch(r"\((\d+),(\d+)\),\((\d+),(\d+)\)", inner)
            if m:
                q = np.asarray([int(v) for v in m.groups()], np.float64) / 1000
            else:
                q = np.asarray([int(v) for v in re.findall(r"<\|coord_(\d+)\|>", inner)], np.float64) / 999
            out.append((i, q * [W, H, W, H], img))
    return out


@pytest.mark.parametrize("form", ["text", "tokens"])
def test_links_point_at_box_end_tokens_and_pixels(img_dir, tok, form):
    recs = [_parse(REFERRING, img_dir), _parse(GROUNDING, img_dir), _parse(TOOL, img_dir)]
    hcfg = hoi.HOIConfig(box_text=form, max_images=2, max_boxes=6)
    enc = hoi.HOIEncoder(PCFG, hcfg, tokenizer=tok)
    coll = hoi.HOICollator(PCFG, enc.token_ids, _model_config(tok), hcfg)
    samples = [enc(r) for r in recs]
    b = coll(samples)
    L = b["links"]
    assert L["pos"].shape == (3, 6) and L["boxes"].shape == (3, 6, 4) and L["pos"].dtype == np.int32
    box_end = tok.convert_tokens_to_ids("<|box_end|>")
    for row, s in enumerate(samples):
        ref = _brute_force_links(b["input_ids"][row][: len(s["input_ids"])], tok, s["grid_thw"], PCFG.image)
        n = len(ref)
        assert (L["pos"][row, n:] == -1).all() and (L["pos"][row, :n] >= 0).all()
        assert (b["input_ids"][row][L["pos"][row, :n]] == box_end).all()
        np.testing.assert_array_equal(L["pos"][row, :n], [p for p, _, _ in ref])
        # same float64 products cast to float32: equal to float32 rounding (relative 2^-24 of <= 128 px)
        np.testing.assert_allclose(L["boxes"][row, :n], np.stack([q for _, q, _ in ref]) if n else
                                   np.zeros((0, 4)), rtol=0, atol=128 * 2 ** -23)
        np.testing.assert_array_equal(L["image"][row, :n], [i for _, _, i in ref])
    # referring: person, object, and the interaction box (the union) added after the object
    assert L["kind"][0, :3].tolist() == [hoi.PERSON, hoi.OBJECT, hoi.INTERACTION]
    w, h = samples[0]["grid_thw"][0][2] * 16, samples[0]["grid_thw"][0][1] * 16
    # the union of the two written boxes, itself written on the grid (0..1000 or bins): within half a grid step
    np.testing.assert_allclose(L["boxes"][0, 2], np.asarray([0.1, 0.2, 0.7, 0.9]) * [w, h, w, h], rtol=0,
                               atol=0.5 / 999 * max(w, h) + 1e-4)
    assert (L["pos"][1] == -1).all()  # grounding: no prompt box
    if form == "tokens":  # grounding answers' coordinate tokens get box slots
        assert b["box_valid"][1, :2].all() and b["coord_mask"][1].sum() == 8
        np.testing.assert_allclose(b["box_target"][1, 0], [0.1, 0.2, 0.4, 0.9], atol=1e-6)
        ids = b["input_ids"][1]
        assert enc.token_ids.is_coord(ids[b["box_pos"][1, :2].reshape(-1) + 1]).all()


def test_rows_over_the_limits_are_dropped_and_counted(img_dir, tok):
    r = _parse(TOOL, img_dir)
    enc = hoi.HOIEncoder(PCFG, hoi.HOIConfig(max_images=2, max_boxes=3), tokenizer=tok)  # 4 prompt boxes with the union
    assert enc(r) is None and enc.counts == {"too_many_boxes": 1}
    enc = hoi.HOIEncoder(PCFG, hoi.HOIConfig(max_images=1), tokenizer=tok)
    assert enc(r) is None and enc.counts == {"too_many_images": 1}
    short = PromptConfig(image=PCFG.image, max_text_len=64, text_bucket=64, min_text_len=64, patches_per_slot=64)
    enc = hoi.HOIEncoder(short, hoi.HOIConfig(max_images=2), tokenizer=tok)
    assert enc(r) is None and enc.counts == {"too_long": 1}


def test_interaction_box_switches(img_dir, tok):
    rec = _parse(REFERRING, img_dir)
    on = hoi.row_turns(rec, hoi.HOIConfig(interaction_box=True))
    off = hoi.row_turns(rec, hoi.HOIConfig(interaction_box=False))
    kinds = lambda turns: [p.kind for t in turns for p in t.parts if p.is_box]  # noqa: E731
    assert kinds(on) == [0, 1, 2] and kinds(off) == [0, 1]
    rec_no = _parse(dict(REFERRING, interaction_box=False), img_dir)
    assert kinds(hoi.row_turns(rec_no, hoi.HOIConfig(interaction_box=True))) == [0, 1]  # the record wins
    # a prompt that already writes the union box: recognised as the interaction box, not added twice
    three = json.loads(json.dumps(REFERRING))
    three["messages"][1]["content"] += " <|box_start|>(100,200),(700,900)<|box_end|>"
    three.pop("refer_boxes")
    assert kinds(hoi.row_turns(_parse(three, img_dir), hoi.HOIConfig())) == [0, 1, 2]


def test_prompt_batch_links_shift_with_left_padding(img_dir, tok):
    recs = [_parse(REFERRING, img_dir), _parse(GROUNDING, img_dir)]
    hcfg = hoi.HOIConfig(max_images=1)
    enc = hoi.HOIEncoder(PCFG, hcfg, tokenizer=tok)
    coll = hoi.HOICollator(PCFG, enc.token_ids, _model_config(tok), hcfg)
    b = hoi.encode_hoi_prompts(recs, enc, coll)
    box_end = tok.convert_tokens_to_ids("<|box_end|>")
    n = (b["links"]["pos"][0] >= 0).sum()
    assert n == 3 and (b["input_ids"][0][b["links"]["pos"][0, :n]] == box_end).all()
    text = decode_ids(tok, b["input_ids"][0][b["attention_mask"][0] > 0])
    assert text.endswith("<|im_start|>assistant\n") and "riding" not in text
