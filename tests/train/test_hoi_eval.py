"""HOI evaluation wiring (evaluate_hoi): answers fed back from the records themselves score AR 1 / exact match 1,
wrong ones 0, with the pixel frames of prediction and truth consistent; the report folder holds the HOI metrics,
pictures and heatmaps; the heatmap of the real spatial-linking module on a picture with a known box puts all its
mass inside the box (a non-square image, so a transposed token grid fails); the sampler passes `links` to prefill
with positions shifted by the prompt bucket's left padding."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from coordexp_jax import evaluate_hoi as EH
from coordexp_jax import visualize as V
from coordexp_jax.data import hoi, hoi_synthetic as hs
from coordexp_jax.train import build
from coordexp_jax.train.config import load_config_file, validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The demo config's encoder / collator and 3 synthetic images' held-out records (2-3 pairs each)."""
    d = str(tmp_path_factory.mktemp("hoi_val"))
    paths = hs.write_split(d, "val", 3, 0, hs.HOISyntheticConfig())
    recs, _ = hoi.load_files([paths["referring"], paths["grounding"]])
    cfg = validate(load_config_file(os.path.join(ROOT, "configs", "hoi_demo.py")))
    ids = build.token_ids(cfg)
    mc = build.model_config(cfg, ids)
    pcfg = build.prompt_config(cfg, mc)
    recs, encoder, collator, ecfg = EH.hoi_eval_setup(cfg, mc, recs, pcfg, build.tokenizer_dir(cfg))
    return cfg, mc, recs, encoder, collator, ecfg


@dataclasses.dataclass
class _Rollout:
    rows: list

    def row(self, b):
        return self.rows[b]

    @property
    def finished(self):
        return np.ones(len(self.rows), bool)


class _Replay:
    """A sampler that answers each record with its own answer (written as the row writes it), or with a wrong
    answer for the records `wrong(i)` picks: a referring answer with another action, a grounding answer with the
    person box moved right by its own width (IoU 0 with the truth)."""

    def __init__(self, recs, encoder, wrong=lambda i: False):
        self.recs, self.enc, self.wrong, self.i = recs, encoder, wrong, 0
        self.batches = []

    def generate(self, batch):
        self.batches.append(batch)
        B = batch["input_ids"].shape[0]
        rows = []
        for r in self.recs[self.i:self.i + B]:
            parts = r.turns[-1].parts
            if self.wrong(self.i + len(rows)):
                if r.task_type == "grounding":
                    person = next(p for p in parts if p.is_box)
                    b = np.asarray(person.box)
                    moved = dataclasses.replace(person, box=tuple(np.clip(b + [b[2] - b[0] + 0.01, 0] * 2, 0, 1)))
                    parts = tuple(moved if p is person else p for p in parts)
                else:
                    parts = (hoi.Part(text="flying kite"),)
            text = hoi.render_parts(parts, self.enc.hcfg.box_text)
            rows.append(self.enc.base._enc(text) + [self.enc.token_ids.im_end])
        self.i += B
        return _Rollout(rows)


