"""`python -m coordexp_jax.train --config configs/NAME.py [--config.key=value ...] [--workdir DIR]`.

Runs (or resumes, from the latest checkpoint in the workdir) Stage-1 training. Several processes
(multi-host): set COORDEXP_COORDINATOR=host:port, COORDEXP_NUM_PROCESSES, COORDEXP_PROCESS_ID (or
COORDEXP_DISTRIBUTED=1 on a cluster JAX detects) and start the same command on every process.
"""

from __future__ import annotations

import logging
import os
import sys

from coordexp_jax.cli import UsageError, guard


@guard
def main(argv=None) -> int:
    from absl import flags
    from ml_collections import config_flags

    from coordexp_jax.train import sharding as shd

    shd.maybe_initialize_distributed()  # before any other JAX call

    argv = list(sys.argv if argv is None else argv)
    FLAGS = flags.FlagValues()
    # sys_argv: the overrides are read from this argv, not from sys.argv (main(argv) called in-process)
    config_flags.DEFINE_config_file("config", None, "path to a config file (get_config())", flag_values=FLAGS,
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, resolved config); default "
                        "runs/<config name>", flag_values=FLAGS)
    flags.DEFINE_bool("export", True, "write the final model (LoRA merged) to WORKDIR/final_model", flag_values=FLAGS)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + FLAGS.get_help())
        print("\nEvery config key can be overridden: --config.optim.lr=3e-4 --config.lora.enabled=True "
              "(keys and their meaning: docs/training.md).")
        return 0
    try:
        FLAGS(argv)
    except flags.Error as e:
        raise UsageError(_flag_message(e)) from None
    except SyntaxError as e:  # in the config file
        raise UsageError(f"--config {e.filename}, line {e.lineno}: {e.msg}") from None
    except AttributeError as e:
        if "get_config" in str(e):
            raise UsageError(f"--config {_config_arg(argv)}: the file defines no get_config()") from None
        raise UsageError(_override_message(e, argv)) from None
    except (KeyError, ValueError, TypeError, FileNotFoundError) as e:  # config_flags override errors
        raise UsageError(_override_message(e, argv)) from None
    if FLAGS.config is None:
        raise UsageError("--config is required (e.g. --config configs/demo.py)")
    _check_config_loaded(FLAGS["config"])

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from coordexp_jax.train import config as config_lib, loop

    cfg = config_lib.validate(FLAGS.config)
    workdir = FLAGS.workdir or os.path.join("runs", cfg.name)
    result = loop.train(cfg, workdir)
    if FLAGS.export and result["model_config"] is not None and jax_process_index() == 0:
        from coordexp_jax.predict import PREPROCESSING

        out = os.path.join(workdir, "final_model")
        if result["steps_run"] or not os.path.isfile(os.path.join(out, PREPROCESSING)):
            # The final model is the one evaluation scored: the EMA weights when EMA is on and eval.use_ema.
            export_final_model(cfg, result, out, use_ema=cfg.train.ema_decay > 0 and cfg.eval.use_ema)
        print(f"final model: {out} (to HF: python tools/export_hf.py --checkpoint {out} --out OUT_DIR)")
    m = result["metrics"]
    loss = f", loss {m['loss']:.4f}" if "loss" in m else ""
    print(f"done: step {result['step']} of {cfg.train.steps} ({result['stop_reason']}){loss}, skipped "
          f"{result['skipped']}, compiles {result['compiles']}" + (f", eval {result['eval']}" if result["eval"] else ""))
    return 0


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


def _flag_message(e: Exception) -> str:
    """One line for an absl flag error; a config file that failed inside get_config() keeps the failing line and
    the exception (ml_collections puts a whole traceback into the message)."""
    text = str(e)
    if "Error whilst parsing config file" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        where = next((ln for ln in reversed(lines) if ln.startswith("File ")), "")
        return f"--config: the config file failed to load: {lines[-1]}" + (f" ({where})" if where else "")
    return text


def _config_arg(argv: list[str]) -> str:
    """The value of --config in argv ('--config F' or '--config=F')."""
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return "?"


def _check_config_loaded(flag) -> None:
    """ml_collections defers a config file's load error to the first attribute access (a traceback deep in
    validate); raises UsageError naming the file instead."""
    cfg = flag.value
    if type(cfg).__name__ != "_ErrorConfig":
        return
    path = str(flag.config_filename).split(":", 1)[0]
    if not os.path.exists(path):
        raise UsageError(f"--config {path}: file not found")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise UsageError(f"--config {path}: not a readable file")
    cause = object.__getattribute__(cfg, "_error")
    raise UsageError(f"--config {path}: cannot be loaded ({cause})")


def _override_message(e: Exception, argv: list[str]) -> str:
    """One readable line for a failed `--config.a.b=v` override (ml_collections raises a bare KeyError)."""
    import re

    text = str(e.args[0]) if e.args else str(e)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    for a in argv:
        if a.startswith("--config.") and "=" in a:
            key = a[len("--config."):].split("=", 1)[0]
            if re.search(r"'\\?'?" + re.escape(key.split(".")[-1]) + r"\\?'", text):
                return (f"unknown config key '{key}' (from {a.split('=')[0]})"
                        + (f"; did you mean '{key.rsplit('.', 1)[0]}.{hint.group(1)}'?" if hint and "." in key else ""))
    return f"{type(e).__name__}: {text}"


def jax_process_index() -> int:
    import jax

    return jax.process_index()


if __name__ == "__main__":
    sys.exit(main())
