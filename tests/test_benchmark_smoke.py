"""benchmarks.benchmark --smoke: every shape and row of the scoring benchmark on tiny models, so the benchmark
never rots between the sessions that measure with it (a broken shape once went unnoticed for a stop)."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from psych201_jax.model import cpu_kernel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ("head", "body", "qwen3_0.6b", "body_job", "qwen3_5")
SPLIT = {"attention", "body_without_attention", "last_layer", "head", "host"}


# CI's time: four short studies of the vendored corpus (the corpus tokenizer, the packing row and the head
# shape read every study of --data), the longest of them as the long-transcript study.
STUDIES = (
    "franke2024bayesian",
    "guenther2022relational",
    "guenther2023associations_individual",
    "thoma2025riskychoice",
)


@pytest.mark.slow
def test_smoke_runs_every_shape_and_row(tmp_path):
    out, data = tmp_path / "bench.json", tmp_path / "data"
    data.mkdir()
    for study in STUDIES:
        shutil.copytree(os.path.join(REPO, "tests", "data", "psych201", study), data / study)  # walked: no links
    argv = [sys.executable, "-m", "benchmarks.benchmark", "--smoke", f"--data={data}", "--repeats=1"]
    argv += ["--long_participants=2", "--long_study=guenther2022relational", f"--shapes={','.join(SHAPES)}"]
    argv += [f"--out={out}"]
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
