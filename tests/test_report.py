"""The evaluation report page (coordexp_jax.report) and what `evaluate` writes for it, checked in a real headless
Chromium (Playwright, Debian's /usr/bin/chromium): the page loads without JS errors, the headline shows the
metrics' AP50, clicking a header re-sorts the rows, the filters hide the right rows, the lazy pictures load,
a row click opens that image's view; plus the pure parts (escaping, order, rounding, grouping) without a browser.

Under CI (env CI set, as .ci/run's caller does) a missing Chromium or Playwright FAILS the browser tests; on a
developer machine they are skipped with the reason."""
import html.parser
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from coordexp_jax import evaluate as E
from coordexp_jax import report as R
from coordexp_jax.coord import protocols
from coordexp_jax.coord.boxes import pairwise_iou_exact
from coordexp_jax.data import prompts, records, synthetic
from coordexp_jax.data.image import ImageConfig
from coordexp_jax.data.tokenizer import small_tokenizer, token_ids_from_tokenizer
from coordexp_jax.rollout.sampler import Rollout

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
HOSTILE = "a<b>&\"'</script>.png"


# ----------------------------------------------------------------------------------------------- hand-made data
def _entry(i, tp, fp, fn, parse="ok", task="detection", iou=0.8):
    return {"index": i, "image": f"/data/img_{i:02d}.png", "width": pic_width(i), "height": 30, "task": task, "picture": f"pictures/{i:05d}.png",
            "tp": tp, "fp": fp, "fn": fn, "mean_iou": iou if tp else None, "parse": parse, "n_pred": tp + fp,
            "n_gt": tp + fn, "prompt": f"Detect every object in image {i}.", "answer": f"answer text {i}",
            "pred": [{"desc": "circle", "bbox": [1, 2, 30, 40], "score": 0.25, "iou": iou}] * tp
            + [{"desc": "square", "bbox": [50, 50, 60, 60], "score": 0.1, "iou": None}] * fp,
            "gt": [{"desc": "circle", "bbox": [1, 2, 31, 40], "matched": True}] * tp
            + [{"desc": "star", "bbox": [5, 5, 9, 9], "matched": False}] * fn}


