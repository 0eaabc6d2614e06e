"""Answer protocols: round trips (hypothesis), robustness of the parser, dropped-reason accounting."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordexp_jax.coord import protocols as P
from coordexp_jax.data.tokenizer import decode_ids, encode_text, small_tokenizer, token_ids_from_tokenizer

TOK = small_tokenizer()
TID = token_ids_from_tokenizer(TOK)
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# descs: any text without special-token strings ('<' excluded keeps them out; a separate test covers the check)
desc_st = st.text(alphabet=st.characters(blacklist_characters="<", blacklist_categories=("Cs",)), max_size=12)
bins_st = st.tuples(*[st.integers(0, 999)] * 4)
objs_st = st.lists(st.builds(lambda d, b: P.AnswerObject(d, bins=b), desc_st, bins_st), max_size=6)


def expected_text(objs, protocol):
    """Independent rendering of the protocol text (json.dumps + string formatting)."""
    if protocol == "coordjson":
        parts = ['{"desc": %s, "bbox_2d": [%s]}' % (json.dumps(o.desc, ensure_ascii=False),
                                                   ", ".join(f"<|coord_{k}|>" for k in o.bins)) for o in objs]
        return '{"objects": [' + ", ".join(parts) + "]}"
    return "".join(f"<obj><desc>{o.desc}</desc><box>" + "".join(f"<|coord_{k}|>" for k in o.bins) + "</box></obj>"
                   for o in objs)


@pytest.mark.parametrize("protocol", P.COORD_TOKEN_PROTOCOLS)
@SETTINGS
@given(objs=objs_st, order=st.sampled_from(P.ORDERS), seed=st.integers(0, 1000))
def test_round_trip(protocol, objs, order, seed):
    ser = P.serialize(objs, TOK, TID, protocol, order=order, seed=seed)
    emitted = [objs[i] for i in ser.order]
    assert sorted(ser.order.tolist()) == list(range(len(objs)))
    if order == "given":
        assert ser.order.tolist() == list(range(len(objs)))
    if order == "sorted":
        keys = [(o.bins[1], o.bins[0]) for o in emitted]
        assert keys == sorted(keys)
    # the ids decode to exactly the protocol text
    assert decode_ids(TOK, ser.ids) == expected_text(emitted, protocol)
    assert TID.im_end not in ser.ids
    ids = np.asarray(ser.ids)
    assert np.array_equal(ids[ser.coord_positions] - TID.coord_start, ser.bins)
    assert ser.bins.tolist() == [list(o.bins) for o in emitted]
    res = P.parse(ser.ids + [TID.im_end, TID.endoftext], TOK, TID, protocol)
    assert [(o.desc, o.bins.tolist()) for o in res.objects] == [(o.desc, list(o.bins)) for o in emitted]
    assert res.positions().tolist() == ser.coord_positions.tolist()
    assert res.closed and res.has_eos and res.end == len(ser.ids) and res.dropped == {}


def _random_ids(rng, n):
    """Random answer-like garbage: coordjson/tags fragments, coord ids, the wildcard, specials, any ids."""
    pieces = [encode_text(TOK, s) for s in ('{"objects": [', '{"desc": "', '", "bbox_2d": [', ", ", "]}", "]", "}",
                                           '"', "cat", "\\", "12", '{"count": ', ":", "{", "[")]
    specials = [TID.coord_wildcard, TID.im_start, TID.image_pad, TID.obj_open, TID.obj_close, TID.desc_open,
                TID.desc_close, TID.box_open, TID.box_close, TID.vision_start]
    out = []
    while len(out) < n:
        r = rng.random()
        if r < 0.35:
            out += pieces[rng.integers(len(pieces))]
        elif r < 0.6:
            out.append(int(TID.coord_start + rng.integers(1000)))
        elif r < 0.8:
            out.append(int(specials[rng.integers(len(specials))]))
        else:
            out.append(int(rng.integers(0, TID.vocab_size)))
    return out[:n]


@pytest.mark.parametrize("protocol", P.COORD_TOKEN_PROTOCOLS)
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 80), objs=objs_st, cut=st.floats(0, 1))
def test_parse_never_raises(protocol, seed, n, objs, cut):
    rng = np.random.default_rng(seed)
    good = P.serialize(objs, TOK, TID, protocol).ids
    cases = [_random_ids(rng, n), good[: int(cut * len(good))],  # truncation
             good[: int(cut * len(good))] + _random_ids(rng, n // 4) + good,  # garbage in the middle
             good + good]  # repetition
    for ids in cases:
        for pr in P.COORD_TOKEN_PROTOCOLS:
            res = P.parse(ids, TOK, TID, pr)
            assert "internal_error" not in res.dropped
            assert all(0 <= b <= 999 for o in res.objects for b in o.bins)
            assert all(ids[p] == TID.coord_start + b for o in res.objects for p, b in zip(o.positions, o.bins))
        cr = P.parse_count(ids, TOK, TID)
        assert "internal_error" not in cr.dropped
        assert "internal_error" not in P.parse(ids, TOK, TID, "qwen_text").dropped  # coord tokens, tags: no crash
    # a truncated well-formed answer keeps every complete object before the cut
    k = int(cut * len(good))
    res = P.parse(good[:k], TOK, TID, protocol)
    full = P.parse(good, TOK, TID, protocol)
    tail = 2 if protocol == "tags" else len(encode_text(TOK, "]}"))  # tokens closing an object after its last coord
    complete = [o for o in full.objects if o.positions.max() + tail < k]
    assert res.objects == complete
    assert res.closed == (k == len(good)) or (protocol == "tags" and res.closed)


def test_dropped_reasons_coordjson():
    def obj(desc, *bins):
        return '{"desc": "%s", "bbox_2d": [%s]}' % (desc, ", ".join(f"<|coord_{b}|>" for b in bins))

    def run(text):
        return P.parse(encode_text(TOK, text), TOK, TID, "coordjson")

    ok = obj("a", 1, 2, 3, 4)
    r = run('{"objects": [' + ok + ", " + obj("b", 1, 2, 3) + ", " + ok + "]}")
    assert len(r.objects) == 2 and r.dropped == {"wrong_coord_count": 1} and r.closed
    r = run('{"objects": [' + ok + ', {"desc": "c", "bbox_2d": [<|coord_1|>, 12, <|coord_3|>, <|coord_4|>]}, ' + ok + "]}")
    assert len(r.objects) == 2 and r.dropped == {"bad_coord": 1}
    r = run('{"objects": [' + ok + ', {"desc": "c", "bbox_2d": [<|coord_*|>, <|coord_1|>, <|coord_3|>, <|coord_4|>]}]}')
    assert len(r.objects) == 1 and r.dropped == {"bad_coord": 1} and r.closed
    r = run('{"objects": [{"bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>], "desc": "x"}]}')
    assert [o.desc for o in r.objects] == ["x"]  # key order is tolerated
    r = run('{"objects": [{"desc": "x"}, {"desc": "y", "desc": "z"}, {"desc": "w", "color": "red"}, ' + ok + "]}")
    assert r.dropped == {"missing_box": 1, "duplicate_key": 1, "unknown_key": 1} and len(r.objects) == 1
    r = run("Sure! " + ok + " and " + ok)  # no prefix: objects are still recovered
    assert len(r.objects) == 2 and r.dropped["bad_prefix"] == 1 and not r.closed
    r = run('{"objects": [' + ok + "]} trailing")
    assert r.closed and r.dropped == {"stray": 1} and len(r.objects) == 1
    r = P.parse(encode_text(TOK, '{"objects": [' + ok + ", ") + encode_text(TOK, ok)[:-4], TOK, TID)
    assert len(r.objects) == 1 and r.dropped == {"truncated": 1} and not r.closed
    r = P.parse([], TOK, TID)
    assert r.objects == [] and not r.closed and r.end == 0 and not r.has_eos
    # never evaluates: a desc that looks like code stays a string
    r = run('{"objects": [' + obj("__import__(\\\"os\\\")", 1, 2, 3, 4) + "]}")
    assert r.objects[0].desc == '__import__("os")'


def test_dropped_reasons_tags():
    def obj(desc, bins):
        return f"<obj><desc>{desc}</desc><box>" + "".join(f"<|coord_{b}|>" for b in bins) + "</box></obj>"

    def run(text):
        return P.parse(encode_text(TOK, text), TOK, TID, "tags")

    ok = obj("a b", [1, 2, 3, 4])
    r = run(ok + obj("x", [1, 2, 3]) + "\n" + ok)
    assert len(r.objects) == 2 and r.dropped == {"wrong_coord_count": 1} and r.closed
    r = run(ok + "<obj><desc>x</desc><box><|coord_1|>7<|coord_2|><|coord_3|><|coord_4|></box></obj>" + ok)
    assert len(r.objects) == 2 and r.dropped == {"bad_coord": 1}
    r = run(ok + "junk" + ok + "<obj><desc>trunc</desc><box><|coord_1|>")
    assert len(r.objects) == 2 and r.dropped == {"stray": 1, "truncated": 1} and not r.closed
    r = run("<obj><box><|coord_1|><|coord_2|><|coord_3|><|coord_4|></box></obj>" + ok)
    assert len(r.objects) == 1 and r.dropped == {"bad_desc": 1}


def test_serialize_errors_and_cache():
    with pytest.raises(ValueError, match="special token"):
        P.serialize([P.AnswerObject("a <|im_end|> b", bins=(1, 2, 3, 4))], TOK, TID)
    with pytest.raises(ValueError, match="exactly one"):
        P.serialize([P.AnswerObject("a")], TOK, TID)
    with pytest.raises(ValueError, match="0..999"):
        P.serialize([P.AnswerObject("a", bins=(1, 2, 3, 1000))], TOK, TID)
    with pytest.raises(ValueError, match="seed"):
        P.serialize([], TOK, TID, order="random")
    with pytest.raises(ValueError, match="protocol"):
        P.serialize([], TOK, TID, protocol="xml")
    # normalised boxes go through the codec; the empty answer
    s = P.serialize([P.AnswerObject("cat", box=(0.11, 0.31, 0.41, 0.7057))], TOK, TID)
    assert s.bins.tolist() == [[110, 310, 410, 705]]
    assert decode_ids(TOK, P.serialize([], TOK, TID).ids) == '{"objects": []}'
    assert P.serialize([], TOK, TID, "tags").ids == []
    # random order is deterministic in the seed
    objs = [P.AnswerObject(str(i), bins=(i, i, i + 1, i + 1)) for i in range(10)]
    a = P.serialize(objs, TOK, TID, order="random", seed=3).order
    assert np.array_equal(a, P.serialize(objs, TOK, TID, order="random", seed=3).order)
    assert not np.array_equal(a, P.serialize(objs, TOK, TID, order="random", seed=4).order)


def test_grounding_and_counting():
    boxes = np.array([[0.5, 0.5, 0.9, 0.9], [0.1, 0.2, 0.3, 0.4]])
    for pr in P.COORD_TOKEN_PROTOCOLS:
        s = P.serialize_grounding("the red ring", boxes, TOK, TID, pr)
        r = P.parse(s.ids, TOK, TID, pr)
        assert r.descs() == ["the red ring"] * 2
        np.testing.assert_allclose(r.bins(), np.rint(boxes[::-1] * 999))
    pts = np.array([[0.5, 0.1], [0.2, 0.3], [0.9, 0.1]])
    s = P.serialize_count(pts, TOK, TID)
    assert decode_ids(TOK, s.ids) == ('{"count": 3, "points": [[<|coord_500|>, <|coord_100|>], '
                                      "[<|coord_899|>, <|coord_100|>], [<|coord_200|>, <|coord_300|>]]}")
    c = P.parse_count(s.ids + [TID.im_end], TOK, TID)
    assert c.count == 3 and c.closed and c.points.tolist() == s.bins.tolist()
    assert c.positions.tolist() == s.coord_positions.tolist()
    c = P.parse_count(s.ids[:-8], TOK, TID)
    assert c.count == 3 and not c.closed and len(c.points) == 2


# --------------------------------------------------------------------------- unknown keys of any nesting
def _obj_text(desc, bins, extra=()):
    """A coordjson object with extra (key, value-text) pairs inserted at the given key positions."""
    items = [("desc", json.dumps(desc, ensure_ascii=False)),
             ("bbox_2d", "[" + ", ".join(f"<|coord_{b}|>" for b in bins) + "]")]
    for pos, key, val in extra:
        items.insert(min(pos, len(items)), (key, val))
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in items) + "}"


_scalar_st = st.one_of(st.integers(-5, 10**6).map(str), st.sampled_from(["true", "false", "null", "1.5"]),
                       desc_st.map(lambda d: json.dumps(d, ensure_ascii=False)),
                       st.integers(0, 999).map(lambda k: f"<|coord_{k}|>"),
                       st.builds(_obj_text, desc_st, bins_st))  # a well-formed protocol object, nested
_value_st = st.recursive(_scalar_st, lambda inner: st.one_of(
    st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
    st.lists(st.tuples(st.sampled_from(["parts", "objects", "desc", "bbox_2d", "x"]), inner), max_size=3).map(
        lambda kv: "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in kv) + "}")), max_leaves=8)
_extra_st = st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["parts", "attributes", "children", "score"]),
                               _value_st), min_size=1, max_size=2, unique_by=lambda t: t[1])


@SETTINGS
@given(objs=st.lists(st.tuples(desc_st, bins_st, st.one_of(st.none(), _extra_st), st.booleans()), max_size=5))
def test_unknown_nested_keys_keep_every_top_level_object(objs):
    # Objects carrying unknown keys (values: any JSON, nested lists/objects, nested protocol objects included) are
    # dropped as unknown_key, some also with a 3-coordinate box before the unknown key; every well-formed
    # top-level object is kept, in order, and nothing nested is taken for an answer object.
    parts, want, reasons = [], [], {}
    for desc, bins, extra, short in objs:
        if extra is None:
            parts.append(_obj_text(desc, bins))
            want.append((desc, list(bins)))
            continue
        if short:  # broken before the unknown key: resync must still skip the nested value whole
            extra = [(2, k, v) for _, k, v in extra]
            parts.append(_obj_text(desc, bins[:3], extra))
            key = "wrong_coord_count"
        else:
            parts.append(_obj_text(desc, bins, extra))
            key = "unknown_key"
        reasons[key] = reasons.get(key, 0) + 1
    text = '{"objects": [' + ", ".join(parts) + "]}"
    res = P.parse(encode_text(TOK, text) + [TID.im_end], TOK, TID, "coordjson")
    assert [(o.desc, o.bins.tolist()) for o in res.objects] == want, text
    assert res.dropped == reasons and res.closed, text


def test_unknown_nested_keys_cases():
    def run(*objs):
        return P.parse(encode_text(TOK, '{"objects": [' + ", ".join(objs) + "]}"), TOK, TID, "coordjson")

    a, b, c = _obj_text("a", (1, 2, 3, 4)), _obj_text("b", (5, 6, 7, 8)), _obj_text("c", (9, 9, 9, 9))
    nested = _obj_text("part", (10, 11, 12, 13))
    for pos in (0, 1, 2):  # the nested list before, between and after the known keys
        r = run(_obj_text("car", (1, 2, 3, 4), [(pos, "parts", f"[{nested}, {nested}]")]), b, c)
        assert r.descs() == ["b", "c"] and r.dropped == {"unknown_key": 1} and r.closed
    r = run(a, _obj_text("x", (1, 2, 3, 4), [(1, "meta", '{"x": [{"y": [1, [2]]}], "z": "]}"}')]), b)
    assert r.descs() == ["a", "b"] and r.dropped == {"unknown_key": 1} and r.closed  # brackets inside strings
    r = run(_obj_text("x", (1, 2, 3), [(2, "parts", f"[{nested}]")]), b)  # broken box, then a nested list
    assert r.descs() == ["b"] and r.dropped == {"wrong_coord_count": 1} and r.closed
    r = run('{"desc": "x"}', b)  # the object closed: nothing after it is consumed by the recovery
    assert r.descs() == ["b"] and r.dropped == {"missing_box": 1} and r.closed
    r = run(a, '{"desc": "x"}')
    assert r.descs() == ["a"] and r.dropped == {"missing_box": 1} and r.closed
    # mismatched brackets in the unknown value: recovery falls back to the next object start
    r = run(_obj_text("x", (1, 2, 3, 4), [(2, "parts", "[1}")]), b)
    assert r.descs() == ["b"] and r.dropped == {"unknown_key": 1}
    # truncated inside the nested value
    r = P.parse(encode_text(TOK, '{"objects": [' + a + ', {"desc": "x", "parts": [' + nested[:-3]), TOK, TID)
    assert r.descs() == ["a"] and r.dropped == {"truncated": 1} and not r.closed
