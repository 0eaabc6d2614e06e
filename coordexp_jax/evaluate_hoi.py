"""HOI evaluation: roll the model out over human-object interaction records (data/hoi.py), score the answers,
draw the spatial-linking attention heatmaps.

The prompt of a record is every turn before its last (the answer) and `<|im_start|>assistant\\n`
(`data.hoi.encode_hoi_prompts`; a tool-calling record's earlier assistant turn and zoomed crop are part of the
prompt, so only the final answer is generated), with the prompt boxes' `links` passed to the model at prefill
(`rollout.sampler`). Greedy decoding, `eval.max_new_tokens` tokens at most.

Per task (`metrics_hoi`, docs/evaluation.md "Human-object interaction"):
- referring (boxes -> action text): exact match and token F1 (SQuAD normalisation) of the answer against the
  record's answer; BERTScore P / R / F1 with the local model in `eval.bertscore_model` when set. The answer is the
  generated text without special tokens; an `<answer>...</answer>` span, when present, is taken alone.
- grounding (action query -> boxes): the answer's boxes read as (person, object) pairs (`answer_pairs`), against
  the record's answer pairs: AR, AR@0.5, AR@0.75, ARs / ARm / ARl; a pair counts when both boxes pass the IoU
  threshold. Boxes are compared in pixels of the original image (the first image of the record).

Keys of the metrics dict: `hoi_referring/{exact_match, token_f1, num, bertscore_P, bertscore_R, bertscore_F1}`,
`hoi_grounding/{AR, AR@0.5, AR@0.75, ARs, ARm, ARl, num_queries, num_pairs, parse_failure_rate}`,
`unfinished_rate`, `num_records`.

With `out_dir`: metrics.json, predictions.jsonl (one line per record: task, answer text, parsed pairs in pixels,
reference), per_image.json and index.html (`report`), pictures/NNNNN.png (grounding: predicted and true boxes as
`visualize.draw_prediction` draws them; referring: the image with its prompt boxes, and with a spatial-linking
module the person / object / interaction heatmaps side by side, `visualize.draw_attention_panels`) and, for
referring records of a model with the module, one heatmap per box under heatmaps/NNNNN_<k>_<kind>.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from coordexp_jax import metrics_hoi as MH

log = logging.getLogger(__name__)

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_SPECIAL = re.compile(r"<\|[a-z_]+\|>")


@dataclasses.dataclass(frozen=True)
class HOIEvalConfig:
    """batch_size: prompts per rollout; num_pictures: pictures (and heatmaps) of each task, worst records first,
    0 = all;
    max_records: 0 = all; bertscore_model: a local transformers model directory for BERTScore ('' = off)."""

    batch_size: int = 16
    num_pictures: int = 0
    max_records: int = 0
    bertscore_model: str = ""


def answer_text(text: str) -> str:
    """A referring answer as scored: the `<answer>...</answer>` span when there is one, special tokens
    (`<|im_end|>`, ...) removed, surrounding whitespace stripped."""
    m = _ANSWER.search(text)
    if m is not None:
        text = m.group(1)
    return _SPECIAL.sub(" ", text).strip()


def answer_pairs(text: str) -> tuple[np.ndarray, bool]:
    """(pairs [P, 2, 4] normalised (person box, object box), parsed) of a grounding answer.

    Boxes are read with `data.hoi.parse_box_mentions` (the 0..1000 text form or coordinate tokens, optional
    `<|object_ref_start|>label<|object_ref_end|>` before each); a malformed tail is dropped (the boxes before it
    are kept, `parsed` False). Kinds follow `data.hoi.assign_kinds` (labels first, unlabelled boxes in
    (person, object) order); a pair is a person box followed by an object box. `parsed` is False when no box
    could be read (or a tail was dropped)."""
    from coordexp_jax.data import hoi

    text = _ANSWER.search(text).group(1) if _ANSWER.search(text) else text
    ok = True
    while True:
        try:
            ms = hoi.parse_box_mentions(text)
            break
        except hoi.BoxTextError:
            ok = False
            cut = text.rfind(hoi.BOX_START)
            if cut <= 0:
                ms = []
                break
            text = text[:cut]
    if not ms:
        return np.zeros((0, 2, 4)), False
    boxes = [m.norm() for m in ms]
    kinds = hoi.assign_kinds(boxes, [m.label for m in ms])
    return _pair_up(boxes, kinds), ok


def _pair_up(boxes, kinds) -> np.ndarray:
    from coordexp_jax.data.hoi import OBJECT, PERSON

    pairs = [(boxes[i], boxes[i + 1]) for i in range(len(boxes) - 1)
             if kinds[i] == PERSON and kinds[i + 1] == OBJECT]
    return np.asarray(pairs, np.float64).reshape(-1, 2, 4)


def record_pairs(r) -> np.ndarray:
    """The true (person, object) pairs of a grounding record's answer, normalised `[G, 2, 4]`."""
    from coordexp_jax.data import hoi

    ab = r.answer_boxes()
    boxes = [np.asarray(b, np.float64) for _, b in ab]
    return _pair_up(boxes, hoi.assign_kinds(boxes, [lb for lb, _ in ab]))


