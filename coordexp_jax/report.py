"""The evaluation report: one static `index.html` (data in -> HTML string), its pictures beside it.

`render_page(metrics, images, run_info)` returns the page; `write_report(out_dir, ...)` writes it as
`out_dir/index.html`. The page has, in order:
- a headline: AP50, AP, F1@0.5 and the parse rate under the default score rule (`logprob` when the metrics
  carry log-prob AP, i.e. the protocol has coordinate tokens; else `constant`);
- the run: checkpoint, step, config, data, number of images, date (`run_info`);
- the metrics grouped (detection AP per score rule, expectation boxes, matching at IoU 0.5, answer health,
  grounding, counting), each with a one-line explanation linked to its entry in docs/evaluation.md;
- a per-image table (TP / FP / FN, mean IoU, parse status, objects), worst images first, sortable by clicking a
  header and filtered by misses / false positives / parse failures (a few lines of vanilla JS, no network);
  clicking a row shows that image's picture, prompt, answer text and objects;
- the pictures, lazy-loaded (`loading="lazy"`), in the table's order and filter.

The page works opened from file:// (everything inline, pictures by relative path). Every text is escaped;
the per-image data travels as JSON in a `<script type="application/json">` with `<`, `>` and `&` escaped.

A per-image entry (also what `evaluate` writes to per_image.json) is a dict:
    index (int, 0-based position in the evaluated records), image (path), width, height (pixels of the original
    image; optional: thumbnails then show the picture whole), task, picture (path relative to the
    page, or None), tp, fp, fn (ints; None for counting), mean_iou (mean IoU of the matched pairs, None when
    none), parse ("ok" | "partial" | "failed"), n_pred, n_gt (objects; for counting the stated and true count),
    prompt, answer (decoded answer text), and optionally pred / gt: lists of {"desc", "bbox" (pixels),
    ["score"], "iou" / "matched"} for the per-image view; HOI records (`evaluate_hoi`) may add reference (the
    referring answer) and heatmaps (relative paths of per-box attention heatmaps), shown in that view.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

PARSE_STATUSES = ("ok", "partial", "failed")


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One reported figure: `key` in the metrics dict, its label, how to show it (`fmt`: "score" 3 decimals,
    "rate" a percentage, "count" an integer, "error" 2 decimals), its glossary anchor in docs/evaluation.md and
    a one-line explanation."""

    key: str
    label: str
    fmt: str
    anchor: str
    explain: str


_RULE_NOTE = ("logprob: boxes ranked by exp(mean log-prob of their 4 coordinate tokens); constant: every box "
              "scores 1 (ranked in the order written)")


_GROUP_NOTES = {"detection-ap": _RULE_NOTE,
                "expectation-boxes": "each coordinate read as the expectation of its distribution over the coordinate "
                                     "bins instead of the bin written; " + _RULE_NOTE}


def _ap_specs(prefix: str, rule: str, what: str) -> list[MetricSpec]:
    p = f"det/{prefix}"
    return [
        MetricSpec(f"{p}AP50_{rule}", f"{prefix}AP50 ({rule})", "score", "ap50", f"COCO AP at IoU >= 0.5{what}"),
        MetricSpec(f"{p}AP_{rule}", f"{prefix}AP ({rule})", "score", "ap", f"COCO AP averaged over IoU 0.50:0.95{what}"),
        MetricSpec(f"{p}AP75_{rule}", f"{prefix}AP75 ({rule})", "score", "ap75",
                   f"COCO AP at IoU >= 0.75, tight boxes{what}"),
    ]


