"""`python -m coordexp_jax.train --config configs/NAME.py [--config.key=value ...] [--workdir DIR]`.

Runs (or resumes, from the latest checkpoint in the workdir) the training `train.kind` names: Stage-1 SFT (with
Stage-2 steps when stage2.ratio > 0), GRPO or counting with regression heads. Several processes
(multi-host): set COORDEXP_COORDINATOR=host:port, COORDEXP_NUM_PROCESSES, COORDEXP_PROCESS_ID (or
COORDEXP_DISTRIBUTED=1 on a cluster JAX detects) and start the same command on every process.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys

from coordexp_jax.cli import CONFIG_OVERRIDE_HELP, config_flag_values, guard, normalize_config_args, parse_config_flags

FLAG_SPELLING = ("Flags are one word (--config, --workdir, --export / --noexport) or a config key, "
                 "--config.section.key=value, in snake_case as the config spells it (the dashed spelling "
                 "--config.train.max-minutes is accepted too).")


@guard
def main(argv=None) -> int:
    from absl import flags

    from coordexp_jax.train import sharding as shd

    shd.maybe_initialize_distributed()  # before any other JAX call

    argv = normalize_config_args(sys.argv if argv is None else argv)
    FLAGS = config_flag_values(argv)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, resolved config); default "
                        "runs/<config name>", flag_values=FLAGS)
    flags.DEFINE_bool("export", True, "write the final model (LoRA merged) to WORKDIR/final_model",
                      flag_values=FLAGS)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + FLAGS.get_help())
        import textwrap

        print("\n" + textwrap.fill(FLAG_SPELLING, 100) + "\n" + textwrap.fill(CONFIG_OVERRIDE_HELP, 100))
        return 0
    parse_config_flags(FLAGS, argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from coordexp_jax.train import config as config_lib, loop

    cfg = config_lib.validate(FLAGS.config)
    workdir = FLAGS.workdir or os.path.join("runs", cfg.name)
    result = loop.train(cfg, workdir)
    final_model = None
    if FLAGS.export and result["model_config"] is not None and jax_process_index() == 0:
        from coordexp_jax.predict import PREPROCESSING

        out = os.path.join(workdir, "final_model")
        if result["steps_run"] or not os.path.isfile(os.path.join(out, PREPROCESSING)):
            # The final model is the one evaluation scored: the EMA weights when EMA is on and eval.use_ema.
            export_final_model(cfg, result, out, use_ema=cfg.train.ema_decay > 0 and cfg.eval.use_ema)
        final_model = out
        print(f"final model: {out} (to HF: python tools/export_hf.py --checkpoint {out} --out OUT_DIR)")
    if jax_process_index() == 0:
        for line in end_hints(cfg, workdir, final_model):
            print(line)
    print(done_line(cfg, result))
    return 0


def done_line(cfg, result: dict) -> str:
    """The last line of a run: 'done: step 3800 of 3800 (steps), loss 0.4213, skipped 0, compiles 1, eval AP50
    0.646, AP 0.482, F1@0.5 0.717, parse rate 100.0%' (figures rounded; the evaluation's headline only: every
    metric is in metrics.jsonl and the report)."""
    from coordexp_jax.evaluate import summary_line

    m, ev = result["metrics"], result["eval"]
    loss = f", loss {m['loss']:.4f}" if "loss" in m else ""
    text = f"done: step {result['step']} of {cfg.train.steps} ({result['stop_reason']}){loss}, skipped " \
           f"{result['skipped']}, compiles {result['compiles']}"
    if ev:
        head = summary_line(ev) or ", ".join(f"{k} {float(v):.4g}" for k, v in ev.items() if k != "minutes")
        text += f", eval {head}"
    return text


def latest_report(workdir: str) -> str | None:
    """WORKDIR/eval/step_N/index.html of the largest N (the last evaluation's report page), or None."""
    import re

    found = []
    d = os.path.join(workdir, "eval")
    for name in os.listdir(d) if os.path.isdir(d) else ():
        m = re.fullmatch(r"step_(\d+)", name)
        if m and os.path.isfile(os.path.join(d, name, "index.html")):
            found.append((int(m.group(1)), os.path.join(d, name, "index.html")))
    return max(found)[1] if found else None


def held_out_image(cfg) -> tuple[str, bool, str | None] | None:
    """(image path, held out, instruction or None) for a predict example: the first evaluation record's image (the
    synthetic set: the first of the val images the run wrote; jsonl data: data.eval_path's first record), else the
    first training record's image (held out False); the instruction is the record's own for grounding/counting
    records (`_record_prompt`). None when neither can be read (a source error is the run's business)."""
    from coordexp_jax.data.records import iter_jsonl
    from coordexp_jax.errors import CoordExpError
    from coordexp_jax.train import build

    try:
        train_specs, eval_specs = build.data_specs(cfg)
    except (CoordExpError, OSError):
        return None
    for specs, held_out in ((eval_specs or [], True), (train_specs, False)):
        for spec in specs:
            try:
                rec = next(iter(iter_jsonl(spec.path, image_root=spec.image_root, box_format=spec.box_format,
                                           pixel_mode=spec.pixel_mode, policy=spec.policy)), None)
            except (CoordExpError, OSError, ValueError):
                rec = None
            if rec is not None and os.path.isfile(rec.image):
                return rec.image, held_out, _record_prompt(cfg, rec)
    return None


def _record_prompt(cfg, rec) -> str | None:
    """The instruction a non-detection record is asked with (a grounding phrase, a counting category), for the
    predict hint's --prompt; None for detection (predict's default instruction)."""
    if rec.task == "detection" and rec.prompt is None:
        return None
    from coordexp_jax.data.prompts import PromptConfig, instruction_text

    try:
        return instruction_text(PromptConfig(protocol=cfg.data.protocol), rec)
    except (CoordExpError, ValueError, KeyError):
        return None


def _short(path: str) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    rel = os.path.relpath(os.path.abspath(path))
    return rel if not rel.startswith("..") else os.path.abspath(path)


def end_hints(cfg, workdir: str, final_model: str | None) -> list[str]:
    """What to look at next: the last evaluation's index.html and a predict command on a held-out image (when
    the final model was written)."""
    lines = []
    page = latest_report(workdir)
    if page:
        lines.append(f"report: {_short(page)} (the last evaluation; open it in a browser)")
    # predict answers with boxes: not for the regression heads' point-by-point counting (docs/counting.md), nor
    # for human-object interaction (its prompts carry the boxes' links; evaluate scores those runs)
    hint = final_model and cfg.train.kind != "counting_regression" and cfg.data.kind != "hoi"
    image = held_out_image(cfg) if hint else None
    if image:
        path, held_out, prompt = image
        lines.append(f"predict on a {'held-out' if held_out else 'training'} image: python -m coordexp_jax.predict "
                     f"--checkpoint {_short(final_model)} --image {_short(path)} "
                     + (f"--prompt {shlex.quote(prompt)} " if prompt else "")
                     + f"--out {_short(os.path.join(workdir, 'predict'))}")
    return lines


def export_final_model(cfg, result: dict, out: str, use_ema: bool) -> None:
    """Writes `result`'s model (LoRA merged) and its preprocessing.json to `out`, replacing an earlier one only
    once the new one is complete (a crash mid-export leaves the old one, never a half-written directory)."""
    import shutil
    import tempfile

    from coordexp_jax.train import loop

    parent = os.path.dirname(os.path.abspath(out))
    tmp = tempfile.mkdtemp(prefix=".final_model.tmp", dir=parent)
    try:
        new = os.path.join(tmp, "model")
        loop.export_model(result, new, use_ema=use_ema)
        write_preprocessing(cfg, result["model_config"], new)
        if os.path.isdir(out):  # our own output of an earlier finish of this run
            shutil.rmtree(out)
        os.rename(new, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_preprocessing(cfg, model_config, out_dir: str) -> None:
    """The prompt/image settings the model was trained with, for `python -m coordexp_jax.predict` (which uses them
    as defaults: a model trained on 128 px images must be fed 128 px images)."""
    import json

    from coordexp_jax.predict import PREPROCESSING
    from coordexp_jax.train import build

    pcfg = build.prompt_config(cfg, model_config)
    with open(os.path.join(out_dir, PREPROCESSING), "w") as f:
        json.dump({"protocol": pcfg.protocol, "pixel_mode": pcfg.pixel_mode, "min_pixels": pcfg.image.min_pixels,
                   "max_pixels": pcfg.image.max_pixels}, f, indent=1)


def jax_process_index() -> int:
    import jax

    return jax.process_index()


if __name__ == "__main__":
    sys.exit(main())
