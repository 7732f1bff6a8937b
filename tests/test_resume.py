"""kill -9 at several points of a real scoring job, then resume: results identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from psych201_jax.runs import store as results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config.chunk_tokens=3000", "--config.tokens_per_batch=8192"]  # many small chunks


def _start(out):
    return subprocess.Popen(
        [sys.executable, "-m", "psych201_jax.cli.score", f"--config.out={out}", *ARGS],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _rows(out):
    return {(r["study"], r["experiment"], r["participant"]): r for r in results.iter_rows(out)}


def _kill_after(out, n_chunks, timeout=300):
    """Starts a job and SIGKILLs it once ``n_chunks`` chunks are committed (0: as soon as it starts)."""
    proc = _start(out)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(results.chunk_dirs(out)) >= n_chunks and (
            n_chunks or os.path.exists(os.path.join(out, "manifest.json"))
        ):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"job finished before it could be killed: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(results.chunk_dirs(out))


def test_kill_and_resume_gives_identical_results(tmp_path):
    reference = tmp_path / "uninterrupted"
    proc = _start(reference)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    expected = _rows(reference)
    assert len(expected) == 15 and len(results.chunk_dirs(reference)) >= 4

    for point in (0, 1, 3):
        out = tmp_path / f"killed_at_{point}"
        committed = _kill_after(out, point)
        partial = _rows(out)
        assert len(partial) <= 15 and len(results.chunk_dirs(out)) == committed
        resumed = _start(out)
        assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
        got = _rows(out)
        assert got.keys() == expected.keys(), point  # every participant exactly once
        n = sum(
            len(json.loads(line)) > 0
            for c in results.chunk_dirs(out)
            for line in open(os.path.join(c, "participants.jsonl"))
        )
        assert n == 15, "no participant duplicated across chunks"
        for key, row in expected.items():
            assert got[key]["status"] == row["status"]
            np.testing.assert_allclose(results.nll_array(got[key]), results.nll_array(row), rtol=0, atol=1e-5)
            assert got[key]["argmax"] == row["argmax"] and got[key]["target"] == row["target"]
        assert results.read_complete(out) is not None