def _groups() -> list[tuple[str, str, list[MetricSpec]]]:
    """(title, anchor, specs) of every metric group, in page order."""
    written, exp = "", " of the expectation boxes"
    return [
        ("Detection AP", "detection-ap", _ap_specs("", "logprob", written) + _ap_specs("", "constant", written)),
        ("Expectation boxes", "expectation-boxes",
         _ap_specs("exp_", "logprob", exp) + _ap_specs("exp_", "constant", exp) + [
             MetricSpec("det/exp_f1@0.5", "exp_F1@0.5", "score", "f1",
                        "F1 at IoU 0.5 of the expectation boxes (greedy one-to-one matching, same desc)")]),
        ("Matching at IoU 0.5", "matching", [
            MetricSpec("det/f1@0.5", "F1@0.5", "score", "f1",
                       "harmonic mean of precision and recall, greedy one-to-one matching at IoU >= 0.5, same desc"),
            MetricSpec("det/precision@0.5", "precision@0.5", "score", "precision",
                       "share of predicted boxes that match a true box (TP / predicted)"),
            MetricSpec("det/recall@0.5", "recall@0.5", "score", "recall",
                       "share of true boxes that some predicted box matches (TP / true)"),
            MetricSpec("det/num_images", "detection images", "count", "counts", "detection images evaluated"),
            MetricSpec("det/num_pred", "predicted boxes", "count", "counts", "boxes in all answers"),
            MetricSpec("det/num_gt", "true boxes", "count", "counts", "boxes in the ground truth"),
        ]),
        ("Answer health", "answer-health", [
            MetricSpec("det/parse_failure_rate", "parse failures", "rate", "parse-failure-rate",
                       "detection answers from which no object could be read (and that were not a clean empty list)"),
            MetricSpec("det/invalid_box_rate", "invalid boxes", "rate", "invalid-box-rate",
                       "predicted boxes that are empty, inverted or outside the image"),
            MetricSpec("det/duplicate_rate", "duplicates", "rate", "duplicate-rate",
                       "predicted boxes with IoU > 0.9 to an earlier box of the same desc"),
            MetricSpec("det/unknown_desc_rate", "unknown descs", "rate", "unknown-desc-rate",
                       "predicted boxes whose desc is not one of the categories (left out of AP)"),
            MetricSpec("unfinished_rate", "unfinished answers", "rate", "unfinished-rate",
                       "answers cut at the token limit before the end-of-answer token"),
            MetricSpec("num_records", "images evaluated", "count", "counts", "records of every task evaluated"),
        ]),
        ("Grounding", "grounding", [
            MetricSpec("grounding/acc@0.5", "Acc@0.5", "score", "acc05",
                       "share of referring expressions whose first predicted box has IoU >= 0.5 with the truth"),
            MetricSpec("grounding/parse_failure_rate", "parse failures", "rate", "parse-failure-rate",
                       "grounding answers from which no box could be read"),
            MetricSpec("grounding/num", "grounding images", "count", "counts",
                       "grounding records with one true box evaluated"),
        ]),
        ("Human-object interaction: referring", "hoi-referring", [
            MetricSpec("hoi_referring/exact_match", "exact match", "score", "hoi-exact-match",
                       "share of answers equal to the reference after SQuAD normalisation (case, punctuation, "
                       "articles)"),
            MetricSpec("hoi_referring/token_f1", "token F1", "score", "hoi-token-f1",
                       "SQuAD token F1 of the answer against the reference, averaged"),
            MetricSpec("hoi_referring/bertscore_F1", "BERTScore F1", "score", "hoi-bertscore",
                       "BERTScore F1 with the local model of eval.bertscore_model (not rescaled)"),
            MetricSpec("hoi_referring/bertscore_P", "BERTScore P", "score", "hoi-bertscore", "BERTScore precision"),
            MetricSpec("hoi_referring/bertscore_R", "BERTScore R", "score", "hoi-bertscore", "BERTScore recall"),
            MetricSpec("hoi_referring/num", "referring records", "count", "counts", "referring records evaluated"),
        ]),
        ("Human-object interaction: grounding", "hoi-grounding", [
            MetricSpec("hoi_grounding/AR", "AR", "score", "hoi-ar",
                       "recall of the true (person, object) pairs averaged over IoU 0.50:0.95; a pair counts when "
                       "both boxes pass"),
            MetricSpec("hoi_grounding/AR@0.5", "AR@0.5", "score", "hoi-ar50", "pair recall at IoU >= 0.5"),
            MetricSpec("hoi_grounding/AR@0.75", "AR@0.75", "score", "hoi-ar75", "pair recall at IoU >= 0.75"),
            MetricSpec("hoi_grounding/ARs", "ARs", "score", "hoi-ar-size", "AR of pairs with a small object box "
                       "(< 32² px)"),
            MetricSpec("hoi_grounding/ARm", "ARm", "score", "hoi-ar-size", "AR of pairs with a medium object box "
                       "(32² to 96² px)"),
            MetricSpec("hoi_grounding/ARl", "ARl", "score", "hoi-ar-size", "AR of pairs with a large object box "
                       "(>= 96² px)"),
            MetricSpec("hoi_grounding/parse_failure_rate", "parse failures", "rate", "parse-failure-rate",
                       "grounding answers with no (person, object) pair"),
            MetricSpec("hoi_grounding/num_queries", "grounding records", "count", "counts",
                       "grounding records with true pairs evaluated"),
            MetricSpec("hoi_grounding/num_pairs", "true pairs", "count", "counts", "true (person, object) pairs"),
        ]),
        ("Counting", "counting", [
            MetricSpec("counting/mae", "count MAE", "error", "count-mae", "mean absolute error of the stated count"),
            MetricSpec("counting/rmse", "count RMSE", "error", "count-rmse",
                       "root mean squared error of the stated count"),
            MetricSpec("counting/parse_failure_rate", "parse failures", "rate", "parse-failure-rate",
                       "counting answers without a readable count (counted as 0)"),
        ]),
    ]


