"""The native CPU attention kernel (``cpu_attention.cc``): built on first use, registered with the XLA FFI.

XLA:CPU runs each elementwise step of the blockwise backend's online softmax as a pass over memory; the kernel
keeps each score tile in cache instead (see the source's header). It is compiled once per source, jaxlib and
machine with the host's C++ compiler (``$CXX`` or ``c++``, ``-O3 -march=native``) into
``$XDG_CACHE_HOME/psych201_jax/kernels`` (default ``~/.cache``; folders created 0700) and loaded from there
afterwards. A library is built to a temporary name, loaded in a child process that makes a smoke call, and only
then renamed into place; every job checks the cached library in a child the same way before loading it, and one
that fails (truncated, foreign) is removed and built again, once. The compiler dies with the job (its own
process group, killed on any exit from the build; on Linux a parent-death signal for kill -9). Where no
compiler works, or ``$CXX`` names a missing program (never replaced by another compiler), ``available()`` is
False with the reason in ``unavailable_reason()``, and the ``auto`` attention backend uses ``xla`` (the job
warns); it does so too where the build has no AVX-512 (``preferred()``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging

from psych201_jax.data.cache_dirs import make_private_dirs

SOURCE = Path(__file__).with_name("cpu_attention.cc")
TARGET = "psych201_cpu_attention"
CAPPED_TARGET = "psych201_cpu_attention_capped"  # the same with the attention-logit soft cap attribute
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_LANES = 64  # the kernel's head-dim granularity; other head dims are zero-padded to it
# "auto" runs the kernel only where it is built for AVX-512 (16 floats per register): 220-285 GFLOP/s against the
# "xla" backend's 135-180 on a 2-core AVX-512 Xeon. Built for AVX2 (8) the same machine ran it at 115-125 and
# built for SSE4.2 (4) at 41-45: correct (backend "cpu" runs them; the tests ran on both), but not shown faster
# than XLA's own kernels, so "auto" keeps "xla" there.
AUTO_SIMD_WIDTH = 16


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "psych201_jax" / "kernels"


def _compiler() -> list[str] | None:
    """The compiler command: ``$CXX`` (which may carry arguments, "ccache g++"), else c++, g++ or clang++;
    None if there is none. Raises RuntimeError where ``$CXX`` is set but does not parse as a command line or
    names no program: the user asked for that compiler, so another one is never put in its place."""
    cxx_env = os.environ.get("CXX", "")
    try:
        cmd = shlex.split(cxx_env)
    except ValueError:  # an unbalanced quote
        raise RuntimeError(f"no C++ compiler found ($CXX={cxx_env!r} does not parse as a command line)") from None
    if cmd:
        if path := shutil.which(cmd[0]):
            return [path, *cmd[1:]]
        where = "" if os.sep in cmd[0] else " on PATH"
        raise RuntimeError(f"no C++ compiler found ($CXX={cxx_env!r}: {cmd[0]!r} is no executable program{where})")
    for name in ("c++", "g++", "clang++"):
        if path := shutil.which(name):
            return [path]
    return None


def has_compiler() -> bool:
    """Whether a C++ compiler is there to build the kernel (False where ``$CXX`` names none)."""
    try:
        return _compiler() is not None
    except RuntimeError:
        return False


def _host_isa() -> str:
    """What ``-march=native`` compiles for: the machine and, on Linux, the CPU's model and feature flags."""
    lines = []
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    except OSError:
        pass
    return platform.machine() + "".join(sorted(set(lines))) if lines else platform.machine() + platform.node()


_PARTIAL = "partial-"  # a library being written; one left by a killed build is removed after a day
_BUILD_TIMEOUT_S = 300  # a hung compiler must not hang the job: past this, the job runs "xla"
_CHECK_TIMEOUT_S = 60
_LINUX = platform.system() == "Linux"
# Run in a child process before this process loads a library: a truncated or foreign file at the cache path can
# crash the loader (a bus error) or lack the kernel; the child dies instead, and answers the kernel's SIMD width.
_CHECK = "import ctypes, sys; print(int(ctypes.CDLL(sys.argv[1]).Psych201CpuAttentionSimdWidth()))"