def _px(pairs: np.ndarray, size) -> np.ndarray:
    w, h = size
    return np.asarray(pairs, np.float64) * np.asarray([w, h, w, h], np.float64)


def _round(b) -> list[float]:
    return [round(float(v), 3) for v in b]


# ----------------------------------------------------------------------------------------------- heatmaps
def link_heat_inputs(batch: dict, b: int, slot: int, weights) -> tuple[np.ndarray, tuple[int, int], tuple]:
    """(weights over the image's merged tokens [rows * cols] in row-major order, (rows, cols), the resized
    image size (W', H')) of link `slot` of row `b`.

    weights: `Qwen3VL.link_attention`'s `[B, N, heads, S]` (averaged over the heads here). The image's tokens are
    found with `visual_image` / `visual_index` and ordered by their rectangles (`vision_token_rect`, pixels of the
    resized image: top-left corner, rows first), so the result does not depend on the merger's order."""
    img = int(batch["links"]["image"][b, slot])
    vi = np.asarray(batch["visual_index"])[b]
    sel = np.flatnonzero((vi >= 0) & (np.asarray(batch["visual_image"])[b] == img))
    rects = np.asarray(batch["vision_token_rect"]).reshape(-1, 4)[vi[sel]]
    w = np.asarray(weights)[b, slot].mean(0)[sel]
    order = np.lexsort((rects[:, 0], rects[:, 1]))
    rows, cols = len(np.unique(rects[:, 1])), len(np.unique(rects[:, 0]))
    if rows * cols != len(sel):
        raise ValueError(f"row {b} link {slot}: {len(sel)} visual tokens do not form a grid ({rows} x {cols})")
    return w[order], (rows, cols), (float(rects[:, 2].max()), float(rects[:, 3].max()))


def make_link_attention(model):
    """A jitted `(batch) -> [B, N, heads, S]` of the model's `link_attention` (None when the model has no
    spatial-linking module)."""
    import jax
    from flax import nnx

    from coordexp_jax.model.spatial_linking import linking_of
    from coordexp_jax.rollout.sampler import LINK_VISION_KEYS, VISION_KEYS

    if linking_of(model) is None:
        return None
    graphdef, state = nnx.split(model)
    holder = {"state": state}

    @jax.jit
    def run(state, ids, vision, links):
        return nnx.merge(graphdef, state).link_attention(ids, vision, links)

    def attention(batch):
        vision = {k: batch[k] for k in VISION_KEYS + ("visual_index",) + LINK_VISION_KEYS}
        links = {k: batch["links"][k] for k in ("pos", "boxes", "image", "kind")}
        return np.asarray(jax.device_get(run(holder["state"], batch["input_ids"], vision, links)))

    attention.set_state = lambda s: holder.update(state=s)  # the eval hook swaps new weights in
    return attention


def hoi_eval_setup(cfg, model_config, records: Sequence, prompt_cfg, tokenizer_dir: str):
    """(records, HOIEncoder, HOICollator, HOIEvalConfig) of a training config's HOI evaluation: up to
    `eval.num_images` records of each task (0 = all), the run's prompt, image and box settings. Raises
    `metrics_hoi.BertScoreModelError` when `eval.bertscore_model` is set but not a usable model directory."""
    from coordexp_jax.data import hoi

    hcfg = hoi.hoi_config_from(cfg)
    encoder = hoi.HOIEncoder(prompt_cfg, hcfg, tokenizer_dir=tokenizer_dir)
    collator = hoi.HOICollator(prompt_cfg, encoder.token_ids, model_config, hcfg)
    n = int(cfg.eval.num_images)
    by = hoi.split_by_task(records)
    recs = [r for k in sorted(by) for r in (by[k][:n] if n else by[k])]
    ecfg = HOIEvalConfig(batch_size=int(cfg.eval.batch_size), num_pictures=int(cfg.eval.num_pictures),
                         bertscore_model=str(cfg.eval.get("bertscore_model", "") or ""))
    if ecfg.bertscore_model:  # a bad directory is one error line now, not at the first evaluation
        MH.check_bertscore_model(ecfg.bertscore_model)
    return recs, encoder, collator, ecfg


