"""Exclusive OS file locks (flock) naming their holder, for results directories and conversions.

The OS releases a lock when its process dies, so a lock file left by a crashed job never blocks; the
holder line written into it (pid, host, time) only makes the refusal message useful. Needs a filesystem
with working flock (local disks, most cluster filesystems); on one without (some FUSE or network mounts)
the job stops with one error line (``LocksUnsupported``) rather than writing unguarded.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from typing import Any

from psych201_jax.errors import UserError

_HELD: set[tuple[str, int]] = set()  # (lock file, thread) pairs this process holds


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is the line it wrote."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


class LocksUnsupported(UserError, OSError):
    """The filesystem refuses flock: two jobs could write the same directory, so nothing proceeds."""


class FileLock:
    """``with FileLock(path):`` holds an exclusive flock on ``path`` (created with its folder).

    ``wait``: block until it is free; otherwise raise ``LockHeld`` at once. ``reentrant``: a thread that
    holds it may take it again (a caller holding it around a function that takes it too).
    """

    def __init__(self, path: str, *, wait: bool = False, reentrant: bool = False):
        self.path = os.path.abspath(path)
        self.wait = wait
        self.reentrant = reentrant
        self._key = (self.path, threading.get_ident())
        self._fh: Any = None

    def __enter__(self) -> FileLock:
        if self.reentrant and self._key in _HELD:
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown pid"
            fh.close()
            raise LockHeld(holder) from None
        except OSError as err:  # e.g. ENOLCK / EOPNOTSUPP on some FUSE or network mounts
            fh.close()
            raise LocksUnsupported(
                f"cannot lock {self.path}: its filesystem does not support file locks ({err.strerror or err}); "
                "put results and caches on a local or cluster filesystem with flock"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        _HELD.add(self._key)
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            _HELD.discard(self._key)
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
