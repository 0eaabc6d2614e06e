"""The one error line of every command-line entry point (train, evaluate, predict, train.export, tools/*).

`guard(main)` (or `run_cli(main, argv)`) runs `main(argv) -> int | None` and turns a *user's* mistake into one
line `error: <message>` on stderr and exit code 2 (`EXIT_USER_ERROR`), without a traceback:
- any `coordexp_jax.errors.CoordExpError` (a bad record, config key, path, checkpoint, tensor or image);
- a missing or unreadable file or directory (`FileNotFoundError`, `NotADirectoryError`, `IsADirectoryError`,
  `PermissionError`, `FileExistsError`: their message names the path);
- a bad command-line argument (`cli.ArgumentParser` raises `UsageError` instead of printing usage and exiting).
A message of several lines is collapsed to one. Every other exception is a bug and keeps its traceback.

Flag spelling, every CLI: the canonical spelling of a multi-word flag is `--snake_case` (as `--config.key` and
`--workdir`); `cli.ArgumentParser` registers the dashed spelling `--snake-case` as a hidden alias (accepted, not
shown in help or error messages). `--config FILE --config.key=value` (an ml_collections config file and its
overrides, as `python -m coordexp_jax.train` takes them) is parsed by one implementation, `config_flag_values` +
`parse_config_flags`, for every CLI that reads a training config.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence

from coordexp_jax.errors import CoordExpError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


class UsageError(CoordExpError, ValueError):
    """A command-line argument is missing, unknown or invalid; the message names it."""


def flag_alias(option: str) -> str | None:
    """The other spelling of a multi-word long flag: '--max_records' <-> '--max-records'; None for a one-word flag
    ('--out'), a short one ('-h') or a dotted one ('--config.key')."""
    if not option.startswith("--") or "." in option:
        return None
    name = option[2:]
    if "_" in name:
        return "--" + name.replace("_", "-")
    if "-" in name:
        return "--" + name.replace("-", "_")
    return None


def _add_aliased(add, args: tuple, kwargs: dict):
    """`add(*args, **kwargs)` (an `add_argument`) with each long flag's other spelling (`flag_alias`) registered
    too, then removed from the action's `option_strings`: still parsed (the parser's option table keeps it), never
    shown in help, usage or error messages."""
    aliases = [a for a in (flag_alias(s) for s in args if isinstance(s, str)) if a and a not in args]
    action = add(*args, *aliases, **kwargs)
    if aliases:
        action.option_strings = [s for s in action.option_strings if s not in aliases]
    return action


def _aliasing(group):
    """`group` (an argument group or mutually exclusive group) registering aliases as `ArgumentParser` does, and
    so do the groups made from it."""
    add, add_group, add_mutex = group.add_argument, group.add_argument_group, group.add_mutually_exclusive_group
    group.add_argument = lambda *a, **k: _add_aliased(add, a, k)
    group.add_argument_group = lambda *a, **k: _aliasing(add_group(*a, **k))
    group.add_mutually_exclusive_group = lambda *a, **k: _aliasing(add_mutex(*a, **k))
    return group


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors raise `UsageError` (one line via `guard`) instead of printing the
    usage block and calling `sys.exit(2)`; `--help` still prints and exits 0.

    `add_argument("--max_records", ...)` also registers `--max-records` (and `--max-tokens` registers `--max_tokens`)
    as a hidden alias: both spellings parse to the same action; help, usage and error messages show the spelling
    given to `add_argument` only (the project's rule: give the `--snake_case` one). The same holds for arguments
    of its argument groups, mutually exclusive groups and subparsers."""

    def add_argument(self, *args, **kwargs):
        return _add_aliased(super().add_argument, args, kwargs)

    def add_argument_group(self, *args, **kwargs):
        return _aliasing(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, *args, **kwargs):
        return _aliasing(super().add_mutually_exclusive_group(*args, **kwargs))

    def _get_option_tuples(self, option_string):
        # an abbreviation ('--max') matching both spellings of one flag is not ambiguous: one match per action
        seen, out = set(), []
        for tup in super()._get_option_tuples(option_string):
            if id(tup[0]) not in seen:
                seen.add(id(tup[0]))
                out.append(tup)
        return out

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(message)


