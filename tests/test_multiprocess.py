"""The whole scoring job (psych201_jax.cli.score) as 2 processes on 127.0.0.1 (gloo) equals the 1-process job.

Each process has 2 CPU devices (4 global devices). Two meshes: data=2 x tensor=2 (each process packs and
writes its own share) and tensor=4 (rows replicated over both processes: one share, process 1 is a
replica that computes but does not write). Small chunks make several lockstep rounds with uneven
per-process batch counts.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from psych201_jax.runs import store as results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# attention=xla: "auto" would run the native kernel in the one-device job and "xla" on the two-process mesh.
JOB_FLAGS = (
    "--config.max_row_length=16384",
    "--config.tokens_per_batch=16384",
    "--config.chunk_tokens=6000",
    "--config.attention=xla",
)
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    env.pop("XLA_FLAGS", None)
    return env


def _score(out, *flags, devices=1):
    proc = subprocess.run(
        [sys.executable, "-m", "psych201_jax.cli.score", f"--config.out={out}", *JOB_FLAGS, *flags],
        cwd=REPO,
        env=_env(devices),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _score_two_processes(out, *flags):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "psych201_jax.cli.score",
                f"--config.out={out}",
                *JOB_FLAGS,
                *flags,
                f"--config.distributed.coordinator=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
            ],
            cwd=REPO,
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT_S))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    return outputs


def _rows(out) -> dict:
    rows = list(results.iter_rows(str(out)))
    keyed = {(r["study"], r["experiment"], r["participant"]): r for r in rows}
    assert len(keyed) == len(rows), "a participant was written more than once"
    return keyed


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "res"
    _score(out)
    rows = _rows(out)
    assert len(rows) == 15 and all(r["status"] == "scored" for r in rows.values())
    return rows


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh,writers",
    [
        (("--config.mesh.data=2", "--config.mesh.tensor=2"), {0, 1}),
        (("--config.mesh.data=1", "--config.mesh.tensor=4"), {0}),
    ],
)
def test_two_processes_equal_one_process(tmp_path, one_process, mesh, writers):
    out = tmp_path / "res"
    outputs = _score_two_processes(out, *mesh)
    assert "share 0/" in outputs[0][1]
    rows = _rows(out)
    assert rows.keys() == one_process.keys()  # every participant exactly once
    chunk_writers = {int(os.path.basename(d)[1:6]) for d in results.chunk_dirs(str(out))}
    assert chunk_writers == writers
    for key, ref in one_process.items():
        got = rows[key]
        assert got["status"] == "scored" and got["n_scored"] == ref["n_scored"], key
        a, b = results.nll_array(got), results.nll_array(ref)
        assert np.array_equal(np.isnan(a), np.isnan(b)), key
        n = np.maximum(np.asarray(ref["n_scored"]), 1)
        d = np.nan_to_num(np.abs(a - b))
        assert (d / n).max(initial=0) <= 1e-5 and (d / np.maximum(np.nan_to_num(np.abs(b)), 1)).max(initial=0) <= 1e-5
        assert got["argmax"] == ref["argmax"] and got["target"] == ref["target"], key


@pytest.mark.slow
def test_a_process_with_nothing_to_score_does_not_stall_the_others(tmp_path):
    """Round-robin gives process 1 only a malformed line: it has no batches while process 0 has one."""
    study = tmp_path / "data" / "tinystudy"
    study.mkdir(parents=True)
    good = '{"text": "You see A or B. You choose <<A>>. Again. You choose <<B>>.", "experiment": "e", "participant": 1}'
    (study / "prompts.jsonl").write_text(good + "\n{not json\n")
    out = tmp_path / "res"
    _score_two_processes(out, "--config.mesh.data=2", "--config.mesh.tensor=2", f"--config.data={study}")
    rows = list(results.iter_rows(str(out)))
    assert sorted(r["status"] for r in rows) == ["rejected", "scored"]
