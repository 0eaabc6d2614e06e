"""Record contract and validation: the bad-input fixture directory, hypothesis properties, codec round trips."""
import json
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordexp_jax.coord import codec
from coordexp_jax.data import records as R

FIX = os.path.join(os.path.dirname(__file__), "..", "fixtures", "data", "bad_inputs")
JSONL = os.path.join(FIX, "records.jsonl")


def test_bad_inputs_default_policy_errors_on_bad_json_naming_line():
    with pytest.raises(R.RecordError, match=r"records\.jsonl:4: bad_json"):
        R.read_jsonl(JSONL)


def test_bad_inputs_each_handled_as_documented():
    recs, rep = R.read_jsonl(JSONL, policy={"bad_json": "skip"}, check_images="decode")
    assert rep.records_read == 9
    assert dict(rep.counts) == {"bad_json": 1, "unreadable_image": 1, "missing_image": 1, "degenerate_box": 1,
                                "box_outside": 1, "no_objects": 1, "unknown_field": 1, "box_clamped": 1}
    kept_lines = [int(r.source.rsplit(":", 1)[1]) for r in recs]
    assert kept_lines == [1, 7, 8, 9] and rep.records_kept == 4
    for reason, line in [("unreadable_image", 2), ("missing_image", 3), ("bad_json", 4), ("degenerate_box", 5),
                         ("box_outside", 6), ("no_objects", 7), ("unknown_field", 8), ("box_clamped", 9)]:
        assert rep.examples[reason][0].startswith(f"{JSONL}:{line}:"), (reason, rep.examples[reason])
    by_line = {int(r.source.rsplit(":", 1)[1]): r for r in recs}
    assert by_line[7].objects == ()
    assert by_line[8].extra == {"source_id": 17}  # kept verbatim
    assert by_line[9].objects[0].box[2] == 1.0  # 64.5 clamped to the 64-px edge (counted)
    np.testing.assert_allclose(by_line[1].boxes_px(), [[4, 5, 30, 40]], atol=1e-9)
    assert "degenerate_box: 1" in rep.summary()


def test_bad_inputs_header_check_passes_truncated_then_decode_catches_it():
    _, rep = R.read_jsonl(JSONL, policy={"bad_json": "skip"}, check_images="header")
    assert rep.counts["unreadable_image"] == 0 and rep.records_kept == 5


@pytest.mark.parametrize("policy,reason", [({"unknown_field": "error"}, "unknown_field"),
                                           ({"no_objects": "error"}, "no_objects"),
                                           ({"degenerate_box": "error"}, "degenerate_box"),
                                           ({"box_outside": "error"}, "box_outside"),
                                           ({"missing_image": "error"}, "missing_image")])
def test_strict_policies_raise_naming_file_line(policy, reason):
    with pytest.raises(R.RecordError, match=rf"records\.jsonl:\d+: {reason}"):
        R.read_jsonl(JSONL, policy={"bad_json": "skip", **policy})


def test_drop_and_clip_policies_change_only_what_they_count():
    recs, rep = R.read_jsonl(JSONL, policy={"bad_json": "skip", "degenerate_box": "drop", "box_outside": "clip"},
                             check_images="none")
    by_line = {int(r.source.rsplit(":", 1)[1]): r for r in recs}
    assert by_line[5].objects == ()  # the only object was dropped (counted), record kept as empty
    np.testing.assert_allclose(by_line[6].boxes_px(), [[4, 5, 64, 40]])
    assert rep.counts["degenerate_box"] == 1 and rep.counts["box_outside"] == 1


def test_bad_policy_values_are_rejected():
    with pytest.raises(ValueError, match="policy\\['no_objects'\\]"):
        R.read_jsonl(JSONL, policy={"no_objects": "explode"})
    with pytest.raises(ValueError, match="unknown validation policy key"):
        R.read_jsonl(JSONL, policy={"nope": "skip"})


