"""`python -m coordexp_jax.train --config configs/NAME.py [--config.key=value ...] [--workdir DIR]`.

Runs (or resumes, from the latest checkpoint in the workdir) Stage-1 training. Several processes
(multi-host): set COORDEXP_COORDINATOR=host:port, COORDEXP_NUM_PROCESSES, COORDEXP_PROCESS_ID (or
COORDEXP_DISTRIBUTED=1 on a cluster JAX detects) and start the same command on every process.
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    from coordexp_jax.train import sharding as shd

    shd.maybe_initialize_distributed()  # before any other JAX call

    FLAGS = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "path to a config file (get_config())", flag_values=FLAGS,
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, resolved config); default "
                        "runs/<config name>", flag_values=FLAGS)
    flags.DEFINE_bool("export", True, "write the final model (LoRA merged) to WORKDIR/final_model", flag_values=FLAGS)
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + FLAGS.get_help())
        print("\nEvery config key can be overridden: --config.optim.lr=3e-4 --config.lora.enabled=True "
              "(keys and their meaning: docs/training.md).")
        return 0
    try:
        FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyError, AttributeError, ValueError, TypeError, FileNotFoundError) as e:  # config_flags override errors
        print(f"error: {_override_message(e, argv)}", file=sys.stderr)
        return 2
    if FLAGS.config is None:
        print("error: --config is required (e.g. --config configs/demo.py)", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from coordexp_jax.train import build, checkpoint, config as config_lib, loop

    cfg = FLAGS.config
    try:
        cfg = config_lib.validate(cfg)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = FLAGS.workdir or os.path.join("runs", cfg.name)
    try:
        result = loop.train(cfg, workdir)
    except (config_lib.ConfigError, build.DataPathError, checkpoint.IncompatibleCheckpointError,
            loop.NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if FLAGS.export and result["model_config"] is not None and jax_process_index() == 0:
        out = os.path.join(workdir, "final_model")
        if os.path.isdir(out):  # our own output of an earlier finish of this run
            import shutil

            shutil.rmtree(out)
        # The final model is the one evaluation scored: the EMA weights when EMA is on and eval.use_ema.
        loop.export_model(result, out, use_ema=cfg.train.ema_decay > 0 and cfg.eval.use_ema)
        write_preprocessing(cfg, result["model_config"], out)
        print(f"final model: {out} (to HF: python tools/export_hf.py --checkpoint {out} --out OUT_DIR)")
    m = result["metrics"]
    print(f"done: step {result['step']}, loss {m.get('loss', float('nan')):.4f}, skipped {result['skipped']}, "
          f"compiles {result['compiles']}" + (f", eval {result['eval']}" if result["eval"] else ""))
    return 0


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