def handmade():
    """30 images: clean hits, misses, false positives, parse failures, a counting row and a hostile name/answer."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(30):
        tp, fp, fn = (int(v) for v in rng.integers(0, 4, 3))
        out.append(_entry(i, tp, fp, fn, iou=round(float(rng.uniform(0.5, 1.0)), 4)))
    out[3] = _entry(3, 0, 0, 2, parse="failed")
    out[7] = _entry(7, 1, 0, 1, parse="partial")
    out[13] = _entry(13, 0, 0, 0)  # nothing to find, nothing predicted
    out[11] = {**_entry(11, 0, 0, 0, task="counting"), "tp": None, "fp": None, "fn": None, "n_pred": 2, "n_gt": 5,
               "pred": None, "gt": None}
    out[5] = {**_entry(5, 1, 1, 0), "image": "/data/" + HOSTILE,
              "answer": "<|box_start|></script><script>window.__pwned = 1</script> & done"}
    return out


METRICS = {"det/AP_logprob": 0.41234, "det/AP50_logprob": 0.68751, "det/AP75_logprob": 0.4,
           "det/AP_constant": 0.3, "det/AP50_constant": 0.5556, "det/AP75_constant": 0.2,
           "det/exp_AP50_logprob": 0.6, "det/f1@0.5": 0.71449, "det/precision@0.5": 0.7, "det/recall@0.5": 0.73,
           "det/parse_failure_rate": 1 / 64, "det/invalid_box_rate": 0.0, "det/duplicate_rate": 0.01,
           "det/unknown_desc_rate": 0.0, "det/num_images": 64, "det/num_pred": 150, "det/num_gt": 160,
           "unfinished_rate": 0.0, "num_records": 64, "mystery_key": 2.5}


def pic_width(i):
    return 40 + 3 * i  # each picture has its own width: naturalWidth says which file loaded


@pytest.fixture(scope="module")
def handmade_report(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    images = handmade()
    os.makedirs(d / "pictures")
    for e in images:
        Image.new("RGB", (pic_width(e["index"]), 30), (200, 40 + 5 * e["index"], 90)).save(d / e["picture"])
    path = R.write_report(str(d), METRICS, images, {"checkpoint": "runs/demo/final_model", "step": 3800,
                                                     "config": "configs/demo.py", "num_images": 30})
    return path, images


# ----------------------------------------------------------------------------------------------- pure parts
class _ScriptData(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.inside, self.data, self.scripts = False, "", 0

    def handle_starttag(self, tag, attrs):
        self.scripts += tag == "script"
        self.inside = tag == "script" and ("id", "per-image-data") in attrs

    def handle_endtag(self, tag):
        self.inside = False

    def handle_data(self, data):
        if self.inside:
            self.data += data


def test_page_escapes_text_and_carries_the_entries_exactly():
    images = handmade()
    page = R.render_page(METRICS, images, {"config": "<b>cfg</b>"}, glossary_url="evaluation.md")
    assert HOSTILE not in page and "<b>cfg</b>" not in page and "&lt;b&gt;cfg&lt;/b&gt;" in page
    p = _ScriptData()
    p.feed(page)
    # only the two scripts of the page: the hostile answer's "</script><script>" did not open a third
    assert p.scripts == 2
    assert json.loads(p.data) == images


def test_worst_first_matches_a_brute_force_order():
    images = handmade()

    def bad(e):  # FP + FN, |count error| for counting, failed parses before everything
        b = abs(e["n_pred"] - e["n_gt"]) if e["tp"] is None else e["fp"] + e["fn"]
        return (e["parse"] == "failed", b)

    def iou(e):  # no matched pair: as bad as IoU 0, unless there was nothing to match
        return e["mean_iou"] if e["mean_iou"] is not None else (0.0 if e["n_pred"] or e["n_gt"] else 2.0)

    order = R.worst_first(images)
    assert order[0] == 3  # the parse failure
    for a, b in zip(order, order[1:]):
        ka, kb = bad(images[a]), bad(images[b])
        assert ka >= kb
        if ka == kb:  # ties: lower mean IoU first, then position
            assert (iou(images[a]), a) < (iou(images[b]), b)


def test_headline_uses_the_default_score_rule_and_rounds():
    h = {label: value for label, value, *_ in R.headline(METRICS)}
    assert h == {"AP50": "0.688", "AP": "0.412", "F1@0.5": "0.714", "parse rate": "98.4%"}
    no_coords = {k: v for k, v in METRICS.items() if "logprob" not in k}
    assert R.default_score_rule(no_coords) == "constant"
    assert {label: v for label, v, *_ in R.headline(no_coords)}["AP50"] == "0.556"
    assert R.fmt_value(float("nan")) == "–" and R.fmt_value(None) == "–" and R.fmt_value(64) == "64"
    assert R.fmt_value(0.0004, "rate") == "0.0%" and R.fmt_value(1.234567, "error") == "1.23"


def test_every_metric_lands_in_one_group_with_an_explanation():
    groups = R.metric_groups(METRICS)
    keys = [s.key for _, _, items in groups for s, _ in items]
    assert sorted(keys) == sorted(METRICS)  # each key exactly once
    assert groups[-1][0] == "Other" and [s.key for s, _ in groups[-1][2]] == ["mystery_key"]
    assert all(s.explain and s.anchor for _, _, items in groups[:-1] for s, _ in items)


def test_glossary_has_every_anchor_the_page_links_to():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "evaluation.md")).read()
    anchors = {s.anchor for _, _, specs in R._groups() for s in specs} | {a for _, a, _ in R._groups()}
    anchors |= {a for _, _, a, _ in R.headline(METRICS)}
    missing = [a for a in sorted(anchors) if f'<a id="{a}"></a>' not in doc]
    assert not missing, f"docs/evaluation.md lacks anchors {missing}"


# ----------------------------------------------------------------------------------------------- browser
@pytest.fixture(scope="module")
def browser():
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "playwright is not installed (pip install -r requirements-dev.txt)"
    if why is None and not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        why = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"browser test under CI: {why}")
        pytest.skip(why)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        yield b
        b.close()


def _open(browser, path, hash_=""):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.goto("file://" + os.path.abspath(path) + hash_)
    page.wait_for_load_state("load")
    return page, errors


def _row_order(page):
    return page.eval_on_selector_all("#image-table tbody tr", "rs => rs.map(r => +r.dataset.index)")


def _visible_rows(page):
    return page.eval_on_selector_all("#image-table tbody tr", "rs => rs.filter(r => !r.hidden).map(r => +r.dataset.index)")


def test_page_loads_sorts_filters_and_shows_an_image(browser, handmade_report, tmp_path):
    path, images = handmade_report
    page, errors = _open(browser, path)
    assert page.inner_text("#headline .big[data-key='AP50']") == "0.688"  # det/AP50_logprob 0.68751, rounded
    assert page.evaluate("window.__pwned") is None  # the hostile answer stayed text
    assert _row_order(page) == R.worst_first(images)

    by = {e["index"]: e for e in images}
    page.click("#image-table th[data-key='fn']")  # numbers: largest first, ties by position
    want = sorted(by, key=lambda i: (by[i]["fn"] is None, -(by[i]["fn"] or 0), i))
    assert _row_order(page) == want
    page.click("#image-table th[data-key='fn']")  # again: reversed direction, missing values still last
    want = sorted(by, key=lambda i: (by[i]["fn"] is None, by[i]["fn"] or 0, i))
    assert _row_order(page) == want
    page.click("#image-table th[data-key='mean-iou']")
    want = sorted(by, key=lambda i: (by[i]["mean_iou"] is None, -(by[i]["mean_iou"] or 0), i))
    assert _row_order(page) == want
    # the pictures follow the table's order
    figs = page.eval_on_selector_all("#gallery figure", "fs => fs.map(f => +f.dataset.index)")
    assert figs == want

    page.check("[data-filter='miss']")
    misses = {i for i, e in by.items() if (e["fn"] or 0) > 0 or (e["tp"] is None and e["n_pred"] < e["n_gt"])}
    assert set(_visible_rows(page)) == misses and 0 < len(misses) < len(images)
    page.check("[data-filter='parse']")  # filters combine with OR
    assert set(_visible_rows(page)) == misses | {i for i, e in by.items() if e["parse"] != "ok"}
    page.uncheck("[data-filter='miss']")
    assert set(_visible_rows(page)) == {3, 7}
    hidden_figs = page.eval_on_selector_all("#gallery figure", "fs => fs.filter(f => f.hidden).length")
    assert hidden_figs == len(images) - 2
    page.uncheck("[data-filter='parse']")
    page.check("[data-filter='fp']")
    fps = {i for i, e in by.items() if (e["fp"] or 0) > 0 or (e["tp"] is None and e["n_pred"] > e["n_gt"])}
    assert set(_visible_rows(page)) == fps
    assert page.inner_text("#shown") == f"{len(fps)} of {len(images)} images"
    page.uncheck("[data-filter='fp']")

    # lazy pictures: every one has loading=lazy and, once scrolled to, has loaded the right file
    assert page.eval_on_selector_all("#gallery img", "is => is.every(i => i.loading === 'lazy')")
    for fig in page.query_selector_all("#gallery figure"):
        fig.scroll_into_view_if_needed()
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.complete)")
    widths = page.eval_on_selector_all("#gallery figure", "fs => fs.map(f => [+f.dataset.index, "
                                       "f.querySelector('img').naturalWidth])")
    assert widths and all(w == pic_width(i) for i, w in widths)

    # a row click: that image's picture, answer and objects (the hostile name and answer shown as text)
    page.click("#row-5")
    assert page.is_visible("#detail")
    assert page.inner_text("#detail h3") == f"#5 {os.path.basename(HOSTILE)}"
    assert page.inner_text("#detail .note") == f"/data/{HOSTILE}"
    assert page.inner_text("#detail pre >> nth=1") == by[5]["answer"]
    page.wait_for_function("document.querySelector('#detail img').complete")
    assert page.eval_on_selector("#detail img", "i => i.naturalWidth") == pic_width(5)
    assert "#img-5" in page.url
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] == 1280
    assert not errors, errors


def test_hash_opens_an_image_view(browser, handmade_report):
    path, images = handmade_report
    page, errors = _open(browser, path, "#img-7")
    assert page.is_visible("#detail") and page.inner_text("#detail h3") == "#7 img_07.png"
    assert "MISS" in page.inner_text("#detail")  # its unmatched ground-truth object
    assert page.is_visible("#row-7.sel")
    assert not errors, errors


# ----------------------------------------------------------------------------------------------- from evaluate
class ScriptedSampler:
    """Stands in for rollout.sampler.Sampler: emits pre-made answers (token ids) with log-prob -0.1 each."""

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def generate(self, batch):
        B = batch["input_ids"].shape[0]
        rows = [self.answers[self.calls + b] for b in range(B)]
        self.calls += B
        tok = np.zeros((B, max(len(r) for r in rows)), np.int32)
        for b, r in enumerate(rows):
            tok[b, :len(r)] = r
        lp = np.where(tok != 0, -0.1, 0.0).astype(np.float32)
        return Rollout(tokens=tok, logprobs=lp, sample_logprobs=lp, coord_expectation=np.full(tok.shape, np.nan),
                       lengths=np.array([len(r) for r in rows], np.int32), finished=np.ones(B, bool))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """evaluate_records on 8 synthetic images: exact answers, a truncated one, garbage, one shifted box set, one
    with an extra box; pictures capped at 3 (worst first)."""
    d = str(tmp_path_factory.mktemp("syn"))
    paths = synthetic.write_split(d, "val", 8, seed=5, cfg=synthetic.SyntheticConfig(image_size=(64, 64)))
    recs, _ = records.read_jsonl(paths["jsonl"])
    tok = small_tokenizer()
    ids = token_ids_from_tokenizer(tok)
    enc = prompts.SampleEncoder(prompts.PromptConfig(image=ImageConfig(min_pixels=64 * 64, max_pixels=64 * 64)),
                                tokenizer=tok)

    def answer(rec, boxes=None, extra=()):
        objs = [protocols.AnswerObject(o.desc, box=tuple(b)) for o, b in
                zip(rec.objects, rec.boxes() if boxes is None else boxes)]
        objs += [protocols.AnswerObject(desc, box=b) for desc, b in extra]
        return protocols.serialize(objs, tok, ids).ids + [ids.eos]

    answers = [answer(r) for r in recs]
    answers[1] = [ids.coord_start + 5] * 7 + [ids.eos]  # garbage: a parse failure
    answers[2] = answer(recs[2], np.clip(recs[2].boxes() + [0.5, 0.0, 0.5, 0.0], 0, 1))  # shifted: misses + FPs
    answers[4] = answer(recs[4], extra=[(recs[4].objects[0].desc, (0.0, 0.0, 0.05, 0.05))])  # one extra box
    out = str(tmp_path_factory.mktemp("eval"))
    m = E.evaluate_records(ScriptedSampler(answers), recs, enc, model_config=prompts.released_model_config(enc.cfg, ids),
                           config=E.EvalConfig(batch_size=4, num_pictures=3), out_dir=out, progress=False,
                           run_info={"checkpoint": "ckpt/step_9", "step": 9})
    return m, out, recs, answers, tok


def test_per_image_json_agrees_with_the_metrics(evaluated):
    m, out, recs, answers, tok = evaluated
    per = json.load(open(os.path.join(out, "per_image.json")))
    assert [e["index"] for e in per] == list(range(len(recs)))
    assert [e["image"] for e in per] == [r.image for r in recs]
    tp, fp, fn = (sum(e[k] for e in per) for k in ("tp", "fp", "fn"))
    # the per-image counts pool to the metrics' precision/recall (the same matching rule)
    assert tp / (tp + fp) == pytest.approx(m["det/precision@0.5"], abs=1e-12)
    assert tp / (tp + fn) == pytest.approx(m["det/recall@0.5"], abs=1e-12)
    assert sum(e["parse"] == "failed" for e in per) / len(per) == pytest.approx(m["det/parse_failure_rate"])
    assert per[1]["parse"] == "failed" and per[4]["fp"] == 1 and per[4]["fn"] == 0 and per[2]["fn"] > 0
    for e, r in zip(per, recs):  # independent count of the ground truth; matched IoUs as an exact recomputation
        assert e["n_gt"] == len(r.objects) and e["tp"] + e["fn"] == len(r.objects)
        ious = [p["iou"] for p in e["pred"] if p["iou"] is not None]
        gts = r.boxes_px()
        for p in e["pred"]:
            if p["iou"] is not None:  # stored to 4 decimals: within 5e-5 of its IoU with a same-desc true box
                same = gts[np.array([o.desc == p["desc"] for o in r.objects])]
                assert np.min(np.abs(pairwise_iou_exact(np.array([p["bbox"]]), same)[0] - p["iou"])) <= 5e-5
                assert p["iou"] >= 0.5
        if ious:
            assert e["mean_iou"] == pytest.approx(np.mean(ious), abs=1e-4)  # mean of 4-decimal values
        else:
            assert e["mean_iou"] is None
        assert e["prompt"] == prompts.PromptConfig().instruction("detection")
        assert e["answer"] == tok.decode(answers[e["index"]], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
    # three pictures, for the three images with errors (the others are exact), the rest none
    assert [e["index"] for e in per if e["picture"]] == [1, 2, 4]
    assert all(os.path.exists(os.path.join(out, e["picture"])) for e in per if e["picture"])
    assert len(os.listdir(os.path.join(out, "pictures"))) == 3


def test_evaluated_report_in_the_browser(browser, evaluated):
    m, out, recs, *_ = evaluated
    page, errors = _open(browser, os.path.join(out, "index.html"))
    assert page.inner_text("#headline .big[data-key='AP50']") == f"{m['det/AP50_logprob']:.3f}"
    run = page.inner_text("#run")
    assert "ckpt/step_9" in run and "val.jsonl" in run and str(len(recs)) in run
    assert len(_row_order(page)) == len(recs)
    for fig in page.query_selector_all("#gallery figure"):
        fig.scroll_into_view_if_needed()
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].every(i => i.complete)")
    assert page.eval_on_selector_all("#gallery img", "is => is.map(i => i.naturalWidth)") == [
        Image.open(os.path.join(out, "pictures", f"{i:05d}.png")).size[0] for i in _row_order(page)[:3]]
    assert not errors, errors


def test_page_without_detection_records():
    m = {"grounding/acc@0.5": 0.625, "grounding/num": 8, "grounding/parse_failure_rate": 0.125,
         "counting/mae": 1.5, "counting/rmse": 2.0, "counting/parse_failure_rate": 0.0, "num_records": 12}
    assert [(label, v) for label, v, *_ in R.headline(m)] == [
        ("Acc@0.5", "0.625"), ("parse rate", "87.5%"), ("count MAE", "1.50"), ("parse rate", "100.0%")]
    assert [g[0] for g in R.metric_groups(m)] == ["Answer health", "Grounding", "Counting"]
    page = R.render_page(m, [], {"num_images": 12})
    assert "0.625" in page and "<table id=\"image-table\"" not in page  # no per-image section without entries
