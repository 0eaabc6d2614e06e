"""Images -> boxes: `python -m coordexp_jax.predict --checkpoint DIR (--image A.png [B.png ...] | --images DIR_OR_GLOB)
--out DIR [--batch_size N] [--prompt TEXT]`.

Loads a checkpoint once (an HF Qwen3-VL directory or one of ours, `coordexp_jax.weights.checkpoint`), builds the
jitted sampler once and rolls the images out in batches of one fixed shape, so the sampler compiles ONCE for the
whole run: every batch has `min(--batch_size, number of images)` rows (the last one is filled with copies of its
first image, whose results are dropped), the prompt length is the power-of-two bucket of the longest prompt of the
run and every image slot holds the patches of the largest image (sizes are read from the file headers first).
Images are preprocessed exactly as in training (`data/image.py` via `data/prompts.py`: smart_resize, bicubic,
patchify, the same chat prompt); answers are parsed with `coord/protocols.py`.

Written to --out, per image (`<name>` = the file name without its extension; when two inputs share it, their
paths relative to their common folder, `/` -> `__`, keep them apart):
- `<name>.json`: {"image", "width", "height", "prompt", "answer" (decoded text), "objects": [{"desc",
  "bbox" [x1, y1, x2, y2] in pixels of the ORIGINAL image, "bbox_expectation" (the same box from the expectation
  ĉ of each coordinate distribution), "score" = exp(mean log-prob of the 4 coordinate tokens under the model at
  temperature 1)}], "parse" {"dropped", "closed", "status"}, "num_tokens", "finished", "seconds"}; with
  `--protocol qwen_text` (coordinates as text, no coordinate tokens) the objects have "desc" and "bbox"
  (q / 1000 as written) only. parse.status: "ok", "partial" (something was dropped, the structure was not closed
  or the answer hit --max_new_tokens) or "failed" (nothing readable). seconds: the image's share of its batch's
  wall time (the first batch includes the compile);
- `<name>.png`: the image with the predicted boxes, labels and a legend (`visualize.draw_prediction`);
and `summary.json`: the images (name, objects, parse status, seconds), the skipped inputs with the reason, totals
(images, objects, parse statuses, seconds for loading, predicting, per image) and `compiles` (batches that
compiled the sampler: 1 when every batch had the same shape). One summary line is printed.

Counting mode (`--mode counting`, or `auto` when the checkpoint holds `regression_heads.json`: a model trained with
`train.kind='counting_regression'`): each image is counted one object at a time by the sequential loop
(`predict_counting_images`; `--class_name`, `--max_count`); `<name>.png` is the input | output picture with the
numbered marks and `<name>.json` holds the count and the points in pixels. The detection-only options are ignored.

`--images DIR` takes the folder's image files (extensions in `IMAGE_EXTENSIONS`, not recursive, sorted by name);
`--images 'GLOB'` every file the pattern matches (`**` recursive; quote it). An input that cannot be read or that
the processor refuses is skipped: logged, counted and listed in summary.json. Exit code 0 when at least one image
was predicted. A path that does not exist, no image at all, or no image that could be read; a checkpoint that does
not match its config or the tokenizer: one `error: ...` line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import sys
import time

import numpy as np

from coordexp_jax.cli import EXIT_USER_ERROR, guard
from coordexp_jax.coord.protocols import PROTOCOLS, uses_coord_tokens
from coordexp_jax.errors import CoordExpError

EXIT_BAD_INPUT = EXIT_USER_ERROR
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SUMMARY = "summary.json"

log = logging.getLogger(__name__)


class PredictError(CoordExpError, ValueError):
    """Bad input to predict (one line, shown as `error: ...`)."""


def objects_from_rollout(parsed, logprobs, coord_expectation, width: int, height: int,
                         pixel_mode: str = "continuous", coord_tokens: bool = True) -> list[dict]:
    """Parsed objects of one rollout row -> dicts with boxes in pixels of the original (width x height) image.

    `logprobs [T]` / `coord_expectation [T]` are the rollout row's arrays (indices = the parser's positions).
    bbox: the box as written (`ParsedObject.box`). `coord_tokens=False` (a protocol writing coordinates as text):
    no "bbox_expectation" nor "score" (they need coordinate tokens).
    """
    from coordexp_jax.coord import codec

    out = []
    for o in parsed.objects:
        pos = np.asarray(o.positions)
        box = np.asarray(codec.norm_to_pixels(np.asarray(o.box, np.float64), width, height, pixel_mode))
        if not coord_tokens:
            out.append({"desc": o.desc, "bbox": [round(float(v), 2) for v in box]})
            continue
        exp_box = np.asarray(codec.norm_to_pixels(np.asarray(coord_expectation)[pos].astype(np.float64), width,
                                                  height, pixel_mode))
        score = float(np.exp(np.mean(np.asarray(logprobs, np.float64)[pos])))
        out.append({"desc": o.desc, "bbox": [round(float(v), 2) for v in box],
                    "bbox_expectation": [round(float(v), 2) for v in exp_box], "score": score})
    return out


def parse_status(parsed, finished: bool) -> str:
    """"failed" (no object and not a clean empty answer), "partial" (objects, but the parser dropped part of the
    answer, its structure was not closed or the answer hit the token limit) or "ok" (the evaluation report's
    rule)."""
    if not parsed.objects and not (parsed.closed and not parsed.num_dropped):
        return "failed"
    return "partial" if parsed.num_dropped or not parsed.closed or not finished else "ok"


# ------------------------------------------------------------------------------------------------------ inputs

def _has_magic(s: str) -> bool:
    return glob.has_magic(s)


def collect_inputs(images: list[str] | None, pattern: str | None) -> list[str]:
    """The image paths to predict, in order, each once: `images` (files named one by one: each must exist) then
    `pattern` (a folder: its files with an image extension, sorted; or a glob: the files it matches, sorted).
    Raises PredictError (a path that does not exist, a folder or glob without images)."""
    paths: list[str] = []
    for p in images or ():
        if not os.path.exists(p):
            raise PredictError(f"--image {p}: file not found")
        if os.path.isdir(p):
            raise PredictError(f"--image {p} is a folder (use --images {p})")
        paths.append(p)
    if pattern is not None:
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(pattern, f)))
            if not found:
                raise PredictError(f"--images {pattern}: no image file ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
        elif _has_magic(pattern):
            found = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
            if not found:
                raise PredictError(f"--images {pattern}: no file matches the pattern")
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            raise PredictError(f"--images {pattern}: no such file or folder")
        paths += found
    seen, out = set(), []
    for p in paths:  # the same file named twice is predicted once
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    if not out:
        raise PredictError("no input: give --image FILE [FILE ...] and/or --images FOLDER_OR_GLOB")
    return out


def output_names(paths: list[str]) -> list[str]:
    """A unique output name per path: the file name without its extension; where several paths share it, their
    path relative to their common folder without the extension, `/` -> `__` (then with the extension, then with a
    `-k` suffix, when that still collides). "summary" is never used (summary.json is the run's)."""
    stems = [os.path.splitext(os.path.basename(p))[0] or "image" for p in paths]
    common = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    taken = {os.path.splitext(SUMMARY)[0]}
    out = []
    for p, s in zip(paths, stems):
        rel = os.path.relpath(os.path.abspath(p), common)
        cands = [s] if counts[s] == 1 else []
        cands += [os.path.splitext(rel)[0].replace(os.sep, "__"), rel.replace(os.sep, "__").replace(".", "_")]
        name = next((c for c in cands if c not in taken), None)
        k = 2
        while name is None:
            name = f"{cands[-1]}-{k}" if f"{cands[-1]}-{k}" not in taken else None
            k += 1
        taken.add(name)
        out.append(name)
    return out


# ------------------------------------------------------------------------------------------------------ CLI

def _parser() -> argparse.ArgumentParser:
    from coordexp_jax.cli import ArgumentParser

    p = ArgumentParser(prog="python -m coordexp_jax.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF Qwen3-VL directory or a coordexp_jax checkpoint")
    p.add_argument("--image", nargs="+", action="extend", default=None, metavar="FILE",
                   help="image file(s); may be repeated")
    p.add_argument("--images", default=None, metavar="DIR_OR_GLOB",
                   help="a folder (its image files, sorted) or a quoted glob pattern ('imgs/**/*.jpg')")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--batch_size", type=int, default=8,
                   help="images per rollout batch (every batch has this shape: one compile)")
    p.add_argument("--prompt", default=None, help="instruction text (default: the detection instruction)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the checkpoint's, else the project's small tokenizer)")
    p.add_argument("--protocol", default=None, choices=PROTOCOLS,
                   help="default: the checkpoint's preprocessing.json (written by training), else coordjson")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--max_len", type=int, default=8192, help="KV cache length limit: prompt + new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--constrain", action="store_true", help="protocol-constrained decoding")
    p.add_argument("--pixel_mode", default=None, choices=("continuous", "coordexp"),
                   help="default: the checkpoint's preprocessing.json, else continuous")
    p.add_argument("--min_pixels", type=int, default=None,
                   help="default: the checkpoint's preprocessing.json, else the released processor's")
    p.add_argument("--max_pixels", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mode", default="auto", choices=MODES,
                   help="auto: counting when the checkpoint has regression heads (regression_heads.json), else "
                        "detection")
    p.add_argument("--class_name", default=None,
                   help="counting: the class to count (default: the training run's class, from the config.json "
                        "beside its final_model)")
    p.add_argument("--max_count", type=int, default=None,
                   help="counting: stop after this many points (default: the run's counting.max_count, else 16)")
    return p


