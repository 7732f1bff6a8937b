"""A quiet console: other packages' INFO logs off unless ``--verbosity`` asks, and one progress line."""

from __future__ import annotations

import logging as py_logging
import math
import os
import sys
import time
from typing import TextIO

from absl import logging

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _OwnInfoOnly(py_logging.Filter):
    """Keeps warnings and errors from anywhere, and lower levels only from this package."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or record.pathname.startswith(PACKAGE_DIR + os.sep)


_FILTER = _OwnInfoOnly()


def quiet_libraries(verbosity: int | None = None) -> None:
    """Drops INFO records of orbax, jax, flax and the like unless ``verbosity`` (default: absl's
    ``--verbosity``) is at least 1; this package's own INFO lines stay."""
    if verbosity is None:
        verbosity = logging.get_verbosity()
    handler = logging.get_absl_handler()
    handler.removeFilter(_FILTER)
    if verbosity < 1:
        handler.addFilter(_FILTER)


class ProgressLine:
    """One progress line (participants, tokens/s, ETA): rewritten in place on a terminal, logged every
    ``every_s`` seconds otherwise."""

    def __init__(self, total: int | None, *, every_s: float = 10.0, stream: TextIO | None = None):
        self.total = total
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._last = -math.inf
        self._shown = False

    @staticmethod
    def format(done: int, total: int | None, tokens_per_s: float, eta_s: float, rates: str = "") -> str:
        eta = f"{eta_s:.0f}s" if math.isfinite(eta_s) else "?"
        rates = rates or f"{tokens_per_s:,.0f} tokens/s"
        return f"{done}/{total if total else '?'} participants, {rates}, ETA {eta}"

    def update(self, done: int, tokens_per_s: float, eta_s: float, *, rates: str = "") -> None:
        """Shows the line (``rates``: instead of the tokens/s part, e.g. a simulation's branches/s)."""
        now = time.perf_counter()
        final = self.total is not None and done >= self.total
        if not final and now - self._last < (0.5 if self.tty else self.every_s):
            return
        self._last = now
        line = self.format(done, self.total, tokens_per_s, eta_s, rates)
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
            self._shown = True
        else:
            logging.info("%s", line)

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False
