"""Evaluation: roll the model out over records, parse the answers, score them with the field's tools.

`python -m coordexp_jax.evaluate --config FILE [--config.key=value ...] --checkpoint CKPT --out DIR` (overrides as
`python -m coordexp_jax.train` takes them; CKPT: a model directory, ours or HF, a training workdir, or a checkpoint
step directory WORKDIR/checkpoints/N) prints the headline figures and writes `metrics.json`,
`predictions.jsonl` (one line per record: the answer text, parsed objects in pixels of the original image,
their scores, what the parser dropped), `per_image.json` (per image: TP / FP / FN at IoU 0.5, mean IoU, parse
status, prompt, answer, picture) and the report `index.html` (`coordexp_jax.report`, docs/evaluation.md) with a
picture of predicted and true boxes per image under `pictures/`.

Per task (coordexp_method.md §9):
- detection: COCO mAP / AP50 / AP75 (pycocotools) under the `constant` and `logprob` score rules, F1@0.5,
  parse-failure, invalid-box and duplicate rates. Boxes are the answer's boxes as written
  (`ParsedObject.box`: the emitted coordinate tokens k / 999, or q / 1000 for `qwen_text`); the same metrics
  for the expectation boxes (ĉ of each coordinate distribution) are reported with an `exp_` prefix.
- grounding: Acc@0.5 (IoU >= 0.5) of the first predicted box, for records with one ground-truth box.
- counting: MAE / RMSE of the stated count.
A predicted object's score is exp(mean log-prob of its 4 coordinate tokens) under the model at temperature 1.

A protocol that writes coordinates as text (`qwen_text`) has no coordinate tokens, hence neither coordinate
distributions nor coordinate-token log-probs: its detection metrics are the constant-score ones only
(`det/AP_constant`, ..., F1 and the rates); the `logprob` AP, the `det/exp_*` keys, the objects' `score` and
`objects_expectation` in predictions.jsonl are left out (never NaN).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from coordexp_jax import metrics as M
from coordexp_jax import report
from coordexp_jax.cli import ArgumentParser, guard
from coordexp_jax.coord import codec, protocols

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 16
    num_pictures: int = 0  # pictures in the report, worst images first; 0 = one for every image
    max_records: int = 0  # 0 = all
    categories: tuple[str, ...] = ()  # detection categories; () = every gt desc of the detection records


def _objects_px(parsed: protocols.ParseResult, rollout_row, width, height, pixel_mode, use_expectation,
                scored: bool = True):
    """Parsed objects -> dicts {"desc", "bbox" (pixels of the original image)[, "score"]}.

    bbox: the box as written (`ParsedObject.box`), or with `use_expectation` the expectation ĉ at the 4
    coordinate positions. `scored`: add "score" = exp(mean log-prob of the 4 coordinate tokens) (coordinate-token
    protocols only; without it the object has no score and the constant rule applies)."""
    tokens_lp, coord_exp = rollout_row
    out = []
    for o in parsed.objects:
        pos = np.asarray(o.positions)
        box = coord_exp[pos].astype(np.float64) if use_expectation else np.asarray(o.box, np.float64)
        box_px = np.asarray(codec.norm_to_pixels(box, width, height, pixel_mode), np.float64)
        d = {"desc": o.desc, "bbox": [round(float(v), 3) for v in box_px]}
        if scored:
            d["score"] = float(np.exp(np.mean(tokens_lp[pos])))
        out.append(d)
    return out


def evaluate_records(sampler, records: Sequence, encoder, *, model_config, config: EvalConfig = EvalConfig(),
                     out_dir: str | None = None, progress: bool = True, run_info: dict | None = None) -> dict:
    """Rolls `sampler` (a `rollout.sampler.Sampler`) out over `records` and returns the metrics dict.

    `encoder` is the `data.prompts.SampleEncoder` used in training (same image preprocessing and prompt);
    `model_config` the sampled model's config (its vision table shapes the vision inputs).
    With `out_dir`, writes metrics.json, predictions.jsonl, per_image.json, the pictures and the report page
    index.html (`coordexp_jax.report`). `run_info`: what the report's "Run" section shows, a dict with any of
    {"checkpoint": str, "step": int, "config": str, "data": str, "num_images": int, "date": str} (and any other
    key, shown after those); missing ones are filled by `report.default_run_info` (number of images, the data
    files of the records' `source`, the date now in UTC).
    """
    from coordexp_jax.data.prompts import encode_prompts

    if config.max_records:
        records = list(records)[: config.max_records]
    if not records:
        raise ValueError("no records to evaluate")
    tok, ids, pcfg = encoder.tokenizer, encoder.token_ids, encoder.cfg
    coords = protocols.uses_coord_tokens(pcfg.protocol)  # else: no expectation boxes, no log-prob scores
    rows, failures = [], 0
    bar = tqdm(total=len(records), desc="evaluate", unit="img", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(records), config.batch_size):
        chunk = list(records[start:start + config.batch_size])
        batch = encode_prompts(chunk, encoder, model_config=model_config)
        batch.pop("prompt_lengths", None)
        ro = sampler.generate(batch)
        for b, r in enumerate(chunk):
            answer_ids = ro.row(b)
            row = {"record": r, "answer_ids": answer_ids, "finished": bool(ro.finished[b])}
            if r.task == "counting":
                row["count"] = protocols.parse_count(answer_ids, tok, ids)
            else:
                parsed = protocols.parse(answer_ids, tok, ids, pcfg.protocol)
                row["parsed"] = parsed
                lp, ce = ro.logprobs[b], ro.coord_expectation[b]
                row["pred"] = _objects_px(parsed, (lp, ce), r.width, r.height, pcfg.pixel_mode, False, coords)
                if coords:
                    row["pred_exp"] = _objects_px(parsed, (lp, ce), r.width, r.height, pcfg.pixel_mode, True)
            rows.append(row)
        bar.update(len(chunk))
    bar.close()

    out: dict = {}
    det = [x for x in rows if x["record"].task == "detection"]
    if det:
        cats = list(config.categories) or sorted({o.desc for x in det for o in x["record"].objects})
        for prefix, key in (("", "pred"), ("exp_", "pred_exp")) if coords else (("", "pred"),):
            results = [_image_result(i, x, key, pcfg.pixel_mode) for i, x in enumerate(det)]
            m = M.detection_metrics(results, cats)
            if not coords:  # no coordinate-token log-probs: the constant score rule only
                m = {k: v for k, v in m.items() if not k.endswith("_logprob")}
            if prefix:
                m = {k: v for k, v in m.items() if k.startswith(("AP", "f1"))}
            out.update({f"det/{prefix}{k}": v for k, v in m.items()})
    grd = [x for x in rows if x["record"].task == "grounding" and len(x["record"].objects) == 1]
    if grd:
        preds = [x["pred"][0]["bbox"] if x["pred"] else None for x in grd]
        gts = [x["record"].boxes_px(pcfg.pixel_mode)[0] for x in grd]
        out["grounding/acc@0.5"] = M.grounding_accuracy(preds, gts)
        out["grounding/num"] = len(grd)
        out["grounding/parse_failure_rate"] = float(np.mean([not x["parsed"].objects for x in grd]))
    cnt = [x for x in rows if x["record"].task == "counting"]
    if cnt:
        pc = [x["count"].count if x["count"].count is not None else 0 for x in cnt]
        gc = [len(x["record"].objects) for x in cnt]
        out.update({f"counting/{k}": v for k, v in M.counting_errors(pc, gc).items()})
        out["counting/parse_failure_rate"] = float(np.mean([x["count"].count is None for x in cnt]))
    out["unfinished_rate"] = float(np.mean([not x["finished"] for x in rows]))
    out["num_records"] = len(rows)
    if out_dir is not None:
        images = _per_image(rows, encoder)
        info = report.default_run_info(records, **(run_info or {}))
        _write_outputs(out_dir, rows, out, encoder, config, images, info)
    return out


def _parse_status(x: dict) -> str:
    """"failed" (nothing readable: no object and not a clean empty answer; counting: no count), "partial"
    (something was read, but the parser dropped part of the answer, its structure was not closed or the answer
    hit the token limit) or "ok"."""
    if "count" in x:
        c = x["count"]
        if c.count is None:
            return "failed"
        return "partial" if c.dropped or not c.closed or not x["finished"] else "ok"
    p = x["parsed"]
    if not p.objects and not (p.closed and not p.num_dropped):
        return "failed"
    return "partial" if p.num_dropped or not p.closed or not x["finished"] else "ok"


def _per_image(rows: list[dict], encoder) -> list[dict]:
    """The report's per-image entries (keys: `coordexp_jax.report`), in record order, without pictures.

    Detection and grounding: `metrics.match_image(pred, gt, 0.5)` of the answer's boxes as written (pixels of the
    original image): tp / fp / fn, mean IoU of the matched pairs; pred objects carry their matched IoU (None =
    false positive), gt objects whether they were matched. Counting: n_pred = the stated count, tp/fp/fn None."""
    from coordexp_jax.data.tokenizer import decode_ids

    out = []
    for i, x in enumerate(rows):
        r = x["record"]
        e = {"index": i, "image": r.image, "width": r.width, "height": r.height, "task": r.task, "picture": None,
             "tp": None, "fp": None, "fn": None,
             "mean_iou": None, "parse": _parse_status(x), "n_pred": None, "n_gt": len(r.objects),
             "prompt": encoder.instruction_text(r),  # the instruction the rollout was prompted with
             "answer": decode_ids(encoder.tokenizer, x["answer_ids"])}
        if "count" in x:
            e["n_pred"] = x["count"].count
        else:
            gt = _gt_px(r, encoder.cfg.pixel_mode)
            m = M.match_image(x["pred"], gt, 0.5)
            e.update(tp=m.tp, fp=m.fp, fn=m.fn, mean_iou=None if not m.tp else round(float(m.mean_iou), 4),
                     n_pred=len(x["pred"]), n_gt=len(gt))
            e["pred"] = [{**p, "iou": None if np.isnan(iou) else round(float(iou), 4)}
                         for p, iou in zip(x["pred"], m.ious)]
            e["gt"] = [{**g, "matched": bool(hit)} for g, hit in zip(gt, m.gt_matched)]
            e["_match"] = m
        out.append(e)
    return out


def _gt_px(r, pixel_mode: str) -> list[dict]:
    """Ground-truth objects with a box, {"desc", "bbox"} in pixels of the original image (3 decimals)."""
    boxed = [o for o in r.objects if o.box is not None]
    return [{"desc": o.desc, "bbox": [round(float(v), 3) for v in b]} for o, b in zip(boxed, r.boxes_px(pixel_mode))]


def _image_result(i: int, x: dict, key: str, pixel_mode: str) -> M.ImageResult:
    r = x["record"]
    gt = [M.PredObject(o.desc, tuple(b)) for o, b in zip(r.objects, r.boxes_px(pixel_mode))]
    pred = [M.PredObject(p["desc"], tuple(p["bbox"]), p.get("score", 1.0)) for p in x[key]]
    parsed = bool(x["parsed"].objects) or (x["parsed"].closed and not x["parsed"].num_dropped)
    return M.ImageResult(i + 1, r.width, r.height, gt, pred, parsed=parsed)


def _write_outputs(out_dir: str, rows: list[dict], metrics: dict, encoder, config: EvalConfig, images: list[dict],
                   run_info: dict) -> None:
    """metrics.json, predictions.jsonl, pictures/NNNNN.png (one per image, the worst `config.num_pictures`
    first when capped; 0 = all), per_image.json (the `images` entries with their picture path or None) and
    index.html (`report.write_report`)."""
    from PIL import Image

    from coordexp_jax.data.image import load_image
    from coordexp_jax.visualize import draw_prediction, legend_html

    os.makedirs(os.path.join(out_dir, "pictures"), exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
        for x, e in zip(rows, images):
            r = x["record"]
            line = {"image": r.image, "task": r.task, "source": r.source, "width": r.width, "height": r.height,
                    "answer": e["answer"], "finished": x["finished"]}
            if "parsed" in x:
                line.update(objects=x["pred"], dropped=x["parsed"].dropped, closed=x["parsed"].closed)
                if "pred_exp" in x:
                    line["objects_expectation"] = x["pred_exp"]
            else:
                line.update(count=x["count"].count, dropped=x["count"].dropped)
            f.write(json.dumps(line) + "\n")
    order = report.worst_first(images)
    for i in order[: config.num_pictures] if config.num_pictures else order:
        e = images[i]
        # the image as the model saw it (EXIF orientation applied): the frame of the boxes
        pic = draw_prediction(Image.fromarray(load_image(e["image"])), e.get("pred", []), e.get("gt", []),
                              e.get("_match"))
        e["picture"] = f"pictures/{i:05d}.png"
        pic.save(os.path.join(out_dir, e["picture"]), compress_level=1)  # half the time of the default 6, +6% size
    for e in images:
        e.pop("_match", None)
    with open(os.path.join(out_dir, "per_image.json"), "w") as f:
        json.dump(images, f, indent=1)
    report.write_report(out_dir, metrics, images, run_info, legend=legend_html())


def eval_setup(cfg, model_config, max_records: int = 0):
    """(records, encoder, EvalConfig) of a training config's evaluation data, read and validated as the training
    pipeline reads its sources (`data.pipeline.load_source`), with the training prompt and image settings."""
    from coordexp_jax.data.pipeline import image_check, load_source
    from coordexp_jax.data.prompts import SampleEncoder
    from coordexp_jax.train import build
    from coordexp_jax.train.config import ConfigError

    _, eval_specs = build.data_specs(cfg)
    if not eval_specs:
        raise ConfigError("the config has no evaluation data (set data.eval_path, or use data.kind='synthetic')")
    pcfg = build.prompt_config(cfg, model_config)
    recs = []
    for spec in eval_specs:  # images the processor refuses at these settings: skipped (counted) as in training
        recs += load_source(spec, image_check(pcfg.image, pcfg.patches_per_slot))[0]
    n = max_records or cfg.eval.num_images
    recs = recs[:n] if n else recs
    encoder = SampleEncoder(pcfg, tokenizer_dir=build.tokenizer_dir(cfg))
    ecfg = EvalConfig(batch_size=cfg.eval.batch_size, num_pictures=cfg.eval.num_pictures)
    return recs, encoder, ecfg


def make_sampler(model_or_split, token_ids, cfg):
    from coordexp_jax.rollout.sampler import Sampler, SamplerConfig

    return Sampler(model_or_split, token_ids, SamplerConfig(max_new_tokens=cfg.eval.max_new_tokens))


def resolve_checkpoint(path: str) -> tuple[str, str, int | None]:
    """What `--checkpoint PATH` names: (kind, directory, step).

    - ("model", DIR, step): a model directory, ours (model_config.json + params/) or HF (config.json +
      *.safetensors); a training workdir stands for its `final_model/` (step: the run's latest checkpoint step,
      the one the final model is exported from; None for any other model directory);
    - ("train_state", WORKDIR, step): an orbax step directory of a training run, `WORKDIR/checkpoints/<step>`
      (`train/checkpoint.py`), or `WORKDIR/checkpoints` or a workdir without `final_model/` (step: the latest).
    Raises FileNotFoundError naming the path when it does not exist; any other directory is ("model", path, None)
    and `weights.checkpoint.load_checkpoint` says why it is not a checkpoint.
    """
    p = os.path.normpath(path)
    if not os.path.isdir(p):
        ck = os.path.dirname(os.path.abspath(p))
        have = sorted(int(s) for s in os.listdir(ck) if s.isdigit()) if os.path.basename(ck) == "checkpoints" \
            and os.path.isdir(ck) else None
        raise FileNotFoundError(f"--checkpoint {path}: directory not found"
                                + (f" (the run's checkpoint steps: {', '.join(map(str, have)) or 'none'})"
                                   if have is not None else ""))

    def run_dir(d: str) -> bool:
        return os.path.isfile(os.path.join(d, "config.json")) and os.path.isdir(os.path.join(d, "checkpoints"))

    def steps(workdir: str) -> list[int]:
        ck = os.path.join(workdir, "checkpoints")
        return sorted(int(s) for s in os.listdir(ck) if s.isdigit() and os.path.isdir(os.path.join(ck, s)))

    parent = os.path.dirname(os.path.abspath(p))
    if os.path.basename(p).isdigit() and os.path.basename(parent) == "checkpoints" and run_dir(os.path.dirname(parent)):
        return "train_state", os.path.dirname(parent), int(os.path.basename(p))
    if os.path.basename(p) == "checkpoints" and run_dir(parent):
        return "train_state", parent, None
    if os.path.isdir(os.path.join(p, "final_model")):
        return "model", os.path.join(p, "final_model"), (steps(p) or [None])[-1] if run_dir(p) else None
    if run_dir(p) and not os.path.isfile(os.path.join(p, "model_config.json")):
        return "train_state", p, None
    if os.path.basename(p) == "final_model" and run_dir(parent):
        return "model", p, (steps(parent) or [None])[-1]
    return "model", p, None


def load_model(checkpoint: str, cfg) -> tuple:
    """(ModelConfig, model, run_info) of `--checkpoint` (see `resolve_checkpoint`).

    A training state is restored with `train.export.load_trained_model` (the run's own config rebuilds the
    structure, LoRA merged) and evaluated with the weights a training run evaluates: the EMA weights when the run
    kept them (train.ema_decay > 0) and `cfg.eval.use_ema`, else the raw parameters. run_info: {"checkpoint"
    (absolute path), "step" (None when unknown), "weights" ("EMA" / "raw", train states only)}.
    Raises FileNotFoundError / WeightsError / MissingCheckpointError / IncompatibleCheckpointError naming the path.
    """
    from coordexp_jax.weights.checkpoint import load_checkpoint

    kind, where, step = resolve_checkpoint(checkpoint)
    if kind == "model":
        model_config, model = load_checkpoint(where)
        return model_config, model, {"checkpoint": os.path.abspath(where), "step": step}
    from coordexp_jax.train.export import load_trained_model, run_config

    use_ema = bool(cfg.eval.use_ema) and run_config(where).train.ema_decay > 0
    model_config, model, step = load_trained_model(where, step, use_ema=use_ema)
    return model_config, model, {"checkpoint": os.path.abspath(os.path.join(where, "checkpoints", str(step))),
                                 "step": step, "weights": "EMA" if use_ema else "raw"}


def build_evaluator(config, *, checkpoint: str, max_records: int = 0, batch_size: int = 0,
                    config_file: str | None = None):
    """`evaluate(out_dir) -> metrics` for a training config and a checkpoint.

    config: a config file path, or a ConfigDict (e.g. `cli.parse_config_flags`'s, overrides applied); validated
    here. checkpoint: ours, HF, a training workdir (its `final_model/`), or an orbax step directory of a training
    run (`WORKDIR/checkpoints/<step>`; `load_model`). The evaluator passes `evaluator.run_info` (checkpoint, step,
    config, data, date, weights) to the report; `config_file` names the config there when `config` is a ConfigDict.
    """
    import datetime

    from coordexp_jax.train import build
    from coordexp_jax.train.config import ConfigError, load_config_file, validate

    if isinstance(config, (str, os.PathLike)):
        config_file = str(config)
        if not os.path.exists(config_file):
            raise FileNotFoundError(f"config file not found: {config_file}")
        config = load_config_file(config_file)
    cfg = validate(config)
    if batch_size:
        cfg.eval.batch_size = batch_size
    model_config, model, info = load_model(checkpoint, cfg)
    if cfg.data.kind == "hoi":  # human-object interaction records: evaluate_hoi
        from coordexp_jax.evaluate_hoi import build_hoi_evaluator

        return build_hoi_evaluator(cfg, model_config, model, info, max_records=max_records, config_file=config_file)
    recs, encoder, ecfg = eval_setup(cfg, model_config, max_records)
    ids = encoder.token_ids
    # an expanded checkpoint matches its tokenizer exactly; without coordinate tokens (qwen_text on a released
    # checkpoint) the checkpoint may have spare rows after the tokenizer's ids (build.model_config's rule)
    if (model_config.vocab_size != ids.vocab_size) if ids.has_coords else (model_config.vocab_size < ids.vocab_size):
        raise ConfigError(f"checkpoint {checkpoint} has vocab_size {model_config.vocab_size} but the config's "
                         f"tokenizer has {ids.vocab_size} ids")
    sampler = make_sampler(model, encoder.token_ids, cfg)
    _, eval_specs = build.data_specs(cfg)
    run_info = {**info, "config": cfg.name + (f" ({config_file})" if config_file else ""),
                "data": ", ".join(s.path for s in eval_specs or ()),
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}

    def evaluator(out_dir):
        return evaluate_records(sampler, recs, encoder, model_config=model_config, config=ecfg, out_dir=out_dir,
                                run_info=run_info)

    evaluator.run_info = run_info
    return evaluator


def summary_line(metrics: dict) -> str:
    """The headline figures rounded for a terminal: 'AP50 0.646, AP 0.482, F1@0.5 0.717, parse rate 100.0%'
    (`report.headline`: the default score rule; grounding / counting figures without detection records)."""
    return ", ".join(f"{label} {value}" for label, value, _, _ in report.headline(metrics))


@guard
def main(argv=None) -> int:
    from coordexp_jax.cli import CONFIG_OVERRIDE_HELP, config_flag_values, normalize_config_args, parse_config_flags

    argv = normalize_config_args(sys.argv[1:] if argv is None else argv)
    p = ArgumentParser(prog="python -m coordexp_jax.evaluate", description=__doc__.split("\n\n")[0],
                       epilog="Flags are --snake_case (the dashed spelling is accepted too). " + CONFIG_OVERRIDE_HELP)
    p.add_argument("--config", metavar="FILE", help="a training config file (its evaluation data and eval.* "
                   "settings are used); --config.key=value overrides it, as in python -m coordexp_jax.train")
    p.add_argument("--checkpoint", required=True, help="ours, HF, a training workdir (its final_model/) or a "
                   "checkpoint step directory of a run (WORKDIR/checkpoints/N: EMA weights when eval.use_ema)")
    p.add_argument("--out", required=True, help="output directory (index.html, metrics.json, predictions.jsonl)")
    p.add_argument("--max_records", type=int, default=0, help="0 = the config's eval.num_images")
    p.add_argument("--batch_size", type=int, default=0, help="0 = the config's eval.batch_size")
    if any(a in ("-h", "--help") for a in argv):
        p.parse_args(["--help"])
    # --config FILE and its --config.key=value overrides: the parser python -m coordexp_jax.train uses
    flags = config_flag_values(["evaluate", *argv])
    rest = parse_config_flags(flags, ["evaluate", *argv], known_only=True, required=False)
    args = p.parse_args(rest[1:])
    if flags.config is None:
        p.error("the following arguments are required: --config")
    logging.basicConfig(level=logging.WARNING)
    evaluator = build_evaluator(flags.config, checkpoint=args.checkpoint, max_records=args.max_records,
                                batch_size=args.batch_size, config_file=str(flags["config"].config_filename).split(":", 1)[0])
    metrics = evaluator(args.out)
    info = evaluator.run_info
    step = f" step {info['step']}" if info.get("step") is not None else ""
    unit = "records" if flags.config.data.kind == "hoi" else "images"  # an HOI image holds several records
    print(f"{flags.config.name}{step}, {metrics['num_records']} {unit}: {summary_line(metrics)}")
    print(f"report: {os.path.join(args.out, 'index.html')} (every metric: {os.path.join(args.out, 'metrics.json')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