def build_hoi_evaluator(cfg, model_config, model, info: dict, *, max_records: int = 0,
                        config_file: str | None = None):
    """`evaluate(out_dir) -> metrics` of `python -m coordexp_jax.evaluate` for a config with data.kind 'hoi':
    the held-out HOI records of the config (`data.eval_path`, or the synthetic set's val split), up to
    `eval.num_images` (or `max_records`) of each task, the loaded `model`, heatmaps when it has a
    spatial-linking module. `info`: the checkpoint's run info (`evaluate.load_model`)."""
    import datetime

    from coordexp_jax.data import hoi
    from coordexp_jax.evaluate import make_sampler
    from coordexp_jax.train import build
    from coordexp_jax.train.config import ConfigError

    eval_files = hoi.data_files(cfg)[1]
    if not eval_files:
        raise ConfigError("the config has no evaluation data (set data.eval_path, or data.path '' for the synthetic "
                          "HOI set)")
    recs, _ = hoi.load_files(eval_files, refer_format=cfg.data.hoi.refer_format)
    if max_records:  # per task, as eval.num_images
        cfg = cfg.copy_and_resolve_references()
        cfg.eval.num_images = int(max_records)
    recs, encoder, collator, ecfg = hoi_eval_setup(cfg, model_config, recs, build.prompt_config(cfg, model_config),
                                                   build.tokenizer_dir(cfg))
    sampler = make_sampler(model, encoder.token_ids, cfg)
    attention = make_link_attention(model)
    run_info = {**info, "config": cfg.name + (f" ({config_file})" if config_file else ""),
                "data": ", ".join(eval_files),
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}

    def evaluator(out_dir):
        return evaluate_hoi_records(sampler, recs, encoder, collator, config=ecfg, out_dir=out_dir,
                                    link_attention=attention, run_info=run_info)

    evaluator.run_info = run_info
    return evaluator


# ----------------------------------------------------------------------------------------------- evaluation
def evaluate_hoi_records(sampler, records: Sequence, encoder, collator, *, config: HOIEvalConfig = HOIEvalConfig(),
                         out_dir: str | None = None, link_attention=None, progress: bool = True,
                         run_info: dict | None = None) -> dict:
    """Rolls `sampler` (a `rollout.sampler.Sampler`) out over HOI `records` (`data.hoi.HOIRecord`) and returns the
    metrics dict (module docstring). `encoder` / `collator`: the run's `data.hoi.HOIEncoder` / `HOICollator`.
    `link_attention`: `make_link_attention(model)` for heatmaps (None: no heatmaps). With `out_dir`, writes the
    files of the module docstring. Raises ValueError for no records, `metrics_hoi.BertScoreModelError` for a bad
    `config.bertscore_model` (checked before any rollout)."""
    from coordexp_jax.data.hoi import encode_hoi_prompts, resized_size
    from coordexp_jax.data.tokenizer import decode_ids

    if config.max_records:
        records = list(records)[: config.max_records]
    if not records:
        raise ValueError("no HOI records to evaluate")
    if config.bertscore_model:
        MH.check_bertscore_model(config.bertscore_model)
    rows = []
    bar = tqdm(total=len(records), desc="evaluate", unit="rec", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(records), config.batch_size):
        chunk = list(records[start:start + config.batch_size])
        batch = encode_hoi_prompts(chunk, encoder, collator)
        batch.pop("prompt_lengths", None)
        ro = sampler.generate(batch)
        weights = None
        if link_attention is not None and out_dir is not None and (batch["links"]["pos"] >= 0).any():
            weights = link_attention(batch)
        for b, r in enumerate(chunk):
            ids = ro.row(b)
            text = decode_ids(encoder.tokenizer, ids)
            row = {"record": r, "text": text, "finished": bool(ro.finished[b]), "task": r.task_type or "other",
                   "links": {k: np.asarray(v[b]) for k, v in batch["links"].items()},
                   "resized": [resized_size(w, h, encoder.cfg.image) for w, h in r.sizes]}
            if weights is not None:
                row["heat"] = [link_heat_inputs(batch, b, n, weights) if row["links"]["pos"][n] >= 0 else None
                               for n in range(len(row["links"]["pos"]))]
            if row["task"] == "grounding":
                pairs, ok = answer_pairs(text)
                row["pred"], row["parsed"] = _px(pairs, r.sizes[0]), ok
                row["gt"] = _px(record_pairs(r), r.sizes[0])
            else:
                row["pred_text"], row["ref_text"] = answer_text(text), answer_text(r.answer_text())
            rows.append(row)
        bar.update(len(chunk))
    bar.close()

    out: dict = {}
    ref = [x for x in rows if x["task"] == "referring"]
    if ref:
        preds, refs = [x["pred_text"] for x in ref], [x["ref_text"] for x in ref]
        out.update({f"hoi_referring/{k}": v for k, v in MH.referring_scores(preds, refs).items()})
        if config.bertscore_model:
            bs = MH.bertscore(preds, refs, config.bertscore_model)
            out.update({f"hoi_referring/bertscore_{k}": bs[k] for k in ("P", "R", "F1")})
    grd = [x for x in rows if x["task"] == "grounding"]
    if grd:
        m = MH.grounding_recall([x["pred"] for x in grd], [x["gt"] for x in grd])
        out.update({f"hoi_grounding/{k}": v for k, v in m.items()})
        out["hoi_grounding/parse_failure_rate"] = float(np.mean([not len(x["pred"]) for x in grd]))
    out["unfinished_rate"] = float(np.mean([not x["finished"] for x in rows]))
    out["num_records"] = len(rows)
    if out_dir is not None:
        from coordexp_jax import report

        images = [_entry(i, x, encoder) for i, x in enumerate(rows)]
        info = report.default_run_info(records, **(run_info or {}))
        _write_outputs(out_dir, rows, out, images, config, info)
    return out