PREPROCESSING = "preprocessing.json"  # written next to a trained model by `python -m coordexp_jax.train`
MODES = ("auto", "detection", "counting")
HEADS_JSON = "regression_heads.json"  # a model with regression heads (sequential counting) has it


def _apply_preprocessing_defaults(args) -> None:
    """Options the user did not give are taken from the checkpoint's preprocessing.json (the settings it was trained
    with: a model trained on 128 px images must not be fed 256 px ones), else the released defaults."""
    path = os.path.join(args.checkpoint, PREPROCESSING)
    saved = {}
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
    for key, default in (("protocol", "coordjson"), ("pixel_mode", "continuous"), ("min_pixels", None),
                         ("max_pixels", None)):
        if getattr(args, key) is None:
            setattr(args, key, saved.get(key, default))


def _tokenizer(args):
    from coordexp_jax.data.tokenizer import load_tokenizer, small_tokenizer

    if args.tokenizer is not None:
        return load_tokenizer(args.tokenizer)
    if os.path.isfile(os.path.join(args.checkpoint, "tokenizer.json")):
        return load_tokenizer(args.checkpoint)
    return small_tokenizer()


@dataclasses.dataclass
class _Input:
    path: str
    name: str
    width: int = 0
    height: int = 0
    prompt_len: int = 0
    patches: int = 0


