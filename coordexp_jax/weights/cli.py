"""Shared plumbing of the weight CLIs: one error line + non-zero exit (`coordexp_jax.cli`), and nothing left in --out
on failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from ..cli import run_cli


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
    """Calls main(argv); a user's error (WeightsError, ConfigError, a missing path, ...: any CoordExpError) becomes
    one `error: ...` line on stderr and exit code 2 (`coordexp_jax.cli.run_cli`)."""
    return run_cli(main, argv)