def test_missing_fields_and_bad_values_named():
    base = {"images": ["a.png"], "width": 10, "height": 10, "objects": [{"desc": "x", "bbox_2d": [1, 1, 5, 5]}]}
    cases = [({k: v for k, v in base.items() if k != "width"}, "missing_field", "width"),
             ({**base, "objects": [{"bbox_2d": [1, 1, 2, 2]}]}, "missing_field", "desc"),
             ({**base, "objects": [{"desc": "x"}]}, "missing_field", "bbox_2d"),
             ({**base, "objects": [{"desc": "x", "bbox_2d": [1, 2, 3]}]}, "bad_value", "4 values"),
             ({**base, "objects": [{"desc": "x", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_1000|>", "3"]}]},
              "bad_value", "coord_1000"),
             ({**base, "width": 0}, "bad_value", "positive"),
             ({**base, "task": "segmentation"}, "bad_value", "task"),
             ({**base, "images": ["a.png", "b.png"]}, "bad_value", "exactly one")]
    for rec, reason, word in cases:
        with pytest.raises(R.RecordError, match=rf"f\.jsonl:3: {reason}: .*{word}"):
            R.parse_record(rec, where="f.jsonl:3", check_images="none")


def test_box_formats_and_codec_round_trip():
    """norm1000 ints and coord tokens decode through the codec (k/999); pixels within half a bin after quantising."""
    base = {"images": ["a.png"], "width": 640, "height": 480}
    r1 = R.parse_record({**base, "objects": [{"desc": "a", "bbox_2d": [0, 100, 500, 999]}]}, box_format="norm1000",
                        check_images="none")
    r2 = R.parse_record({**base, "objects": [{"desc": "a", "bbox_2d": ["<|coord_0|>", "<|coord_100|>",
                                                                       "<|coord_500|>", "<|coord_999|>"]}]},
                        check_images="none")
    assert r1.objects == r2.objects
    np.testing.assert_allclose(r1.objects[0].box, [0, 100 / 999, 500 / 999, 1.0])
    np.testing.assert_allclose(r1.boxes_px()[0, [0, 3]], [0, 480])  # bins 0 and 999 are the image edges
    with pytest.raises(R.RecordError, match="norm1000 must be integers 0..999"):
        R.parse_record({**base, "objects": [{"desc": "a", "bbox_2d": [0, 1, 2.5, 3]}]}, box_format="norm1000",
                       check_images="none")
    d = R.record_to_json(r1, box_format="tokens")
    assert d["objects"][0]["bbox_2d"] == ["<|coord_0|>", "<|coord_100|>", "<|coord_500|>", "<|coord_999|>"]


def test_qwen1000_box_format():
    """Qwen3-VL's 0..1000 grid: q/1000 exactly (norm1000 would read q/999, 0.1% off, and refuse 1000); 1000 is the
    image edge, 1001 is refused naming the record; written back unchanged."""
    base = {"images": ["a.png"], "width": 640, "height": 480}
    rec = {**base, "objects": [{"desc": "a", "bbox_2d": [0, 100, 500, 1000]}, {"desc": "b", "bbox_2d": [1, 2, 3, 4]}]}
    r = R.parse_record(rec, box_format="qwen1000", check_images="none")
    assert [o.box for o in r.objects] == [(0.0, 0.1, 0.5, 1.0), (0.001, 0.002, 0.003, 0.004)]  # q / 1000 exactly
    np.testing.assert_allclose(r.boxes_px()[0], [0, 48, 320, 480], rtol=0, atol=1e-9)  # 1000 -> H; float64 q/1000*H
    for fmt in ("qwen1000", "pixel"):
        d = R.record_to_json(r, box_format=fmt)
        again = R.parse_record(d, box_format=fmt, check_images="none")
        np.testing.assert_allclose(again.boxes(), r.boxes(), rtol=0, atol=1e-12)  # float64 round trip
    assert R.record_to_json(r, box_format="qwen1000")["objects"][0]["bbox_2d"] == [0, 100, 500, 1000]
    with pytest.raises(R.RecordError, match=r"q\.jsonl:7: bad_value: objects\[0\]\.bbox_2d in qwen1000 must be "
                                            r"integers 0\.\.1000"):
        R.parse_record({**base, "objects": [{"desc": "a", "bbox_2d": [0, 1, 2, 1001]}]}, where="q.jsonl:7",
                       box_format="qwen1000", check_images="none")
    with pytest.raises(R.RecordError, match="qwen1000 must be integers"):
        R.parse_record({**base, "objects": [{"desc": "a", "bbox_2d": [0, 1, 2.5, 3]}]}, box_format="qwen1000",
                       check_images="none")
    # coordinate tokens stay bins (k/999) in every format
    r2 = R.parse_record({**base, "objects": [{"desc": "a", "bbox_2d": ["<|coord_0|>", "<|coord_1|>",
                                                                       "<|coord_2|>", "<|coord_999|>"]}]},
                        box_format="qwen1000", check_images="none")
    np.testing.assert_allclose(r2.objects[0].box, [0, 1 / 999, 2 / 999, 1.0], rtol=0, atol=1e-15)


# ---------------------------------------------------------------- hypothesis properties
W_H = st.tuples(st.integers(1, 4000), st.integers(1, 4000))


@st.composite
def pixel_records(draw):
    w, h = draw(W_H)
    n = draw(st.integers(0, 5))
    objs = []
    for _ in range(n):
        x1 = draw(st.floats(-0.3 * w, 1.3 * w, allow_nan=False))
        y1 = draw(st.floats(-0.3 * h, 1.3 * h, allow_nan=False))
        x2 = draw(st.floats(-0.3 * w, 1.3 * w, allow_nan=False))
        y2 = draw(st.floats(-0.3 * h, 1.3 * h, allow_nan=False))
        desc = draw(st.text(min_size=0, max_size=8))
        objs.append({"desc": desc, "bbox_2d": [x1, y1, x2, y2]})
    rec = {"images": ["x.png"], "width": w, "height": h, "objects": objs}
    if draw(st.booleans()):
        rec["task"] = draw(st.sampled_from(["detection", "grounding", "counting", "ocr"]))
    if draw(st.booleans()):
        rec[draw(st.sampled_from(["extra_key", "tags", "prompt"]))] = draw(st.one_of(st.integers(), st.text(max_size=5)))
    return rec


def _expected_outcome(rec):
    """An independent statement of the policy: the first rejecting reason, or None if the record is kept."""
    if rec.get("task", "detection") not in R.TASKS:
        return "bad_value"
    if "prompt" in rec and (not isinstance(rec["prompt"], str) or not rec["prompt"].strip()):
        return "bad_value"
    w, h = rec["width"], rec["height"]
    for o in rec["objects"]:
        if not o["desc"].strip():
            return "bad_value"
        x1, y1, x2, y2 = o["bbox_2d"]
        if x2 <= x1 or y2 <= y1:
            return "degenerate_box"
        if min(x1, x2) < -1 or max(x1, x2) > w + 1 or min(y1, y2) < -1 or max(y1, y2) > h + 1:
            return "box_outside"
        c = np.clip([x1, y1, x2, y2], 0, [w, h, w, h])
        if c[2] <= c[0] or c[3] <= c[1]:  # empty once clamped to the image
            return "degenerate_box"
    if max(w, h) > 200 * min(w, h):  # the Qwen2-VL smart_resize refuses aspect ratios above 200
        return "unprocessable_image"
    return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pixel_records())
def test_property_record_passes_or_documented_outcome(rec):
    rep = R.ValidationReport()
    want = _expected_outcome(rec)
    try:
        r = R.parse_record(rec, where="p.jsonl:1", check_images="none", report=rep)
    except R.RecordError as e:
        assert e.reason == want and R.DEFAULT_POLICY[e.reason] == "error"
        return
    if want is not None:
        assert r is None and R.DEFAULT_POLICY[want] == "skip" and rep.counts[want] == 1
        return
    assert r is not None and rep.records_kept == 1
    # nothing silently changed: every box comes back in pixels (clamped only within tolerance, and counted)
    w, h = rec["width"], rec["height"]
    px = r.boxes_px()
    n_clamped = 0
    for o, got in zip(rec["objects"], px):
        want_px = np.clip(o["bbox_2d"], 0, [w, h, w, h])
        n_clamped += not np.array_equal(want_px, o["bbox_2d"])
        np.testing.assert_allclose(got, want_px, rtol=1e-12, atol=1e-9 * max(w, h))
    assert rep.counts["box_clamped"] == n_clamped
    assert [o.desc for o in r.objects] == [o["desc"] for o in rec["objects"]]
    assert rep.counts["no_objects"] == (len(rec["objects"]) == 0)
    extra = {k: v for k, v in rec.items() if k not in R.KNOWN_FIELDS}
    assert dict(r.extra) == extra and rep.counts["unknown_field"] == bool(extra)
    # JSON round trip through the contract gives the same record
    again = R.parse_record(json.loads(json.dumps(R.record_to_json(r))), where="p.jsonl:1", check_images="none")
    assert again is not None and len(again.objects) == len(r.objects)
    for a, b in zip(again.objects, r.objects):
        assert a.desc == b.desc and np.allclose(a.box, b.box, rtol=0, atol=1e-12)
    # quantised through the codec: within half a bin of the continuous box
    for fmt in ("norm1000", "tokens"):
        q = R.parse_record(R.record_to_json(r, box_format=fmt), check_images="none", box_format="norm1000")
        if q is not None and r.objects:
            assert np.abs(q.boxes() - r.boxes()).max() <= 0.5 / 999 + 1e-12


@settings(max_examples=100, deadline=None)
@given(W_H, st.lists(st.integers(0, 999), min_size=4, max_size=4))
def test_property_bins_pixels_round_trip(wh, k):
    w, h = wh
    k = np.asarray(k)
    px = codec.bins_to_box_px(k, w, h)
    assert np.array_equal(codec.box_px_to_bins(px, w, h), k)
    assert codec.bins_to_box_px(np.array([0, 0, 999, 999]), w, h).tolist() == [0, 0, w, h]