def _entry(i: int, x: dict, encoder) -> dict:
    """The report's per-image entry of one record (report.py keys). Grounding: tp / fp / fn of the pair matching at
    IoU 0.5, mean IoU = mean over matched pairs of (person IoU + object IoU) / 2; referring: tp 1 for an exact
    match, else fp = fn = 1 (a wrong answer)."""
    from coordexp_jax.coord.boxes import pairwise_iou_exact
    from coordexp_jax.data.hoi import render_parts

    r = x["record"]
    w, h = r.sizes[0]
    prompt = "\n".join(f"{t.role}: {render_parts(t.parts)}" for t in r.turns[:-1])
    e = {"index": i, "image": r.images[0], "width": int(w), "height": int(h), "task": x["task"], "picture": None,
         "prompt": prompt, "answer": x["text"]}
    if x["task"] == "grounding":
        p2g = MH.match_pairs(x["pred"], x["gt"], 0.5)
        hit = np.flatnonzero(p2g >= 0)
        ious = [(pairwise_iou_exact(x["pred"][i_, 0], x["gt"][p2g[i_], 0])[0, 0]
                 + pairwise_iou_exact(x["pred"][i_, 1], x["gt"][p2g[i_], 1])[0, 0]) / 2 for i_ in hit]
        tp = len(hit)
        e.update(tp=tp, fp=len(x["pred"]) - tp, fn=len(x["gt"]) - tp,
                 mean_iou=round(float(np.mean(ious)), 4) if tp else None,
                 parse="ok" if x["parsed"] else ("partial" if len(x["pred"]) else "failed"),
                 n_pred=len(x["pred"]), n_gt=len(x["gt"]))
        # the picture's matching, box by box: box k (0 person, 1 object) of pair n is box 2n + k of the flat lists
        from coordexp_jax import metrics as M

        flat = np.asarray([2 * p2g[n] + k if p2g[n] >= 0 else -1 for n in range(len(p2g)) for k in (0, 1)],
                          np.int64)
        box_iou = np.asarray([pairwise_iou_exact(x["pred"][n, k], x["gt"][p2g[n], k])[0, 0] if p2g[n] >= 0
                              else np.nan for n in range(len(p2g)) for k in (0, 1)], np.float64)
        gm = np.zeros(2 * len(x["gt"]), bool)
        gm[flat[flat >= 0]] = True
        e["_match"] = M.ImageMatch(pred_to_gt=flat, gt_matched=gm, ious=box_iou, tp=int((flat >= 0).sum()),
                                   fp=int((flat < 0).sum()), fn=int((~gm).sum()),
                                   mean_iou=float(np.nanmean(box_iou)) if (flat >= 0).any() else float("nan"))
        e["pred"] = [{"desc": d, "bbox": _round(x["pred"][n, k]),
                      "iou": None if np.isnan(box_iou[2 * n + k]) else round(float(box_iou[2 * n + k]), 4)}
                     for n in range(len(x["pred"])) for k, d in ((0, "person"), (1, "object"))]
        e["gt"] = [{"desc": d, "bbox": _round(x["gt"][j, k]), "matched": bool(gm[2 * j + k])}
                   for j in range(len(x["gt"])) for k, d in ((0, "person"), (1, "object"))]
    else:
        em = MH.exact_match(x["pred_text"], x["ref_text"])
        e.update(tp=int(em), fp=int(1 - em), fn=int(1 - em), mean_iou=None, parse="ok" if x["pred_text"] else "failed",
                 n_pred=1 if x["pred_text"] else 0, n_gt=1, reference=x["ref_text"],
                 token_f1=round(MH.token_f1(x["pred_text"], x["ref_text"]), 4))
    return e


