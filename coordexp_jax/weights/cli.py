"""Shared plumbing of the weight CLIs: one error line + non-zero exit, and nothing left in --out on failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile

from ..model.config import ConfigError
from .names import WeightsError

EXPECTED = (WeightsError, ConfigError, FileNotFoundError, NotADirectoryError, FileExistsError, ValueError, OSError)


@contextlib.contextmanager
def atomic_dir(out: str):
    """Yields a temp dir next to `out`; renames it to `out` on success, removes it on any failure."""
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"--out {out} already exists and is not empty")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp", dir=parent)
    try:
        yield os.path.join(tmp, "d")
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(os.path.join(tmp, "d"), out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(main, argv=None) -> int:
    """Calls main(argv); expected errors become one `error: ...` line on stderr and exit code 2."""
    try:
        main(argv)
        return 0
    except EXPECTED as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