def metric_groups(metrics: Mapping[str, float]) -> list[tuple[str, str, list[tuple[MetricSpec, float]]]]:
    """The metrics present, grouped: [(title, anchor, [(spec, value)])] in page order; keys no group names go
    to a last group "Other" (label = key, no explanation). Empty groups are left out."""
    out, seen = [], set()
    for title, anchor, specs in _groups():
        items = [(s, metrics[s.key]) for s in specs if s.key in metrics]
        seen.update(s.key for s in specs)
        if items:
            out.append((title, anchor, items))
    other = [(MetricSpec(k, k, "auto", "", ""), v) for k, v in metrics.items() if k not in seen]
    if other:
        out.append(("Other", "other", other))
    return out


def default_score_rule(metrics: Mapping[str, float]) -> str:
    """'logprob' when the metrics carry log-prob AP (the protocol has coordinate tokens), else 'constant'."""
    return "logprob" if "det/AP50_logprob" in metrics else "constant"


def headline(metrics: Mapping[str, float]) -> list[tuple[str, str, str, str]]:
    """The figures shown first and large: [(label, formatted value, glossary anchor, explanation)].

    Detection: AP50, AP (default score rule), F1@0.5, parse rate (1 - parse failure rate). Without detection
    records: grounding Acc@0.5, HOI referring exact match and token F1, HOI grounding AR@0.5 and AR, and/or
    counting MAE (with their parse rates where they have one)."""
    out = []
    if "det/f1@0.5" in metrics:
        rule = default_score_rule(metrics)
        for k, label, anchor in ((f"det/AP50_{rule}", "AP50", "ap50"), (f"det/AP_{rule}", "AP", "ap")):
            if k in metrics:
                out.append((label, fmt_value(metrics[k], "score"), anchor, f"COCO, {rule} scores"))
        out.append(("F1@0.5", fmt_value(metrics["det/f1@0.5"], "score"), "f1", "greedy matching at IoU 0.5"))
        if "det/parse_failure_rate" in metrics:
            out.append(("parse rate", fmt_value(1.0 - float(metrics["det/parse_failure_rate"]), "rate"),
                        "parse-failure-rate", "answers that could be read"))
        return out
    if "grounding/acc@0.5" in metrics:
        out.append(("Acc@0.5", fmt_value(metrics["grounding/acc@0.5"], "score"), "acc05", "grounding"))
        out.append(("parse rate", fmt_value(1.0 - float(metrics.get("grounding/parse_failure_rate", 0.0)), "rate"),
                    "parse-failure-rate", "grounding answers that could be read"))
    if "hoi_referring/exact_match" in metrics:
        out.append(("exact match", fmt_value(metrics["hoi_referring/exact_match"], "score"), "hoi-exact-match",
                    "HOI referring"))
        out.append(("token F1", fmt_value(metrics["hoi_referring/token_f1"], "score"), "hoi-token-f1",
                    "HOI referring"))
    if "hoi_grounding/AR@0.5" in metrics:
        out.append(("AR@0.5", fmt_value(metrics["hoi_grounding/AR@0.5"], "score"), "hoi-ar50", "HOI grounding pairs"))
        out.append(("AR", fmt_value(metrics["hoi_grounding/AR"], "score"), "hoi-ar", "IoU 0.50:0.95"))
    if "counting/mae" in metrics:
        out.append(("count MAE", fmt_value(metrics["counting/mae"], "error"), "count-mae", "counting"))
        out.append(("parse rate", fmt_value(1.0 - float(metrics.get("counting/parse_failure_rate", 0.0)), "rate"),
                    "parse-failure-rate", "counting answers that could be read"))
    return out