def test_replayed_answers_score_one_and_wrong_ones_zero(setup, tmp_path):
    cfg, mc, recs, encoder, collator, ecfg = setup
    ecfg = dataclasses.replace(ecfg, batch_size=8, num_pictures=0)
    m = EH.evaluate_hoi_records(_Replay(recs, encoder), recs, encoder, collator, config=ecfg, progress=False)
    n_ref = sum(r.task_type == "referring" for r in recs)
    n_grd = len(recs) - n_ref
    assert n_ref >= 6 and n_grd >= 6
    assert m["hoi_referring/exact_match"] == 1.0 and m["hoi_referring/token_f1"] == 1.0
    # boxes written as coordinate tokens (k / 999) and compared with the record's 0..1000 boxes: the rounding moves
    # an edge by < 1 px of the 160 px image, far inside IoU 0.5 but not always 0.95
    assert m["hoi_grounding/AR@0.5"] == 1.0 and m["hoi_grounding/AR@0.75"] == 1.0 and m["hoi_grounding/AR"] > 0.9
    assert m["hoi_grounding/num_queries"] == n_grd and m["hoi_grounding/parse_failure_rate"] == 0.0
    # every other record wrong: exact match and AR@0.5 are the shares of the right ones
    wrong = lambda i: i % 2 == 1  # noqa: E731
    out = str(tmp_path / "report")
    m = EH.evaluate_hoi_records(_Replay(recs, encoder, wrong), recs, encoder, collator,
                                config=dataclasses.replace(ecfg, batch_size=8, num_pictures=2), out_dir=out,
                                progress=False)
    right_ref = [not wrong(i) for i, r in enumerate(recs) if r.task_type == "referring"]
    right_grd = [not wrong(i) for i, r in enumerate(recs) if r.task_type == "grounding"]
    assert m["hoi_referring/exact_match"] == pytest.approx(np.mean(right_ref), abs=1e-12)
    assert m["hoi_grounding/AR@0.5"] == pytest.approx(np.mean(right_grd), abs=1e-12)
    # the report folder: metrics, per-image entries, the 2 worst pictures of each task (no module: boxes only)
    assert json.load(open(os.path.join(out, "metrics.json")))["num_records"] == len(recs)
    per = json.load(open(os.path.join(out, "per_image.json")))
    drawn = [e for e in per if e["picture"]]
    assert len(per) == len(recs) and all(os.path.isfile(os.path.join(out, e["picture"])) for e in drawn)
    assert sorted(e["task"] for e in drawn) == ["grounding"] * 2 + ["referring"] * 2
    assert all(e["fn"] == 1 for e in drawn)  # the wrong answers come first
    assert sum(e["fn"] for e in per) == sum(wrong(i) for i in range(len(recs)))
    page = open(os.path.join(out, "index.html")).read()
    assert "hoi_referring/exact_match" in page and "AR@0.5" in page


@pytest.fixture(scope="module")
def linked_model(setup):
    cfg = setup[0]
    ids = build.token_ids(cfg)
    make_model, _ = build.make_model_fn(cfg, setup[1], ids)
    model = make_model()
    assert EH.make_link_attention(model) is not None
    return model


def test_heatmap_mass_inside_known_box(setup, linked_model, tmp_path):
    """A 192 x 128 picture (6 x 4 visual tokens of 32 px; the demo's 160² pixel budget) with a red person box and a blue object box: the drawn
    attention of each box token lies inside its box (box edges on token edges: exactly; the interaction box)."""
    cfg, mc, _, encoder, collator, _ = setup
    W, H = 192, 128
    img = np.full((H, W, 3), 200, np.uint8)
    person, obj = (32, 32, 96, 128), (128, 32, 192, 96)  # pixels, on the 32 px token grid
    img[person[1]:person[3], person[0]:person[2]] = (220, 40, 40)
    img[obj[1]:obj[3], obj[0]:obj[2]] = (40, 40, 220)
    Image.fromarray(img).save(tmp_path / "known.png")
    q = lambda b: hoi.format_box([b[0] / W, b[1] / H, b[2] / W, b[3] / H])  # noqa: E731
    rec = hoi.parse_hoi_record({"messages": [
        {"role": "user", "content": f"<image>What is the person {q(person)} doing with the object {q(obj)}?"},
        {"role": "assistant", "content": "holding box"}], "images": ["known.png"], "task_type": "referring"},
        image_root=str(tmp_path))
    batch = hoi.encode_hoi_prompts([rec], encoder, collator)
    w = EH.make_link_attention(linked_model)(batch)
    kinds = batch["links"]["kind"][0]
    assert list(kinds[:3]) == [0, 1, 2]  # person, object, their union added by the data
    union = (32, 32, 192, 128)
    for slot, box in enumerate((person, obj, union)):
        weights, grid, resized = EH.link_heat_inputs(batch, 0, slot, w)
        assert grid == (4, 6) and resized == (192.0, 128.0)
        # one box's weights sum to 1 (float32 softmax of <= 35 terms: error ~1e-7 on any x86 CPU)
        assert weights.sum() == pytest.approx(1.0, abs=1e-5)
        heat = V.attention_heat(weights, grid, H, W)
        assert V.box_mass(heat, box) == pytest.approx(1.0, abs=1e-5)  # (the total is 1: nothing outside)
    # the drawn person panel: heat over the person box; the object's area (no attention) is the image dimmed to
    # 40 %, untouched
    pic = np.asarray(V.draw_attention(Image.fromarray(img), EH.link_heat_inputs(batch, 0, 0, w)[0], (4, 6), person,
                                      kind=0, min_side=192)).astype(int)
    np.testing.assert_array_equal(pic[40:120, 110:190], np.round(img[40:120, 110:190] * 0.4).astype(int))
    inside = pic[40:120, 40:88]
    assert (np.abs(inside - np.round(img[40:120, 40:88] * 0.4)).sum(-1) > 30).mean() > 0.9


