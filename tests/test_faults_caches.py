"""Caches, the native kernel build and the converter under faults (issue 28, probe 2026-12-06): nothing is
trusted as it is found, and every refusal is one error line.

1. the kernel cache: a truncated library is rebuilt, not loaded (N34); one that never loads leaves "xla"; the
   compiler dies with its job (N38b); a ``$CXX`` naming a missing program is named (N37); folders are 0700;
2. a tokenizer snapshot (N33) or a converted-model cache entry (N93) whose content does not match its key;
3. safetensors headers checked fully (N59, N60, N58);
4. FAIL-TB cases: missing tokenizer dir (U01), missing shard (N58), disk full during conversion (N62, N63),
   a refused unpickling (C16), a cache or lock that cannot be created (C26, N40b).
"""

import json
import os
import platform
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from psych201_jax import defaults
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.errors import UserError
from psych201_jax.model import checkpoint, cpu_kernel
from psych201_jax.model import hf_weights as weights
from psych201_jax.runs import model_cache
from psych201_jax.testing.safetensors import write_safetensors
from psych201_jax.testing.tiny_models import make_tiny_hf_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


needs_compiler = pytest.mark.skipif(not cpu_kernel.has_compiler(), reason="no C++ compiler on this machine")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ----------------------------------------------------------------------------------------- 1. kernel cache


@needs_compiler
def test_a_truncated_cached_kernel_is_rebuilt_not_loaded(monkeypatch, tmp_path):
    """N34: a cached library cut to 4 KiB (a bus error when loaded) is checked in a child process, removed
    and built again; the cache folders are created 0700."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    lib = cpu_kernel._build()
    size = lib.stat().st_size
    with open(lib, "r+b") as fh:
        fh.truncate(4096)
    assert cpu_kernel._build() == lib
    assert lib.stat().st_size == size and cpu_kernel._check(lib) == ""
    assert [p.name for p in lib.parent.iterdir()] == [lib.name]  # no partial library left
    assert _mode(tmp_path / "xdg") == _mode(tmp_path / "xdg" / "psych201_jax") == _mode(lib.parent) == 0o700


@needs_compiler
def test_a_kernel_that_never_loads_leaves_xla_with_the_reason(monkeypatch, tmp_path):
    """Built once more, still failing its check: no library is put in place and the job gets a reason (its
    warning) and runs "xla"."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_check", lambda lib: "its smoke call answered 'nothing'")
    with pytest.raises(RuntimeError, match="does not load .*smoke call"):
        cpu_kernel._build()
    assert "does not load" in cpu_kernel._registration.__wrapped__()
    assert not list(tmp_path.rglob("*.so"))