def fmt_value(v, fmt: str = "auto") -> str:
    """A figure rounded for reading: "score" 0.693, "rate" 1.6%, "count" 64, "error" 0.25; None/NaN -> "–"."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if fmt == "auto":
        fmt = "count" if isinstance(v, int) or float(v).is_integer() else "score"
    if fmt == "rate":
        return f"{100.0 * float(v):.1f}%"
    if fmt == "count":
        return str(int(round(float(v))))
    if fmt == "error":
        return f"{float(v):.2f}"
    return f"{float(v):.3f}"


def badness(e: Mapping) -> float:
    """How wrong one image is, for "worst first": FP + FN (detection/grounding) or |stated - true count|
    (counting), plus 1000 for a failed parse (those come first)."""
    if e.get("tp") is None:  # counting: no box matching
        bad = abs((e.get("n_pred") or 0) - (e.get("n_gt") or 0))
    else:
        bad = (e.get("fp") or 0) + (e.get("fn") or 0)
    return bad + (1000 if e.get("parse") == "failed" else 0)


def worst_first(images: Sequence[Mapping]) -> list[int]:
    """Positions into `images`, worst first: `badness` descending, then mean IoU ascending (no matched pair counts
    as 0, or as the best when the image had nothing to match: no true and no predicted object), then position."""
    def key(i):
        e = images[i]
        iou = e.get("mean_iou")
        if iou is None or not math.isfinite(iou):
            iou = 0.0 if (e.get("n_pred") or e.get("n_gt")) else 2.0
        return (-badness(e), iou, i)
    return sorted(range(len(images)), key=key)


def default_glossary_url() -> str:
    """docs/evaluation.md of this checkout as a file:// URI when it exists (an editable install), else the
    repository-relative path."""
    p = Path(__file__).resolve().parent.parent / "docs" / "evaluation.md"
    return p.as_uri() if p.exists() else "docs/evaluation.md"


def default_run_info(records: Sequence = (), **known) -> dict:
    """`run_info` filled with what is known without a caller: number of images, the data files (from the
    records' `source` "file:line") and the date (UTC); `known` keys (checkpoint, step, config, ...) override."""
    files = sorted({str(getattr(r, "source", "")).rsplit(":", 1)[0] for r in records} - {"", "<memory>"})
    info = {"num_images": len(records),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if files:
        info["data"] = ", ".join(files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")
    info.update({k: v for k, v in known.items() if v is not None})
    return info


_RUN_LABELS = (("checkpoint", "checkpoint"), ("step", "step"), ("config", "config"), ("data", "data"),
               ("num_images", "images"), ("date", "date"))


def _e(s) -> str:
    return html.escape("" if s is None else str(s), quote=True)


def _json_for_script(obj) -> str:
    """JSON safe inside <script>: no '</script>' or HTML comment can be formed; NaN -> null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    text = json.dumps(clean(obj), ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _num_attr(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return str(int(v)) if isinstance(v, int) else repr(float(v))


# (key, header, type, tooltip) of the per-image table's columns
_COLUMNS = (("index", "#", "num", "position in the evaluated records"),
            ("image", "image", "str", "image file"),
            ("task", "task", "str", "detection, grounding or counting"),
            ("errors", "errors", "num", "FP + FN (counting: |stated - true count|); failed parses first"),
            ("tp", "TP", "num", "true positives: predicted boxes matching a true box at IoU >= 0.5"),
            ("fp", "FP", "num", "false positives: predicted boxes matching no true box"),
            ("fn", "FN", "num", "misses: true boxes no predicted box matches"),
            ("mean_iou", "mean IoU", "num", "mean IoU of the matched pairs"),
            ("parse", "parse", "str", "ok, partial (something dropped or unfinished) or failed"),
            ("n_pred", "pred", "num", "predicted objects (counting: stated count)"),
            ("n_gt", "true", "num", "true objects"))


def _flags(e: Mapping) -> str:
    f = []
    if (e.get("fn") or 0) > 0 or (e.get("tp") is None and (e.get("n_pred") or 0) < (e.get("n_gt") or 0)):
        f.append("miss")
    if (e.get("fp") or 0) > 0 or (e.get("tp") is None and (e.get("n_pred") or 0) > (e.get("n_gt") or 0)):
        f.append("fp")
    if e.get("parse") != "ok":
        f.append("parse")
    return " ".join(f)


def _row(e: Mapping) -> str:
    err = badness(e)
    vals = {"index": e["index"], "image": os.path.basename(str(e.get("image", ""))), "task": e.get("task"),
            "errors": err, "tp": e.get("tp"), "fp": e.get("fp"), "fn": e.get("fn"), "mean_iou": e.get("mean_iou"),
            "parse": e.get("parse"), "n_pred": e.get("n_pred"), "n_gt": e.get("n_gt")}
    shown = dict(vals, errors=("parse failed" if e.get("parse") == "failed" else int(err % 1000)),
                 mean_iou=fmt_value(vals["mean_iou"], "score"))
    attrs = " ".join(f"data-{k.replace('_', '-')}=\"{_e(_num_attr(vals[k]) if t == 'num' else vals[k])}\""
                     for k, _, t, _ in _COLUMNS)
    cells = "".join(f"<td class=\"c-{k}\">{_e('–' if shown[k] is None else shown[k])}</td>" for k, *_ in _COLUMNS)
    return (f"<tr id=\"row-{int(e['index'])}\" tabindex=\"0\" data-flags=\"{_flags(e)}\" {attrs}"
            f" class=\"parse-{_e(e.get('parse'))}\">{cells}</tr>")


def _figure(e: Mapping) -> str:
    name = os.path.basename(str(e.get("image", "")))
    stats = (f"TP {e.get('tp')} · FP {e.get('fp')} · FN {e.get('fn')}" if e.get("tp") is not None
             else f"count {e.get('n_pred')} / {e.get('n_gt')}")
    w, h = e.get("width"), e.get("height")
    crop = f" style=\"aspect-ratio:{int(w)}/{int(h)}\"" if w and h else ""  # the image, without its legend strip
    return (f"<figure data-index=\"{int(e['index'])}\"><img loading=\"lazy\" src=\"{_e(e['picture'])}\"{crop} "
            f"alt=\"{_e(name)}\"><figcaption>#{int(e['index'])} {_e(name)}<br>{_e(stats)}</figcaption></figure>")


def render_page(metrics: Mapping[str, float], images: Sequence[Mapping], run_info: Mapping | None = None, *,
                title: str = "Evaluation report", glossary_url: str | None = None, legend: str = "") -> str:
    """The report page as one HTML string (see the module docstring for the layout and the entries' keys).

    metrics: the dict `evaluate.evaluate_records` returns; images: per-image entries; run_info: {checkpoint,
    step, config, data, num_images, date, ...} (unknown keys are shown after those, in their order);
    glossary_url: where the metric names link (default `default_glossary_url()`); legend: HTML shown above the
    pictures (trusted, not escaped: e.g. `visualize.legend_html()`).
    Raises ValueError for an entry without an int `index`."""
    for e in images:
        if not isinstance(e.get("index"), int):
            raise ValueError(f"per-image entry without an int 'index': {dict(e)!r:.120}")
    g = glossary_url if glossary_url is not None else default_glossary_url()
    link = lambda anchor, text: (f"<a href=\"{_e(g)}#{_e(anchor)}\">{_e(text)}</a>" if anchor else _e(text))
    parts = [f"<h1>{_e(title)}</h1>"]

    heads = headline(metrics)
    if heads:
        cards = "".join(f"<div class=\"card\"><div class=\"big\" data-key=\"{_e(label)}\">{_e(value)}</div>"
                        f"<div class=\"lbl\">{link(anchor, label)}</div><div class=\"sub\">{_e(sub)}</div></div>"
                        for label, value, anchor, sub in heads)
        parts.append(f"<section id=\"headline\">{cards}</section>")

    info = dict(run_info or {})
    rows = [(label, info.pop(k)) for k, label in _RUN_LABELS if k in info]
    rows += list(info.items())
    if rows:
        cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
        parts.append(f"<section id=\"run\"><h2>Run</h2><table class=\"kv\">{cells}</table></section>")

    groups = []
    for gtitle, ganchor, items in metric_groups(metrics):
        trs = "".join(f"<tr data-key=\"{_e(s.key)}\"><th>{link(s.anchor, s.label)}</th>"
                      f"<td class=\"num\">{_e(fmt_value(v, s.fmt))}</td><td class=\"explain\">{_e(s.explain)}</td></tr>"
                      for s, v in items)
        note = f"<p class=\"note\">{_e(_GROUP_NOTES[ganchor])}</p>" if ganchor in _GROUP_NOTES else ""
        groups.append(f"<div class=\"group\" id=\"group-{_e(ganchor)}\"><h3>{link(ganchor, gtitle)}</h3>{note}"
                      f"<table class=\"metrics\">{trs}</table></div>")
    if groups:
        parts.append(f"<section id=\"metrics\"><h2>Metrics</h2><p class=\"note\">Every name links to its entry in "
                     f"<a href=\"{_e(g)}\">the glossary</a> (docs/evaluation.md).</p><div class=\"groups\">{''.join(groups)}</div></section>")

    if images:
        order = worst_first(images)
        heads_html = "".join(f"<th data-key=\"{k.replace('_', '-')}\" data-type=\"{t}\" title=\"{_e(tip)}\">"
                             f"{_e(h)}</th>" for k, h, t, tip in _COLUMNS)
        body = "".join(_row(images[i]) for i in order)
        n_pic = sum(1 for e in images if e.get("picture"))
        parts.append(
            "<section id=\"images\"><h2>Images</h2>"
            "<div class=\"filters\">Show only: "
            "<label><input type=\"checkbox\" data-filter=\"miss\"> misses (FN &gt; 0)</label>"
            "<label><input type=\"checkbox\" data-filter=\"fp\"> false positives (FP &gt; 0)</label>"
            "<label><input type=\"checkbox\" data-filter=\"parse\"> parse failures</label>"
            f"<span id=\"shown\">{len(images)} of {len(images)} images</span></div>"
            "<p class=\"note\">Worst first (FP + FN). Click a column to sort, a row to see its picture and answer."
            f"{'' if n_pic == len(images) else f' Pictures for the {n_pic} worst images.'}</p>"
            "<div class=\"split\"><div class=\"tablewrap\"><table id=\"image-table\"><thead><tr>"
            f"{heads_html}</tr></thead><tbody>{body}</tbody></table></div>"
            "<aside id=\"detail\" hidden></aside></div>"
            f"<h2>Pictures</h2>{legend}<div id=\"gallery\">"
            + "".join(_figure(images[i]) for i in order if images[i].get("picture")) + "</div></section>")
        parts.append(f"<script type=\"application/json\" id=\"per-image-data\">{_json_for_script(list(images))}"
                     "</script>")
        parts.append(f"<script>{_JS}</script>")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
            f"content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title><style>{_CSS}</style>"
            f"</head><body>{''.join(parts)}</body></html>")


def write_report(out_dir: str, metrics: Mapping[str, float], images: Sequence[Mapping],
                 run_info: Mapping | None = None, **kwargs) -> str:
    """Writes `render_page(...)` to `out_dir/index.html` (the pictures are expected beside it under the
    entries' relative `picture` paths) and returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "index.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_page(metrics, images, run_info, **kwargs))
    return path


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px 24px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:0 0 12px}h2{font-size:17px;margin:22px 0 8px}h3{font-size:14px;margin:0 0 4px}
a{color:#0b57d0;text-decoration:none}a:hover{text-decoration:underline}
#headline{display:flex;gap:12px;flex-wrap:wrap}
.card{border:1px solid #d0d4da;border-radius:8px;padding:10px 18px;min-width:120px;background:#f6f8fa}
.card .big{font-size:34px;font-weight:600;font-variant-numeric:tabular-nums}.card .lbl{font-size:15px}
.card .sub{font-size:12px;color:#5f6368}
table{border-collapse:collapse}.kv th{text-align:left;padding:1px 12px 1px 0;color:#5f6368;font-weight:500}
.groups{display:grid;grid-template-columns:repeat(auto-fill,minmax(430px,1fr));gap:10px 20px}
.metrics th{text-align:left;font-weight:500;padding:1px 8px 1px 0;white-space:nowrap}
.metrics td.num{text-align:right;padding:1px 10px;font-variant-numeric:tabular-nums}
.metrics td.explain{color:#5f6368;font-size:12px}.note{color:#5f6368;font-size:12px;margin:4px 0}
.filters label{margin-right:14px}#shown{color:#5f6368}
.split{display:flex;gap:16px;align-items:flex-start}
.tablewrap{max-height:75vh;overflow:auto;border:1px solid #d0d4da;flex:0 0 auto}
#image-table th{position:sticky;top:0;background:#eef1f4;cursor:pointer;padding:3px 8px;user-select:none;
 white-space:nowrap}
#image-table th[aria-sort=ascending]::after{content:" \\25B2"}#image-table th[aria-sort=descending]::after{content:" \\25BC"}
#image-table td{padding:2px 8px;border-top:1px solid #eceff1;font-variant-numeric:tabular-nums;white-space:nowrap}
#image-table tbody tr{cursor:pointer}#image-table tbody tr:hover{background:#f1f5fb}
#image-table tr.sel{background:#dbe8fb}#image-table tr.parse-failed td.c-parse{color:#b3261e;font-weight:600}
#image-table tr.parse-partial td.c-parse{color:#9a6700}
#detail{position:sticky;top:8px;flex:1 1 360px;max-width:640px;max-height:96vh;overflow:auto;border:1px solid #d0d4da;border-radius:8px;padding:10px}
#detail img{max-width:100%;image-rendering:auto}#detail pre{white-space:pre-wrap;word-break:break-word;background:#f6f8fa;
 padding:6px;font-size:12px;max-height:220px;overflow:auto}
#detail table td,#detail table th{padding:1px 8px;font-size:12px;text-align:left}
#detail .close{float:right;cursor:pointer;border:0;background:none;font-size:18px}
#gallery{display:flex;flex-wrap:wrap;gap:10px}#gallery figure{margin:0;width:200px;cursor:pointer}
#gallery img{width:200px;height:auto;min-height:40px;background:#eceff1;object-fit:cover;object-position:top}
#gallery figcaption{font-size:12px;color:#444}
"""

_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("per-image-data").textContent);
  var byIndex = {};
  data.forEach(function (d) { byIndex[d.index] = d; });
  var table = document.getElementById("image-table");
  var tbody = table.tBodies[0];
  var gallery = document.getElementById("gallery");
  var detail = document.getElementById("detail");
  var figs = {};
  Array.prototype.forEach.call(gallery.querySelectorAll("figure"), function (f) { figs[f.dataset.index] = f; });
  var sortKey = "errors", sortDir = -1;

  function cell(tr, key) { return tr.getAttribute("data-" + key); }
  function sortRows(key, dir, type) {
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = cell(a, key), y = cell(b, key), c;
      if (type === "num") {
        var ex = x === "", ey = y === "";
        if (ex || ey) { c = ex === ey ? 0 : (ex ? 1 : -1); }  // missing values last, both directions
        else { c = dir * (parseFloat(x) - parseFloat(y)); }
      } else { c = dir * x.localeCompare(y); }
      return c || (parseInt(cell(a, "index"), 10) - parseInt(cell(b, "index"), 10));
    });
    rows.forEach(function (r) { tbody.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      if (th.dataset.key === key) th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    });
    sortKey = key; sortDir = dir;
    syncGallery();
  }
  function applyFilters() {
    var on = Array.prototype.filter.call(document.querySelectorAll("[data-filter]"), function (c) { return c.checked; })
      .map(function (c) { return c.dataset.filter; });
    var n = 0;
    Array.prototype.forEach.call(tbody.rows, function (tr) {
      var flags = (tr.dataset.flags || "").split(" ");
      var show = on.length === 0 || on.some(function (f) { return flags.indexOf(f) >= 0; });
      tr.hidden = !show;
      if (show) n++;
    });
    document.getElementById("shown").textContent = n + " of " + tbody.rows.length + " images";
    syncGallery();
  }
  function syncGallery() {  // the pictures follow the table's order and filter
    Array.prototype.forEach.call(tbody.rows, function (tr) {
      var f = figs[cell(tr, "index")];
      if (f) { f.hidden = tr.hidden; gallery.appendChild(f); }
    });
  }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  function num(v, d) { return v === null || v === undefined ? "\u2013" : Number(v).toFixed(d); }
  function objTable(title, objs, gt) {
    var wrap = el("div");
    wrap.appendChild(el("h3", title + " (" + objs.length + ")"));
    if (!objs.length) return wrap;
    var t = el("table"), h = t.insertRow();
    ["desc", "box (px)", gt ? "matched" : "IoU", gt ? "" : "score"].forEach(function (s) { h.appendChild(el("th", s)); });
    objs.forEach(function (o) {
      var r = t.insertRow();
      r.insertCell().textContent = o.desc;
      r.insertCell().textContent = (o.bbox || []).map(function (v) { return Math.round(v); }).join(", ");
      r.insertCell().textContent = gt ? (o.matched ? "yes" : "MISS") : (o.iou === null || o.iou === undefined ? "FP" : num(o.iou, 2));
      r.insertCell().textContent = gt ? "" : (o.score === undefined ? "" : num(o.score, 2));
    });
    wrap.appendChild(t);
    return wrap;
  }
  function show(index, scroll) {
    var d = byIndex[index];
    if (!d) return;
    Array.prototype.forEach.call(tbody.querySelectorAll("tr.sel"), function (r) { r.classList.remove("sel"); });
    var tr = document.getElementById("row-" + index);
    if (tr) { tr.classList.add("sel"); if (scroll) tr.scrollIntoView({block: "nearest"}); }
    detail.textContent = "";
    var close = el("button", "\u00d7", "close");
    close.title = "close";
    close.onclick = function () { detail.hidden = true; if (tr) tr.classList.remove("sel"); };
    detail.appendChild(close);
    var name = String(d.image).split(/[\\/]/).pop();
    detail.appendChild(el("h3", "#" + d.index + " " + name));
    detail.appendChild(el("div", d.image, "note"));
    var stats = d.tp === null || d.tp === undefined
      ? "count " + d.n_pred + " stated, " + d.n_gt + " true"
      : "TP " + d.tp + " \u00b7 FP " + d.fp + " \u00b7 FN " + d.fn + " \u00b7 mean IoU " + num(d.mean_iou, 3);
    detail.appendChild(el("p", d.task + " \u00b7 " + stats + " \u00b7 parse " + d.parse));
    if (d.picture) { var img = el("img"); img.src = d.picture; img.alt = d.image; detail.appendChild(img); }
    else detail.appendChild(el("p", "(no picture: over the picture limit)", "note"));
    if (d.prompt) { detail.appendChild(el("h3", "Prompt")); detail.appendChild(el("pre", d.prompt)); }
    detail.appendChild(el("h3", "Answer")); detail.appendChild(el("pre", d.answer || "(empty)"));
    if (d.reference !== undefined) { detail.appendChild(el("h3", "Reference")); detail.appendChild(el("pre", d.reference)); }
    (d.heatmaps || []).forEach(function (src) {  // HOI: one attention heatmap per prompt box
      var h = el("img"); h.src = src; h.alt = src; h.className = "heatmap"; detail.appendChild(h);
    });
    if (d.pred) detail.appendChild(objTable("Predicted", d.pred, false));
    if (d.gt) detail.appendChild(objTable("Ground truth", d.gt, true));
    detail.hidden = false;
    if (history.replaceState) history.replaceState(null, "", "#img-" + index);
  }
  table.tHead.addEventListener("click", function (ev) {
    var th = ev.target.closest("th");
    if (!th) return;
    var key = th.dataset.key;
    var dir = key === sortKey ? -sortDir : (th.dataset.type === "num" && key !== "index" ? -1 : 1);
    sortRows(key, dir, th.dataset.type);
  });
  tbody.addEventListener("click", function (ev) {
    var tr = ev.target.closest("tr");
    if (tr) show(parseInt(cell(tr, "index"), 10), false);
  });
  tbody.addEventListener("keydown", function (ev) {
    var tr = ev.target.closest("tr");
    if (tr && ev.key === "Enter") show(parseInt(cell(tr, "index"), 10), false);
  });
  gallery.addEventListener("click", function (ev) {
    var f = ev.target.closest("figure");
    if (f) { show(parseInt(f.dataset.index, 10), true); detail.scrollIntoView({block: "nearest"}); }
  });
  Array.prototype.forEach.call(document.querySelectorAll("[data-filter]"), function (c) {
    c.addEventListener("change", applyFilters);
  });
  // the page comes sorted worst first (report.worst_first: FP + FN descending, then mean IoU ascending)
  table.tHead.querySelector("th[data-key=errors]").setAttribute("aria-sort", "descending");
  var m = /^#img-(\d+)$/.exec(location.hash);
  if (m) show(parseInt(m[1], 10), true);
})();
"""