def _skip(skipped: list, path: str, reason: str) -> None:
    """Logs and records a skipped input; `reason` names the path."""
    reason = reason if reason.startswith(path) else f"{path}: {reason}"
    log.warning("skipped %s", reason)
    skipped.append({"image": path, "reason": reason})


def _model_dir(checkpoint: str) -> str:
    """The model directory `--checkpoint` names: a training workdir stands for its `final_model/`
    (`evaluate.resolve_checkpoint`, the rule `evaluate` follows). A training-state step directory
    (WORKDIR/checkpoints/N) is refused with the command that turns it into a model directory (PredictError). A path
    that is not a directory is returned as it is: the inputs are checked first, then loading the checkpoint names it.
    """
    from coordexp_jax.evaluate import resolve_checkpoint

    if not os.path.isdir(checkpoint):  # load_checkpoint names it, after the inputs are checked
        return checkpoint
    kind, where, step = resolve_checkpoint(checkpoint)
    if kind == "train_state":
        raise PredictError(f"--checkpoint {checkpoint}: a training checkpoint (step {step}), not a model directory; "
                           f"pass {os.path.join(where, 'final_model')} or export this step with "
                           f"python -m coordexp_jax.train.export --workdir {where} --step {step} --out DIR")
    return where


def predict(args) -> dict:
    """Runs the CLI (see the module docstring) and returns the summary dict (also written to summary.json)."""
    import jax.numpy as jnp

    from coordexp_jax.data import image as image_lib
    from coordexp_jax.data.prompts import PromptConfig, SampleEncoder
    from coordexp_jax.data.records import Record
    from coordexp_jax.data.tokenizer import token_ids_from_tokenizer
    from coordexp_jax.rollout.constraints import protocol_constraint
    from coordexp_jax.rollout.sampler import Sampler, SamplerConfig, next_pow2
    from coordexp_jax.weights.checkpoint import load_checkpoint

    t_start = time.perf_counter()
    args.checkpoint = _model_dir(args.checkpoint)
    from coordexp_jax.weights.checkpoint import LINKING_CONFIG

    if os.path.isfile(os.path.join(args.checkpoint, LINKING_CONFIG)):
        raise PredictError(f"--checkpoint {args.checkpoint}: a human-object-interaction model (it has "
                           f"{LINKING_CONFIG}); its prompts need the boxes' links, which predict does not build: "
                           "score it with python -m coordexp_jax.evaluate --config CONFIG --checkpoint DIR")
    if resolve_mode(args.checkpoint, getattr(args, "mode", "auto")) == "counting":
        return predict_counting_images(args, t_start)
    _apply_preprocessing_defaults(args)
    if args.max_new_tokens < 1 or args.max_new_tokens >= args.max_len:
        raise PredictError(f"--max_new_tokens must be in [1, --max_len={args.max_len}), got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise PredictError(f"--batch_size must be >= 1, got {args.batch_size}")
    paths = collect_inputs(args.image, args.images)
    tok = _tokenizer(args)
    tid = token_ids_from_tokenizer(tok, require_coords=uses_coord_tokens(args.protocol))
    im_kw = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None}
    pcfg = PromptConfig(protocol=args.protocol, image=image_lib.ImageConfig(**im_kw), min_text_len=16,
                        max_text_len=args.max_len)
    encoder = SampleEncoder(pcfg, tokenizer=tok)
    merge2 = pcfg.image.merge_size ** 2
    max_prompt = args.max_len - args.max_new_tokens

    def record(path, w, h):
        return Record(image=path, width=w, height=h, objects=(), task="detection", prompt=args.prompt, source=path)

    # pass 1, file headers only: sizes -> the run's one prompt length and patches per image slot
    inputs, skipped = [], []
    for path, name in zip(paths, output_names(paths)):
        try:
            w, h = image_lib.read_image_size(path)
        except image_lib.ImageLoadError as e:
            _skip(skipped, path, str(e))
            continue
        problem = image_lib.processing_problem(h, w, pcfg.image)  # e.g. aspect ratio > 200
        if problem is not None:
            _skip(skipped, path, problem)
            continue
        n = image_lib.num_patches(h, w, pcfg.image)
        plen = len(encoder.prompt_ids(record(path, w, h), n // merge2))
        if plen > max_prompt:
            _skip(skipped, path, f"its prompt has {plen} tokens, more than the cache holds besides the answer "
                                 f"(--max_len {args.max_len} - --max_new_tokens {args.max_new_tokens} = {max_prompt})")
            continue
        inputs.append(_Input(path, name, w, h, plen, n))
    if not inputs:
        if len(paths) == 1:
            raise PredictError(skipped[0]["reason"])
        raise PredictError(f"none of the {len(paths)} images could be read (first: {skipped[0]['reason']})")
    S = max(next_pow2(max(x.prompt_len for x in inputs)), 16)
    P = max(next_pow2(max(x.patches for x in inputs)), merge2)
    pcfg = dataclasses.replace(pcfg, text_bucket=S, patches_per_slot=P)
    encoder = SampleEncoder(pcfg, tokenizer=tok)
    B = min(args.batch_size, len(inputs))

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    config, model = load_checkpoint(args.checkpoint, dtype)
    if tid.vocab_size > config.vocab_size:
        raise PredictError(f"tokenizer has {tid.vocab_size} tokens but checkpoint {args.checkpoint} has a vocabulary "
                           f"of {config.vocab_size} (pass the checkpoint's tokenizer with --tokenizer)")
    scfg = SamplerConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, max_prompt_len=max_prompt, min_prompt_len=16)
    constraint = protocol_constraint(args.protocol, tok, tid, config.padded_vocab_size) if args.constrain else None
    sampler = Sampler(model, tid, scfg, constraint=constraint, vocab_size=config.padded_vocab_size)
    load_s = time.perf_counter() - t_start

    # pass 2: decode, batch, roll out, write
    state = {"compiles": 0, "first_batch_s": None}
    done: list[dict] = []
    batch: list[tuple[_Input, np.ndarray, tuple]] = []
    t_predict = time.perf_counter()
    for x in inputs:
        try:
            img = image_lib.load_image(x.path)
        except image_lib.ImageLoadError as e:
            _skip(skipped, x.path, str(e))
            continue
        h, w = img.shape[:2]
        problem = image_lib.processing_problem(h, w, pcfg.image, patches_per_slot=P)
        if problem is not None or (w, h) != (x.width, x.height):
            _skip(skipped, x.path, problem or f"decoded {w}x{h}, but its header says {x.width}x{x.height}")
            continue
        pv, grid, _ = image_lib.process_image(img, pcfg.image, name=x.path)
        batch.append((x, img, (pv, grid)))
        if len(batch) == B:
            done += _run_batch(batch, B, sampler, encoder, config, args, record, state)
            batch = []
    if batch:
        done += _run_batch(batch, B, sampler, encoder, config, args, record, state)
    predict_s = time.perf_counter() - t_predict
    if not done:
        raise PredictError(f"none of the {len(paths)} images could be read (first: {skipped[0]['reason']})")
    total_s = time.perf_counter() - t_start
    statuses = [d["parse"] for d in done]
    summary = {
        "checkpoint": os.path.abspath(args.checkpoint), "out": os.path.abspath(args.out),
        "images": done, "skipped": skipped,
        "totals": {"inputs": len(paths), "predicted": len(done), "skipped": len(skipped),
                   "objects": int(sum(d["objects"] for d in done)),
                   "parse": {s: statuses.count(s) for s in ("ok", "partial", "failed")},
                   "load_seconds": round(load_s, 3), "predict_seconds": round(predict_s, 3),
                   "first_batch_seconds": round(state["first_batch_s"], 3), "total_seconds": round(total_s, 3),
                   "seconds_per_image": round(total_s / len(done), 3)},
        "compiles": state["compiles"],
        "batch_shape": {"batch_size": B, "prompt_len": S, "patches_per_slot": P,
                        "max_new_tokens": args.max_new_tokens},
    }
    with open(os.path.join(args.out, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    return summary


def _run_batch(items, B, sampler, encoder, config, args, record, state) -> list[dict]:
    """Rolls out one batch (padded to B rows with copies of its first image), writes `<name>.json` / `.png` per
    real image and returns their summary rows."""
    from PIL import Image

    from coordexp_jax.coord import protocols
    from coordexp_jax.data.prompts import encode_prompts
    from coordexp_jax.data.tokenizer import decode_ids
    from coordexp_jax.visualize import draw_prediction

    t0 = time.perf_counter()
    n = len(items)
    rows = items + [items[0]] * (B - n)  # fixed batch shape: the padding rows' results are dropped
    recs = [record(x.path, x.width, x.height) for x, _, _ in rows]
    try:
        batch = encode_prompts(recs, encoder, model_config=config, pixels=[p for _, _, p in rows])
    except ValueError as e:  # model/tokenizer disagreement on image token ids or patch geometry
        raise PredictError(f"checkpoint {args.checkpoint} does not match the tokenizer/image config: {e}") from None
    batch.pop("prompt_lengths", None)
    before = sampler.compile_count()
    roll = sampler.generate(batch)
    state["compiles"] += int(sampler.compile_count() > before)
    coords = uses_coord_tokens(args.protocol)
    results = []
    for b, (x, img, _) in enumerate(items):
        row = roll.row(b)
        finished = bool(roll.finished[b])
        parsed = protocols.parse(row, encoder.tokenizer, encoder.token_ids, args.protocol)
        objects = objects_from_rollout(parsed, roll.logprobs[b], roll.coord_expectation[b], x.width, x.height,
                                       args.pixel_mode, coords)
        status = parse_status(parsed, finished)
        results.append((x, img, {
            "image": os.path.abspath(x.path), "width": x.width, "height": x.height,
            "prompt": encoder.instruction_text(recs[b]),
            "answer": decode_ids(encoder.tokenizer, row[:-1] if finished else row), "objects": objects,
            "parse": {"dropped": parsed.dropped, "closed": parsed.closed, "status": status},
            "num_tokens": int(roll.lengths[b]), "finished": finished}))
    os.makedirs(args.out, exist_ok=True)
    for x, img, res in results:
        draw_prediction(Image.fromarray(img), res["objects"]).save(os.path.join(args.out, f"{x.name}.png"))
    seconds = (time.perf_counter() - t0) / n  # the batch's wall time, shared by its real images
    if state["first_batch_s"] is None:
        state["first_batch_s"] = time.perf_counter() - t0
    out = []
    for x, _, res in results:
        res["seconds"] = round(seconds, 3)
        with open(os.path.join(args.out, f"{x.name}.json"), "w") as f:
            json.dump(res, f, indent=2, ensure_ascii=False)
        out.append({"image": x.path, "name": x.name, "json": f"{x.name}.json", "png": f"{x.name}.png",
                    "objects": len(res["objects"]), "parse": res["parse"]["status"], "finished": res["finished"],
                    "seconds": res["seconds"]})
    return out


# ------------------------------------------------------------------------------------------------ counting mode

def resolve_mode(checkpoint: str, mode: str = "auto") -> str:
    """"counting" or "detection": `mode` when given, else counting iff the model directory holds
    `regression_heads.json` (a `train.kind='counting_regression'` model, ours or its HF export)."""
    if mode not in MODES:
        raise PredictError(f"--mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "counting" if os.path.isfile(os.path.join(checkpoint, HEADS_JSON)) else "detection"


def predict_counting_images(args, t_start: float | None = None) -> dict:
    """The counting mode of the CLI: every input image is counted one object at a time
    (`train.counting_loop.predict_counting`: mark the points so far, re-encode, the heads give the next centre; stop
    on "all counted", on a point inside an earlier mark, or at `--max_count`). Writes per image `<name>.png` (input
    | output with the numbered marks, `counting.draw_counting_result`) and `<name>.json` ({"image", "width",
    "height", "class_name", "count", "points" [[x, y], ...] pixels of the original image in counting order,
    "done_reason", "steps", "predictions" (the raw [-1, 1] answers), "prompt" (the last step's), "seconds"}), and
    `summary.json` ("mode": "counting", images, skipped inputs, totals). An image that cannot be read, that the
    processor refuses or that is too small for the numbered marks is skipped (logged, listed). Raises PredictError
    (no class name, a bad --max_count, no image predicted) and WeightsError (a checkpoint without regression heads).
    """
    from PIL import Image
    from flax import nnx

    from coordexp_jax import counting
    from coordexp_jax.data import counting as C, image as image_lib
    from coordexp_jax.train import counting_loop as CL

    t_start = time.perf_counter() if t_start is None else t_start
    run = CL.counting_run_config(args.checkpoint)
    max_count = args.max_count if args.max_count is not None else (int(run.counting.max_count) if run else 16)
    if max_count < 1:
        raise PredictError(f"--max_count must be >= 1, got {max_count}")
    paths = collect_inputs(args.image, args.images)
    if not os.path.isdir(args.checkpoint):
        raise PredictError(f"--checkpoint {args.checkpoint}: no such model directory")
    cls = args.class_name if args.class_name is not None else CL.run_class_name(run)
    if cls is None or not str(cls).strip():
        raise PredictError(f"--class_name is needed: checkpoint {args.checkpoint} has no training config naming the "
                           f"class it counts")
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model, encoder, scfg = CL.load_counting_model(args.checkpoint, args.tokenizer, dtype=dtype)
    graphdef, state = nnx.split(model)
    point_fn = (CL.make_point_fn(graphdef), state)
    load_s = time.perf_counter() - t_start
    os.makedirs(args.out, exist_ok=True)
    done, skipped = [], []
    t_predict = time.perf_counter()
    for path, name in zip(paths, output_names(paths)):
        t0 = time.perf_counter()
        try:
            img = image_lib.load_image(path)
        except image_lib.ImageLoadError as e:
            _skip(skipped, path, str(e))
            continue
        h, w = img.shape[:2]
        problem = image_lib.processing_problem(h, w, encoder.pcfg.image)
        if problem is not None:
            _skip(skipped, path, problem)
            continue
        try:
            res = CL.predict_counting(model, img, cls, encoder, scfg, max_count=max_count, point_fn=point_fn)
        except C.MarkError as e:
            _skip(skipped, path, str(e))
            continue
        pic = counting.draw_counting_result(img, res.points, caption=counting.result_caption(res))
        Image.fromarray(pic).save(os.path.join(args.out, f"{name}.png"))
        out = {"image": os.path.abspath(path), "width": w, "height": h, "class_name": cls, "count": res.count,
               "points": [[round(float(x), 2), round(float(y), 2)] for x, y in res.points],
               "done_reason": res.done_reason, "steps": res.steps,
               "predictions": [[round(float(x), 5), round(float(y), 5)] for x, y in res.predictions],
               "prompt": res.last_prompt, "seconds": round(time.perf_counter() - t0, 3)}
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(out, f, indent=2, ensure_ascii=False)
        done.append({"image": path, "name": name, "json": f"{name}.json", "png": f"{name}.png",
                     "count": res.count, "done_reason": res.done_reason, "seconds": out["seconds"]})
    predict_s = time.perf_counter() - t_predict
    if not done:
        if len(paths) == 1:
            raise PredictError(skipped[0]["reason"])
        raise PredictError(f"none of the {len(paths)} images could be counted (first: {skipped[0]['reason']})")
    total_s = time.perf_counter() - t_start
    summary = {
        "mode": "counting", "checkpoint": os.path.abspath(args.checkpoint), "out": os.path.abspath(args.out),
        "class_name": cls, "max_count": max_count, "images": done, "skipped": skipped,
        "totals": {"inputs": len(paths), "predicted": len(done), "skipped": len(skipped),
                   "objects": int(sum(d["count"] for d in done)),
                   "load_seconds": round(load_s, 3), "predict_seconds": round(predict_s, 3),
                   "total_seconds": round(total_s, 3), "seconds_per_image": round(total_s / len(done), 3)},
    }
    with open(os.path.join(args.out, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False)
    return summary


def summary_line(s: dict) -> str:
    """The one line printed at the end (rounded figures)."""
    t = s["totals"]
    skipped = f", {t['skipped']} skipped" if t["skipped"] else ""
    if s.get("mode") == "counting":
        from coordexp_jax.data.counting import plural

        name = s["class_name"] if t["objects"] == 1 else plural(s["class_name"])
        return (f"{t['predicted']}/{t['inputs']} images counted{skipped}: {t['objects']} {name} in all; "
                f"{t['seconds_per_image']:.2f} s/image ({t['total_seconds']:.1f} s in all, model load "
                f"{t['load_seconds']:.1f} s) -> {_shown_path(os.path.join(s['out'], SUMMARY))}")
    failed = t["parse"]["failed"]
    compiles = f"{s['compiles']} compile" + ("s" if s["compiles"] != 1 else "")
    path = _shown_path(os.path.join(s["out"], SUMMARY))
    return (f"{t['predicted']}/{t['inputs']} images predicted{skipped}: {t['objects']} objects"
            + (f", {failed} unparsed answers" if failed else "")
            + f"; {compiles}, {t['seconds_per_image']:.2f} s/image ({t['total_seconds']:.1f} s in all, "
              f"model load {t['load_seconds']:.1f} s) -> {path}")


def _shown_path(path: str) -> str:
    """`path` relative to the working directory when below it, else as it is."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


@guard
def main(argv=None) -> int:
    """A user's error (any CoordExpError: image, checkpoint, tokenizer, prompt; a missing path) is one line on
    stderr and exit code EXIT_BAD_INPUT (`coordexp_jax.cli.guard`)."""
    args = _parser().parse_args(argv)
    print(summary_line(predict(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
