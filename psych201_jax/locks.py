"""Exclusive OS file locks (flock) naming their holder, for results directories and conversions.

The OS releases a lock when its process dies, so a lock file left by a crashed job never blocks; the
holder line written into it (pid, host, time) only makes the refusal message useful. Needs a filesystem
with working flock (local disks, most cluster filesystems); on one without (some FUSE or network mounts)
the job stops with one error line (``LocksUnsupported``) rather than writing unguarded.

A lock file is opened without following links (``O_NOFOLLOW``) and must be a regular file: a symlink
planted where a lock goes (a shared results root) is refused, never truncated through. A folder the lock
has to create is made 0700; existing folders keep their modes. A lock that cannot be created (its folder
is a file, read-only, not writable) is one ``LockPathError`` line naming the path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import threading
import time
from typing import Any

from psych201_jax import paths
from psych201_jax.errors import UserError

_HELD: set[tuple[str, int]] = set()  # (lock file, thread) pairs this process holds


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is the line it wrote."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


class LocksUnsupported(UserError, OSError):
    """The filesystem refuses flock: two jobs could write the same directory, so nothing proceeds."""


class LockPathError(UserError, OSError):
    """The lock file cannot be created or opened: its folder is a file or read-only, or it is a link."""


def _open_lock_file(path: str) -> int:
    """A descriptor of ``path`` opened for writing, created if missing, without following a link; its
    folder is created (0700) when missing. Anything but a regular file is refused."""
    folder = os.path.dirname(path)
    try:
        if not os.path.isdir(folder):
            os.makedirs(folder, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as err:
        where = err.filename or path
        if err.errno == errno.ELOOP:
            why = "it is a symbolic link; a lock file is never followed (remove the link)"
        elif err.errno in (errno.EEXIST, errno.ENOTDIR):
            why = f"{where} is in the way and is not a directory"
        elif err.errno == errno.EISDIR:
            why = "it is a directory, not a lock file"
        else:
            why = f"{err.strerror or err} ({where})"
        raise LockPathError(f"cannot create the lock file {path}: {why}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockPathError(f"cannot use the lock file {path}: it is not a regular file")
    return fd


class FileLock:
    """``with FileLock(path):`` holds an exclusive flock on ``path`` (created with its folder).

    ``wait``: block until it is free; otherwise raise ``LockHeld`` at once. ``reentrant``: a thread that
    holds it may take it again (a caller holding it around a function that takes it too).
    """

    def __init__(self, path: str, *, wait: bool = False, reentrant: bool = False):
        self.path = paths.normalize(path)
        self.wait = wait
        self.reentrant = reentrant
        self._key = (self.path, threading.get_ident())
        self._fh: Any = None

    def __enter__(self) -> FileLock:
        if self.reentrant and self._key in _HELD:
            return self
        fh = os.fdopen(_open_lock_file(self.path), "r+")
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