def test_real_sampler_with_links_and_heatmaps(setup, linked_model, tmp_path):
    """The jitted sampler rolls the linked model out (links at prefill); the report has the heatmaps."""
    from coordexp_jax.evaluate import make_sampler
    from flax import nnx

    cfg, mc, recs, encoder, collator, ecfg = setup
    sub = [r for r in recs if r.task_type == "referring"][:2] + [r for r in recs if r.task_type == "grounding"][:2]
    sampler = make_sampler(nnx.split(linked_model), encoder.token_ids, cfg)
    out = str(tmp_path / "r")
    m = EH.evaluate_hoi_records(sampler, sub, encoder, collator, config=dataclasses.replace(ecfg, num_pictures=0),
                                out_dir=out, link_attention=EH.make_link_attention(linked_model), progress=False)
    assert m["num_records"] == 4 and 0.0 <= m["hoi_referring/token_f1"] <= 1.0
    per = json.load(open(os.path.join(out, "per_image.json")))
    heat = [p for e in per for p in e.get("heatmaps", [])]
    assert len(heat) == 2 * 3 and all(os.path.isfile(os.path.join(out, p)) for p in heat)  # person, object, union


def test_bucket_inputs_shifts_links():
    from coordexp_jax.rollout.sampler import bucket_inputs

    ids = np.ones((3, 10), np.int32)
    links = {"pos": np.array([[3, 7, -1], [9, -1, -1], [-1, -1, -1]], np.int32),
             "boxes": np.ones((3, 3, 4), np.float32), "image": np.zeros((3, 3), np.int32),
             "kind": np.array([[0, 1, 3]] * 3, np.int32)}
    out, B = bucket_inputs({"input_ids": ids, "attention_mask": np.ones_like(ids), "links": links}, pad_id=0)
    assert out["input_ids"].shape == (4, 16) and B == 3
    # the prompt moved right by the 6 columns of left padding; the padded row 3 has no link
    np.testing.assert_array_equal(out["links"]["pos"], [[9, 13, -1], [15, -1, -1], [-1, -1, -1], [-1, -1, -1]])
    np.testing.assert_array_equal(out["links"]["kind"][3], [3, 3, 3])
    assert out["links"]["boxes"].shape == (4, 3, 4) and not out["links"]["boxes"][3].any()


def test_report_headline_and_groups_for_hoi():
    from coordexp_jax import report as R

    m = {"hoi_referring/exact_match": 0.5, "hoi_referring/token_f1": 0.625, "hoi_grounding/AR@0.5": 0.25,
         "hoi_grounding/AR": 0.1234, "hoi_grounding/ARm": 0.2, "num_records": 8}
    assert [(label, value) for label, value, _, _ in R.headline(m)] == [
        ("exact match", "0.500"), ("token F1", "0.625"), ("AR@0.5", "0.250"), ("AR", "0.123")]
    groups = {title: [s.key for s, _ in items] for title, _, items in R.metric_groups(m)}
    assert groups["Human-object interaction: referring"] == ["hoi_referring/exact_match", "hoi_referring/token_f1"]
    assert "Other" not in groups  # every HOI key has its glossary entry
