"""The native CPU attention kernel (``cpu_attention.cc``): built on first use, registered with the XLA FFI.

XLA:CPU runs each elementwise step of the blockwise backend's online softmax as a pass over memory; the kernel
keeps each score tile in cache instead (see the source's header). It is compiled once per source, jaxlib and
machine with the host's C++ compiler (``$CXX`` or ``c++``, ``-O3 -march=native``) into
``$XDG_CACHE_HOME/psych201_jax/kernels`` (default ``~/.cache``) and loaded from there afterwards. Where no
compiler works, ``available()`` is False with the reason in ``unavailable_reason()``, and the ``auto``
attention backend uses ``xla``; it does so too where the build has no AVX-512 (``preferred()``).
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
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

SOURCE = Path(__file__).with_name("cpu_attention.cc")
TARGET = "psych201_cpu_attention"
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
    None if there is none (or ``$CXX`` does not parse as a command line)."""
    try:
        cmd = shlex.split(os.environ.get("CXX", "")) or ["c++"]
    except ValueError:  # an unbalanced quote
        return None
    for name in (cmd[0], "g++", "clang++"):
        if path := shutil.which(name):
            return [path, *cmd[1:]] if name == cmd[0] else [path]
    return None


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


def _remove_stale_partials(directory: Path) -> None:
    for path in [*directory.glob(f"{_PARTIAL}*.so"), *directory.glob("tmp*.so")]:  # tmp*: builds of earlier releases
        with contextlib.suppress(OSError):  # another process may be removing it too
            if time.time() - path.stat().st_mtime > 86400:
                path.unlink()


def _run_compiler(cmd: list[str]) -> None:
    """Runs ``cmd`` in its own process group, so that on timeout a wrapper's compiler (ccache, env) dies too
    and cannot write the library after the build gave up."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=_BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.strip()[-500:]}")


def _build() -> Path:
    """The compiled library, building it if this source, jaxlib, compiler and machine have none yet."""
    cxx = _compiler()
    if cxx is None:
        cxx_env = os.environ.get("CXX")
        raise RuntimeError(
            f"no C++ compiler found ($CXX={cxx_env!r})" if cxx_env else "no C++ compiler found (set $CXX)"
        )
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
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
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(lib.parent)
    fd, tmp = tempfile.mkstemp(prefix=_PARTIAL, suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        _run_compiler([*cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp])
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


def attend(q, k, v, lo, hi):
    """Attention of queries q [B, C, Hq, hd] over keys k/v [B, N, Hk, hd], query (b, c) seeing the keys
    [lo[b, c], hi[b, c]] of its row (int32 [B, C]; none where lo > hi: its output is 0). ``attention.py``
    derives the ranges from the shared semantics. float32 inside, the output in q's dtype. Raises ValueError
    where the kernel cannot run."""
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

    call = jax.ffi.ffi_call(
        TARGET, jax.ShapeDtypeStruct(q.shape[:-1] + (d + pad,), jnp.float32), vmap_method="sequential"
    )
    out = call(prep(q), prep(k), prep(v), lo.astype(jnp.int32), hi.astype(jnp.int32), scale=np.float32(d**-0.5))
    return out[..., :d].astype(q.dtype)