def one_line(text: str) -> str:
    """`text` with its lines stripped and joined: after a line ending in ':' or ',' by a space, else by '; '.

    'does not match this run:\\n  a: 1\\n  b: 2\\nUse X' -> 'does not match this run: a: 1; b: 2; Use X'.
    """
    out = ""
    for line in str(text).splitlines():
        line = " ".join(line.split())
        if not line:
            continue
        out = line if not out else out + (" " if out.endswith((":", ",")) else "; ") + line
    return out


def error_message(e: BaseException) -> str:
    """The one-line message of a user-facing error (a KeyError's message without the quotes of its repr)."""
    if isinstance(e, KeyError) and len(e.args) == 1:
        text = str(e.args[0])
    else:
        text = str(e)
    return one_line(text) or type(e).__name__


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Calls `main(argv)`; returns its exit code (None -> 0). A user's error (see the module docstring) prints
    `error: <one line>` on stderr and returns 2; Ctrl-C prints `error: interrupted` and returns 130."""
    try:
        rc = main(argv)
    except (CoordExpError, *USER_OS_ERRORS) as e:
        _print_error(error_message(e))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _print_error("interrupted")
        return EXIT_INTERRUPTED
    return 0 if rc is None else int(rc)


def guard(main: Callable[[Sequence[str] | None], int | None]) -> Callable[[Sequence[str] | None], int]:
    """Decorator: `main(argv)` run through `run_cli` (in-process callers and `sys.exit(main())` alike)."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        return run_cli(main, argv)

    wrapped.unguarded = main
    return wrapped


# ------------------------------------------------------------------ --config FILE --config.key=value (ml_collections)

CONFIG_OVERRIDE_HELP = ("Every config key can be overridden: --config.optim.lr=3e-4 --config.lora.enabled=True "
                        "(keys in snake_case and their meaning: docs/training.md).")


def config_flag_values(argv: Sequence[str]):
    """An absl `FlagValues` with the flag `--config FILE` (`ml_collections.config_flags.DEFINE_config_file`, the
    config locked) whose `--config.a.b=value` overrides are read from `argv` (a full argv, argv[0] = the program).
    A caller may define more absl flags on it before `parse_config_flags`."""
    from absl import flags
    from ml_collections import config_flags

    FLAGS = flags.FlagValues()
    # sys_argv: the overrides are read from this argv, not from sys.argv (main(argv) called in-process)
    config_flags.DEFINE_config_file("config", None, "path to a config file (get_config())", flag_values=FLAGS,
                                    lock_config=True, sys_argv=list(argv))
    return FLAGS


def normalize_config_args(argv: Sequence[str]) -> list[str]:
    """argv with `--config.a.some-key=v` spelled `--config.a.some_key=v` (config keys are snake_case; the dashed
    spelling is an alias, as for every flag)."""
    out = []
    for a in argv:
        if a.startswith("--config.") and "-" in a.split("=", 1)[0]:
            key, eq, val = a.partition("=")
            a = "--config." + key[len("--config."):].replace("-", "_") + eq + val
        out.append(a)
    return out


def parse_config_flags(FLAGS, argv: Sequence[str], *, known_only: bool = False, required: bool = True) -> list[str]:
    """Parses `argv` (argv[0] = the program; `normalize_config_args` applied by the caller to both this argv and
    `config_flag_values`'s) into `FLAGS`: `--config FILE` loaded and its `--config.key=value` overrides applied.

    `known_only`: flags `FLAGS` does not define are returned (argv[0] first, order kept) for another parser.
    Returns the unparsed rest of argv. Raises `UsageError` with one line naming the file (missing, syntax error, no
    get_config(), failed get_config()) or the key (unknown key with a 'did you mean', value of the wrong type);
    a missing `--config` with `required`."""
    from absl import flags

    argv = list(argv)
    try:
        rest = FLAGS(argv, known_only=known_only)
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
        if required:
            raise UsageError("--config is required (e.g. --config configs/demo.py)")
    else:
        _check_config_loaded(FLAGS["config"])
    return list(rest)


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
    import os

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


def _print_error(message: str) -> None:
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)


__all__ = ["ArgumentParser", "UsageError", "guard", "run_cli", "one_line", "error_message", "EXIT_USER_ERROR",
           "flag_alias", "config_flag_values", "normalize_config_args", "parse_config_flags", "CONFIG_OVERRIDE_HELP"]
