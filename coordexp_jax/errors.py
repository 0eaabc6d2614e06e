"""The project's error base class.

Every error that describes a *user's* mistake (a bad record, config key, path, checkpoint or image) derives from
`CoordExpError` as well as from the builtin class it always had (`ValueError`, `FileNotFoundError`, ...), so
library callers keep catching what they caught before, and every CLI turns a `CoordExpError` into one line on
stderr with a non-zero exit instead of a traceback. Programming errors (bugs) are never `CoordExpError`.
"""

from __future__ import annotations


class CoordExpError(Exception):
    """Base of every user-facing error; its message alone (no traceback) must tell the user what to fix.

    The message names the file (and line or record), the config key, or the tensor concerned.
    """
