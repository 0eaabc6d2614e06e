"""One image -> boxes: `python -m coordexp_jax.predict --checkpoint DIR --image IMG [--prompt TEXT] --out DIR`.

Loads a checkpoint (an HF Qwen3-VL directory or one of ours, `coordexp_jax.weights.checkpoint`), preprocesses the
image exactly as training does (`data/image.py` via `data/prompts.py`: smart_resize, bicubic, patchify, the same
chat prompt), rolls out with the jitted sampler, parses the answer (`coord/protocols.py`) and writes to --out:

- `prediction.json`: {"image", "width", "height", "prompt", "answer" (decoded text), "objects": [{"desc",
  "bbox" [x1, y1, x2, y2] in pixels of the ORIGINAL image, "bbox_expectation" (the same box from the expectation
  ĉ of each coordinate distribution), "score" = exp(mean log-prob of the 4 coordinate tokens under the model at
  temperature 1)}], "parse" {"dropped", "closed"}, "num_tokens", "finished"}; with `--protocol qwen_text`
  (coordinates as text, no coordinate tokens) the objects have "desc" and "bbox" (q / 1000 as written) only;
- `prediction.png`: the image with the boxes and labels drawn.

Bad input (unreadable image, checkpoint that does not match its config or the tokenizer, prompt longer than the
cache): one `error: ...` line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from coordexp_jax.cli import EXIT_USER_ERROR, guard
from coordexp_jax.coord.protocols import PROTOCOLS, uses_coord_tokens
from coordexp_jax.errors import CoordExpError

EXIT_BAD_INPUT = EXIT_USER_ERROR


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


def _parser() -> argparse.ArgumentParser:
    from coordexp_jax.cli import ArgumentParser

    p = ArgumentParser(prog="python -m coordexp_jax.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF Qwen3-VL directory or a coordexp_jax checkpoint")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--prompt", default=None, help="instruction text (default: the detection instruction)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the checkpoint's, else the project's small tokenizer)")
    p.add_argument("--protocol", default=None, choices=PROTOCOLS,
                   help="default: the checkpoint's preprocessing.json (written by training), else coordjson")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-len", type=int, default=8192, help="KV cache length limit: prompt + new tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--constrain", action="store_true", help="protocol-constrained decoding")
    p.add_argument("--pixel-mode", default=None, choices=("continuous", "coordexp"),
                   help="default: the checkpoint's preprocessing.json, else continuous")
    p.add_argument("--min-pixels", type=int, default=None,
                   help="default: the checkpoint's preprocessing.json, else the released processor's")
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    return p


PREPROCESSING = "preprocessing.json"  # written next to a trained model by `python -m coordexp_jax.train`


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


def predict(args) -> dict:
    import jax.numpy as jnp

    from coordexp_jax.coord import protocols
    from coordexp_jax.data import image as image_lib
    from coordexp_jax.data.prompts import PromptConfig, SampleEncoder, encode_prompts
    from coordexp_jax.data.records import Record
    from coordexp_jax.data.tokenizer import decode_ids, token_ids_from_tokenizer
    from coordexp_jax.rollout.constraints import protocol_constraint
    from coordexp_jax.rollout.sampler import Sampler, SamplerConfig
    from coordexp_jax.visualize import draw_prediction
    from coordexp_jax.weights.checkpoint import load_checkpoint

    _apply_preprocessing_defaults(args)
    if args.max_new_tokens < 1 or args.max_new_tokens >= args.max_len:
        raise PredictError(f"--max-new-tokens must be in [1, --max-len={args.max_len}), got {args.max_new_tokens}")
    if not os.path.isfile(args.image):
        raise PredictError(f"--image {args.image}: file not found")
    img = image_lib.load_image(args.image)  # ImageLoadError names the file; EXIF orientation applied, as in training
    H0, W0 = img.shape[:2]
    tok = _tokenizer(args)
    tid = token_ids_from_tokenizer(tok, require_coords=uses_coord_tokens(args.protocol))
    im_kw = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v is not None}
    pcfg = PromptConfig(protocol=args.protocol, image=image_lib.ImageConfig(**im_kw), min_text_len=16,
                        max_text_len=args.max_len)
    problem = image_lib.processing_problem(H0, W0, pcfg.image)  # e.g. aspect ratio > 200: before loading weights
    if problem is not None:
        raise PredictError(f"--image {args.image}: {problem}")
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    config, model = load_checkpoint(args.checkpoint, dtype)
    if tid.vocab_size > config.vocab_size:
        raise PredictError(f"tokenizer has {tid.vocab_size} tokens but checkpoint {args.checkpoint} has a vocabulary "
                           f"of {config.vocab_size} (pass the checkpoint's tokenizer with --tokenizer)")
    encoder = SampleEncoder(pcfg, tokenizer=tok)
    rec = Record(image=args.image, width=W0, height=H0, objects=(), task="detection", prompt=args.prompt,
                 source=args.image)
    pv, grid, _ = image_lib.process_image(img, pcfg.image, name=args.image)
    try:
        batch = encode_prompts([rec], encoder, model_config=config, pixels=[(pv, grid)])
    except ValueError as e:  # model/tokenizer disagreement on image token ids or patch geometry
        raise PredictError(f"checkpoint {args.checkpoint} does not match the tokenizer/image config: {e}") from None
    batch.pop("prompt_lengths", None)
    scfg = SamplerConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, max_prompt_len=args.max_len - args.max_new_tokens)
    constraint = protocol_constraint(args.protocol, tok, tid, config.padded_vocab_size) if args.constrain else None
    sampler = Sampler(model, tid, scfg, constraint=constraint, vocab_size=config.padded_vocab_size)
    roll = sampler.generate(batch)
    row = roll.row(0)
    parsed = protocols.parse(row, tok, tid, args.protocol)
    objects = objects_from_rollout(parsed, roll.logprobs[0], roll.coord_expectation[0], W0, H0, args.pixel_mode,
                                   uses_coord_tokens(args.protocol))
    answer = decode_ids(tok, row[:-1] if roll.finished[0] else row)
    result = {"image": os.path.abspath(args.image), "width": W0, "height": H0,
              "prompt": encoder.instruction_text(rec), "answer": answer, "objects": objects,
              "parse": {"dropped": parsed.dropped, "closed": parsed.closed},
              "num_tokens": int(roll.lengths[0]), "finished": bool(roll.finished[0])}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prediction.json"), "w") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    from PIL import Image

    draw_prediction(Image.fromarray(img), objects).save(os.path.join(args.out, "prediction.png"))
    return result


@guard
def main(argv=None) -> int:
    """A user's error (any CoordExpError: image, checkpoint, tokenizer, prompt; a missing path) is one line on
    stderr and exit code EXIT_BAD_INPUT (`coordexp_jax.cli.guard`)."""
    args = _parser().parse_args(argv)
    res = predict(args)
    print(f"{len(res['objects'])} objects -> {os.path.join(args.out, 'prediction.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
