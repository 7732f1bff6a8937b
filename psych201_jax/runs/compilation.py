"""JAX compilation: the persistent cache every job and sweep worker shares, and the time spent compiling."""

import os

import jax
from absl import logging

from psych201_jax.data.cache_dirs import make_private_dirs

_SECONDS = [0.0]
_LISTENING = [False]


def _count(event: str, duration_secs: float, **_) -> None:
    if event.startswith("/jax/core/compile/") or event == "/jax/compilation_cache/cache_retrieval_time_sec":
        _SECONDS[0] += duration_secs


def count_compile_time() -> None:
    """Starts counting the seconds this process spends tracing, lowering and compiling (or loading cached)
    programs (idempotent; read with ``compile_seconds``)."""
    if not _LISTENING[0]:
        jax.monitoring.register_event_duration_secs_listener(_count)
        _LISTENING[0] = True


def compile_seconds() -> float:
    """Seconds counted since ``count_compile_time`` was first called."""
    return _SECONDS[0]


def enable_compile_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache in ``path`` ("" leaves it off): a rerun, a resumed job or
    another condition of the same model loads its compiled programs instead of compiling them again."""
    count_compile_time()
    if not path:
        return
    path = os.path.expanduser(path)
    try:
        make_private_dirs(path)  # 0700 where it creates them: other users must not plant compiled programs
    except OSError as err:
        logging.warning("compilation cache %s unusable (%s); compiling without it", path, err.strerror)
        return
    jax.config.update("jax_compilation_cache_dir", path)
    # The sub-second programs too: with a 0.5 s floor a warm-cache job still compiled its last layer and head
    # (0.3-0.4 s each) every time; the eager ops' millisecond compiles stay out.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
