"""The one error line of every command-line entry point (train, evaluate, predict, train.export, tools/*).

`guard(main)` (or `run_cli(main, argv)`) runs `main(argv) -> int | None` and turns a *user's* mistake into one
line `error: <message>` on stderr and exit code 2 (`EXIT_USER_ERROR`), without a traceback:
- any `coordexp_jax.errors.CoordExpError` (a bad record, config key, path, checkpoint, tensor or image);
- a missing or unreadable file or directory (`FileNotFoundError`, `NotADirectoryError`, `IsADirectoryError`,
  `PermissionError`, `FileExistsError`: their message names the path);
- a bad command-line argument (`cli.ArgumentParser` raises `UsageError` instead of printing usage and exiting).
A message of several lines is collapsed to one. Every other exception is a bug and keeps its traceback.
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


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose errors raise `UsageError` (one line via `guard`) instead of printing the
    usage block and calling `sys.exit(2)`; `--help` still prints and exits 0."""

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


def _print_error(message: str) -> None:
    sys.stdout.flush()
    print(f"error: {message}", file=sys.stderr, flush=True)


__all__ = ["ArgumentParser", "UsageError", "guard", "run_cli", "one_line", "error_message", "EXIT_USER_ERROR"]