def _link_boxes(x: dict, image: int = 0) -> list[tuple[int, int, np.ndarray]]:
    """(slot, kind, box in pixels of the ORIGINAL image) of the row's links on `image` (the link boxes are in
    pixels of the resized image the model saw: scaled by original / resized size)."""
    lk, r = x["links"], x["record"]
    (w, h), (rw, rh) = r.sizes[image], x["resized"][image]
    scale = np.asarray([w / rw, h / rh, w / rw, h / rh], np.float64)
    return [(int(n), int(lk["kind"][n]), np.asarray(lk["boxes"][n], np.float64) * scale)
            for n in np.flatnonzero(lk["pos"] >= 0) if int(lk["image"][n]) == image]


def _write_outputs(out_dir: str, rows, metrics: dict, images: list[dict], config: HOIEvalConfig, run_info: dict):
    from PIL import Image

    from coordexp_jax import report
    from coordexp_jax import visualize as V
    from coordexp_jax.data.image import load_image

    os.makedirs(os.path.join(out_dir, "pictures"), exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
        for x in rows:
            r = x["record"]
            line = {"image": r.images[0], "task": x["task"], "source": r.source, "answer": x["text"],
                    "finished": x["finished"]}
            if x["task"] == "grounding":
                line.update(pairs=[[_round(p[0]), _round(p[1])] for p in x["pred"]],
                            gt_pairs=[[_round(g[0]), _round(g[1])] for g in x["gt"]], parsed=x["parsed"])
            else:
                line.update(prediction=x["pred_text"], reference=x["ref_text"])
            f.write(json.dumps(line) + "\n")
    order = report.worst_first(images)
    if config.num_pictures:  # the worst `num_pictures` of EACH task (else grounding misses take them all)
        order = [i for t in sorted({e["task"] for e in images}) for i in
                 [j for j in order if images[j]["task"] == t][: config.num_pictures]]
    for i in order:
        e, x = images[i], rows[i]
        img = Image.fromarray(load_image(e["image"]))
        if x["task"] == "grounding":
            pic = V.draw_prediction(img, e["pred"], e["gt"], e["_match"])
        else:
            boxes = _link_boxes(x)
            heat = x.get("heat")
            if heat is not None and boxes:
                panels = [{"weights": heat[n][0], "box": b, "kind": k} for n, k, b in boxes]
                pic = V.draw_attention_panels(img, panels, heat[boxes[0][0]][1])
                os.makedirs(os.path.join(out_dir, "heatmaps"), exist_ok=True)
                e["heatmaps"] = []
                for (n, k, b), p in zip(boxes, panels):
                    path = f"heatmaps/{i:05d}_{n}_{V.KIND_NAMES[min(k, 3)]}.png"
                    V.draw_attention(img, p["weights"], heat[n][1], b, kind=k).save(os.path.join(out_dir, path),
                                                                                    compress_level=1)
                    e["heatmaps"].append(path)
            else:
                pic = V.draw_prediction(img, [{"desc": V.KIND_NAMES[min(k, 3)], "bbox": list(b)}
                                              for _, k, b in boxes])
        e["picture"] = f"pictures/{i:05d}.png"
        pic.save(os.path.join(out_dir, e["picture"]), compress_level=1)
    for e in images:
        e.pop("_match", None)
    with open(os.path.join(out_dir, "per_image.json"), "w") as f:
        json.dump(images, f, indent=1)
    report.write_report(out_dir, metrics, images, run_info, legend=V.legend_html() + V.heat_legend_html(),
                        title="Evaluation report (human-object interaction)")
