"""Cache folders only their owner can use: created 0700, each missing level, so that no other user can plant a
kernel library, a tokenizer snapshot or a converted model in them (folders that exist are left as they are: a
cache shared on purpose keeps its permissions)."""

from __future__ import annotations

import os


def make_private_dirs(path: str | os.PathLike) -> str:
    """Creates ``path`` and every missing parent with mode 0700; returns it (absolute). OSError if it cannot."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    missing = []
    level = path
    while not os.path.isdir(level):
        missing.append(level)
        parent = os.path.dirname(level)
        if parent == level:
            break
        level = parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            if not os.path.isdir(folder):
                raise
    return path
