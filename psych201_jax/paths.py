"""One normalisation of user-given paths, applied where a path enters the package (results store, locks,
sweep roots, command-line paths) before any store, tensorstore or lock sees it.

tensorstore refuses file paths holding ``..`` ("Invalid file path"), and a path that means one folder in
one place and another elsewhere (relative to a changed working directory) must never reach a store.
"""

from __future__ import annotations

import os

__all__ = ["normalize"]


def normalize(path: str | os.PathLike[str]) -> str:
    """``path`` absolute, with ``~`` expanded and no ``.`` or ``..`` component (an empty path stays empty).

    Symlinks are kept, except those that a ``..`` climbs out of: the folder before the last ``..`` is
    resolved, so ``link/..`` means what the OS makes of it (the parent of the link's target), not the
    folder holding the link.
    """
    text = os.fspath(path)
    if not text:
        return text
    text = os.path.expanduser(text)
    if not os.path.isabs(text):
        text = os.path.join(os.getcwd(), text)
    parts = text.split(os.sep)
    if ".." not in parts:
        return os.path.normpath(text)
    last = len(parts) - 1 - parts[::-1].index("..")
    head = os.path.realpath(os.sep.join(parts[: last + 1]) or os.sep)
    return os.path.normpath(os.path.join(head, *parts[last + 1 :]))
