"""benchmarks.benchmark --smoke: every shape and row of the scoring benchmark on tiny models, so the benchmark
never rots between the sessions that measure with it (a broken shape once went unnoticed for a stop)."""

import json
import math
import os
import subprocess
import sys

import pytest

from psych201_jax.model import cpu_kernel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ("head", "body", "qwen3_0.6b", "body_job", "qwen3_5")
SPLIT = {"attention", "body_without_attention", "last_layer", "head", "host"}


@pytest.mark.slow
def test_smoke_runs_every_shape_and_row(tmp_path):
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "benchmarks.benchmark", "--smoke", "--data=tests/data/psych201", "--repeats=1"]
    argv += ["--long_participants=2", f"--shapes={','.join(SHAPES)}", f"--out={out}"]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert set(report["shapes"]) == set(SHAPES)
    for name in ("head", "body", "qwen3_0.6b", "qwen3_5"):
        shape = report["shapes"][name]
        # ours against the batch-1 HF reference on the same float32 weights: the numbers agree
        assert shape["max_rel_delta_nll"] <= 1e-5, (name, shape)
        assert shape["tokens"] > 0 and shape["speedup"] > 0 and math.isfinite(shape["speedup_default_grid"])
        assert set(shape["time_split"]["fractions"]) == SPLIT, (name, shape)
    assert set(report["shapes"]["qwen3_5"]["compile_s_by_layers"]) == {"1", "2"}
    job = report["shapes"]["body_job"]
    assert job["speedup_no_grid"] > 0 and job["speedup_default"] > 0
    for row in ("one_segment", "packed_row"):
        assert report["attention_vs_sdpa"][row]["xla_over_sdpa"] > 0
        if cpu_kernel.available():  # the native kernel is timed where it builds (CI's machines)
            assert report["attention_vs_sdpa"][row]["cpu_over_sdpa"] > 0
    assert report["head_cost"]["grid_over_no_grid"] > 0
    assert 0.5 < report["packing"]["efficiency"] <= 1.0