def test_a_cxx_naming_a_missing_program_is_named_not_replaced(monkeypatch, tmp_path):
    """N37: $CXX=/nonexistent/g++ was silently replaced by g++ from PATH; now the build fails naming it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "/nonexistent/g++ -O2")
    with pytest.raises(
        RuntimeError, match="\\$CXX='/nonexistent/g\\+\\+ -O2': '/nonexistent/g\\+\\+' is no executable program\\)"
    ):
        cpu_kernel._build()
    assert not list(tmp_path.rglob("*.so"))


@pytest.mark.skipif(platform.system() != "Linux", reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("kill", ["SIGKILL to the job", "SIGINT to its process group"])
def test_a_hung_compiler_dies_with_its_job(tmp_path, kill):
    """N38b: kill -9 of the job, or Ctrl-C (SIGINT to the terminal's process group), while its compiler hangs
    leaves no compiler running."""
    pid_file = tmp_path / "compiler.pid"
    hang = tmp_path / "hangcxx.sh"
    hang.write_text(
        f'#!/bin/sh\ncase "$1" in --version) echo hang 1.0; exit 0;; esac\necho $$ > {pid_file}\nexec sleep 300\n'
    )
    hang.chmod(0o755)
    env = dict(os.environ, CXX=str(hang), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    job = subprocess.Popen(
        [sys.executable, "-c", "from psych201_jax.model import cpu_kernel; cpu_kernel._build()"],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    compiler = None
    try:
        deadline = time.time() + 120
        while compiler is None and time.time() < deadline and job.poll() is None:
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            compiler = int(text) if text else None
            time.sleep(0.05)
        assert compiler is not None, "the compiler never started"
        time.sleep(0.2)
        if kill.startswith("SIGKILL"):
            job.kill()
        else:
            os.killpg(job.pid, signal.SIGINT)
        job.wait(timeout=60)
        deadline = time.time() + 10
        while _alive(compiler) and time.time() < deadline:
            time.sleep(0.05)
        assert not _alive(compiler), "the hung compiler outlived its job"
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        if compiler is not None and _alive(compiler):
            os.kill(compiler, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a non-reaping init counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# ------------------------------------------------------------------ 2. caches checked against their keys


def test_a_tampered_tokenizer_snapshot_is_rebuilt_with_a_warning(tmp_path, qwen_tokenizer_dir, caplog):
    """N33: a well-formed snapshot whose marker ids were edited (the scores went 7.3 -> 106.8 without a word)
    no longer matches its recorded sha256: a warning names it and it is rebuilt through transformers."""
    snaps = tmp_path / "cache" / "tokenizers"
    first = TokenizerInfo(qwen_tokenizer_dir, snapshot_dir=str(snaps))
    assert _mode(tmp_path / "cache") == _mode(snaps) == 0o700
    (path,) = snaps.iterdir()
    facts = json.loads(path.read_text())
    facts["base_l_id"] = facts["base_r_id"]
    path.write_text(json.dumps(facts))
    with caplog.at_level("WARNING"):
        again = TokenizerInfo(qwen_tokenizer_dir, snapshot_dir=str(snaps))
    assert again._hf is not None and again.base_l_id == first.base_l_id != again.base_r_id
    assert str(path) in caplog.text and "does not match its sha256" in caplog.text
    assert TokenizerInfo(qwen_tokenizer_dir, snapshot_dir=str(snaps))._hf is None  # the rebuilt one is used


def _tiny_hf(root, seed, **overrides):
    return make_tiny_hf_checkpoint(
        "qwen3", str(root / "hf"), defaults.DEFAULT_TOKENIZER, seed=seed, vocab_size=2048, **overrides
    )


def test_a_converted_cache_entry_from_another_model_is_refused(tmp_path):
    """N93: another model's conversion planted at this HF directory's cache key was used (another model's
    scores, rc 0); now it is refused with one line naming the entry, and the true entry is still used."""
    cache = tmp_path / "cache"
    mine = _tiny_hf(tmp_path / "a", seed=0)
    other = _tiny_hf(tmp_path / "b", seed=1, num_hidden_layers=3)
    planted = model_cache.resolve_model(other, str(cache), "float32")
    assert _mode(cache) == 0o700
    target = os.path.join(cache, f"hf-{model_cache._dir_key(mine, 'float32')}")
    shutil.copytree(planted, target)
    with pytest.raises(model_cache.ModelCacheError, match=f"{target} does not match {mine}: it was made from"):
        model_cache.resolve_model(mine, str(cache), "float32")
    assert model_cache.resolve_model(other, str(cache), "float32") == planted  # a true entry passes
    assert checkpoint.source_mismatch(planted, other, "bfloat16") == "it holds 'float32' parameters, not 'bfloat16'"


# ------------------------------------------------------------------------ 3. safetensors headers, fully


def _raw_safetensors(path, header: dict, data: bytes) -> str:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


@pytest.mark.parametrize(
    "entry,message",
    [
        # N59: 4096 float32 values in the file, a header shape of 8192 x 64
        ({"dtype": "F32", "shape": [8192, 64], "data_offsets": [0, 16384]}, "needs 2,097,152 bytes, .* give 16,384"),
        (7, "header entry is a int, not an object"),  # N60
        ({"dtype": "F32", "shape": [4096]}, "lacks data_offsets"),  # N60
        ({"dtype": "F32", "shape": [4096], "data_offsets": [0]}, "is not a pair of integers"),
        ({"dtype": "F32", "shape": [4096], "data_offsets": ["0", 16384]}, "is not a pair of integers"),
        ({"dtype": "F32", "shape": "4096", "data_offsets": [0, 16384]}, "not a list of non-negative integers"),
        ({"dtype": "F32", "shape": [-1, -4096], "data_offsets": [0, 16384]}, "not a list of non-negative integers"),
        ({"dtype": ["F32"], "shape": [4096], "data_offsets": [0, 16384]}, "unsupported dtype"),
    ],
)
def test_a_malformed_safetensors_header_is_one_error_naming_file_and_tensor(tmp_path, entry, message):
    path = _raw_safetensors(tmp_path / "model.safetensors", {"lm_head.weight": entry}, bytes(16384))
    with pytest.raises(weights.WeightsError, match=f"{path}: tensor '?lm_head.weight'?.*{message}"):
        weights.read_safetensors_header(path)


def test_a_missing_shard_is_one_error_naming_it(tmp_path):
    """N58: an index whose shard is missing gave a raw FileNotFoundError."""
    write_safetensors(str(tmp_path / "a.safetensors"), {"x": np.ones(3, np.float32)})
    index = {"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}
    (tmp_path / weights.INDEX).write_text(json.dumps(index))
    with pytest.raises(weights.WeightsError, match=f"{tmp_path / 'b.safetensors'}: weights file listed in .* missing"):
        weights.open_weights(str(tmp_path))


# --------------------------------------------------------------------- 4. refusals as one error line


def _cli(name, *args):
    return subprocess.run(
        [sys.executable, "-m", f"psych201_jax.cli.{name}", *args], capture_output=True, text=True, cwd=REPO, timeout=600
    )


def _one_error_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[-1], lines[-1]


def test_refusals_of_the_probe_are_one_error_line(tmp_path):
    """N58: psych201-convert with a missing shard printed a raw FileNotFoundError traceback (rc 1). U01: a
    missing tokenizer directory was a FileNotFoundError, not a user error (psych201-audit now checks its
    --config.model first; TokenizerInfo is read by every command)."""
    with pytest.raises(UserError, match=f"tokenizer directory '{tmp_path / 'nope'}' does not exist"):
        TokenizerInfo(str(tmp_path / "nope"))
    hf = tmp_path / "sharded"
    make_tiny_hf_checkpoint("qwen3", str(hf), defaults.DEFAULT_TOKENIZER, vocab_size=2048, max_shard_size="100KB")
    shard = sorted(hf.glob("*.safetensors"))[1]
    shard.unlink()
    _one_error_line(_cli("convert", f"--hf={hf}", f"--out={tmp_path / 'out'}"), str(shard), "missing")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_during_conversion_is_a_convert_error_and_leaves_nothing(tmp_path, monkeypatch):
    """N62/N63: tensorstore's RESOURCE_EXHAUSTED ValueError escaped as a traceback."""

    def full(params_dir, items, chunk_bytes=0):
        os.makedirs(params_dir)
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "lm_head/c/0/0" in OCDBT database: No space left on device')

    monkeypatch.setattr(checkpoint, "save_params", full)
    hf = _tiny_hf(tmp_path, seed=0)
    with pytest.raises(checkpoint.ConvertError, match="the disk is full; nothing was kept, free space and convert"):
        checkpoint.convert(hf, str(tmp_path / "out"), "float32")
    with pytest.raises(checkpoint.ConvertError, match="the disk is full"):  # the cache's conversion (N63)
        model_cache.resolve_model(hf, str(tmp_path / "cache"), "float32")
    assert sorted(os.listdir(tmp_path)) == ["cache", "hf", "out.lock"]
    assert [p for p in os.listdir(tmp_path / "cache") if not p.endswith(".lock")] == []


def test_a_cache_or_lock_that_cannot_be_created_is_a_user_error(tmp_path, monkeypatch):
    """C26/N40b: a read-only cache folder gave a raw OSError from creating it or its lock."""
    (tmp_path / "file").write_text("")
    hf = _tiny_hf(tmp_path, seed=0)
    with pytest.raises(model_cache.ModelCacheError, match="cannot create the conversion cache .*file"):
        model_cache.resolve_model(hf, str(tmp_path / "file" / "cache"), "float32")

    def read_only(self):
        raise OSError(30, "Read-only file system", self.path)

    monkeypatch.setattr(checkpoint.locks.FileLock, "__enter__", read_only)
    with pytest.raises(checkpoint.ConvertError, match="cannot create the lock file .*Read-only file system"):
        checkpoint.convert(hf, str(tmp_path / "out"), "float32")


def test_a_refused_unpickling_is_one_error_naming_the_folder(tmp_path):
    """C16: torch's weights_only refusal (a GLOBAL it blocks) escaped as a raw UnpicklingError."""
    torch = pytest.importorskip("torch")

    class Payload:
        def __reduce__(self):
            return (os.getpid, ())

    torch.save({"x": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(weights.WeightsError, match=f"{tmp_path}: its pickle .bin weights cannot be read safely"):
        weights.open_weights(str(tmp_path), allow_pickle=True)
    assert issubclass(weights.WeightsError, UserError)