def _remove_stale_partials(directory: Path) -> None:
    for path in [*directory.glob(f"{_PARTIAL}*.so"), *directory.glob("tmp*.so")]:  # tmp*: builds of earlier releases
        with contextlib.suppress(OSError):  # another process may be removing it too
            if time.time() - path.stat().st_mtime > 86400:
                path.unlink()


# Linux: the child execs the command after asking for SIGKILL when the job dies (PR_SET_PDEATHSIG), so a kill -9
# of the job kills it too. A launcher rather than subprocess's preexec_fn, which forks a multithreaded process
# (JAX warns of deadlocks) where subprocess otherwise uses vfork.
_DIE_WITH_PARENT = (
    "import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9); "
    "os.getppid() == int(sys.argv[1]) or os._exit(1); os.execvp(sys.argv[2], sys.argv[2:])"
)


def _run(cmd: list[str], timeout: float, what: str = "") -> str:
    """Runs ``cmd`` (the compiler, or a library check) and returns its stdout; RuntimeError if it fails.

    The child dies with the job: it runs in its own process group, which is killed when the call ends in any
    way other than the child's own exit (a timeout, Ctrl-C's KeyboardInterrupt, any exception), so that a
    wrapper's compiler (ccache, env) dies too and cannot write the library after the build gave up; and on
    Linux it gets SIGKILL when the job itself dies (kill -9), through the parent-death signal. ``what``
    names the command in the error (default: the command line).
    """
    launch = [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid())] if _LINUX else []
    proc = subprocess.Popen(
        [*launch, *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.communicate()
        raise
    if proc.returncode:
        why = f"exit status {proc.returncode}" if proc.returncode > 0 else f"killed by {_signal_name(-proc.returncode)}"
        detail = f": {err.strip()[-500:]}" if err.strip() else ""
        raise RuntimeError(f"{what or ' '.join(cmd)} failed ({why}){detail}")
    return out


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _check(lib: Path | str) -> str:
    """Why the library at ``lib`` cannot be used (it crashes the loader, lacks the kernel, gives no answer), or
    "" where it loads in a child process and answers the kernel's SIMD width."""
    try:
        cmd = [sys.executable, "-I", "-S", "-c", _CHECK, str(lib)]
        answer = _run(cmd, _CHECK_TIMEOUT_S, what="loading it in a child process").strip()
    except (RuntimeError, OSError, subprocess.SubprocessError) as err:
        return " ".join(str(err).split())[-300:]
    return "" if answer in ("4", "8", "16") else f"its smoke call answered {answer[-80:]!r}"


def _discard(lib: Path, checked: os.stat_result) -> None:
    """Removes the library that failed its check, unless another job has replaced it since."""
    with contextlib.suppress(OSError):
        now = lib.stat()
        if (now.st_ino, now.st_dev, now.st_mtime_ns) == (checked.st_ino, checked.st_dev, checked.st_mtime_ns):
            lib.unlink()


def _build() -> Path:
    """The compiled library, checked: built (to a temporary name, checked in a child process, then renamed into
    place) if this source, jaxlib, compiler and machine have none yet. A cached library that fails its check
    is removed and built again, once; RuntimeError where no library passes (the job then runs "xla")."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX)")
    version = _run([*cxx, "--version"], 60)
    key = hashlib.sha256(
        b"\0".join(
            x.encode() if isinstance(x, str) else x
            for x in (
                SOURCE.read_bytes(),
                jax.ffi.include_dir(),
                jaxlib.__version__,
                " ".join(cxx),
                version,
                " ".join(FLAGS),
            )
        )
        + _host_isa().encode()  # -march=native: a shared home directory may span CPU generations
    ).hexdigest()[:16]
    lib = cache_dir() / f"cpu_attention-{key}.so"
    with contextlib.suppress(FileNotFoundError):
        checked = lib.stat()
        if not (why := _check(lib)):
            return lib
        logging.warning("the cached CPU attention kernel %s does not load (%s); building it again", lib, why)
        _discard(lib, checked)
    make_private_dirs(lib.parent)
    _remove_stale_partials(lib.parent)
    fd, tmp = tempfile.mkstemp(prefix=_PARTIAL, suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        _run([*cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp], _BUILD_TIMEOUT_S)
        if why := _check(tmp):
            raise RuntimeError(f"the kernel library built by {' '.join(cxx)} does not load ({why})")
        os.replace(tmp, lib)  # atomic: concurrent builders leave one complete library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


_SIMD_WIDTH = [0]


@functools.cache
def _registration() -> str:
    """The empty string once the kernel is registered with XLA:CPU, else why it is not."""
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.Psych201CpuAttention), platform="cpu")
        jax.ffi.register_ffi_target(CAPPED_TARGET, jax.ffi.pycapsule(lib.Psych201CpuAttentionCapped), platform="cpu")
        _SIMD_WIDTH[0] = lib.Psych201CpuAttentionSimdWidth()
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as err:
        return f"{type(err).__name__}: {err}"
    return ""


def available() -> bool:
    """Whether the kernel is built and registered (builds it on the first call)."""
    return not _registration()


def unavailable_reason() -> str:
    return _registration()


def simd_width() -> int:
    """Floats per SIMD register of the built kernel (16 with AVX-512, 8 with AVX2, 4 else); 0 if unavailable."""
    return _SIMD_WIDTH[0] if available() else 0


def preferred() -> bool:
    """Whether "auto" runs this kernel: it builds here, for AVX-512 (see AUTO_SIMD_WIDTH)."""
    return simd_width() >= AUTO_SIMD_WIDTH


def attend(q, k, v, lo, hi, *, scale: float | None = None, softcap: float | None = None):
    """Attention of queries q [B, C, Hq, hd] over keys k/v [B, N, Hk, hd], query (b, c) seeing the keys
    [lo[b, c], hi[b, c]] of its row (int32 [B, C]; none where lo > hi: its output is 0). ``attention.py``
    derives the ranges from the shared semantics. float32 inside, the output in q's dtype; ``scale`` of the
    scores (None: head_dim**-0.5); ``softcap``: the scaled scores through softcap * tanh(s / softcap) before
    the mask (None: no cap). Raises ValueError where the kernel cannot run."""
    if reason := _registration():
        raise ValueError(f"attention backend 'cpu' is unavailable: {reason}")
    if jax.default_backend() != "cpu":
        raise ValueError(f"attention backend 'cpu' runs only on CPU (this process runs on {jax.default_backend()})")
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:  # the kernel sees whole arrays; XLA would gather them to each device
        raise ValueError(
            f"attention backend 'cpu' runs on one device, not a {mesh.size}-device mesh; use 'xla' or 'auto'"
        )
    d = q.shape[-1]
    pad = -d % _LANES

    def prep(x):
        return jnp.pad(x.astype(jnp.float32), ((0, 0), (0, 0), (0, 0), (0, pad)))

    attrs = dict(scale=np.float32(d**-0.5 if scale is None else scale))
    if softcap is not None:
        attrs.update(softcap=np.float32(softcap))
    call = jax.ffi.ffi_call(
        TARGET if softcap is None else CAPPED_TARGET,
        jax.ShapeDtypeStruct(q.shape[:-1] + (d + pad,), jnp.float32),
        vmap_method="sequential",
    )
    out = call(prep(q), prep(k), prep(v), lo.astype(jnp.int32), hi.astype(jnp.int32), **attrs)
    return out[..., :d].astype(q.dtype)
