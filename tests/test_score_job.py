"""psych201-score and psych201-export on the embedded default: output, resume, refusal of a changed config."""

import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args):
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    return proc


def _export(results_dir, path):
    proc = _run("psych201_jax.cli.export", f"--results={results_dir}", f"--out={path}")
    assert proc.returncode == 0, proc.stderr
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_default_job_scores_every_participant_and_resumes(tmp_path):
    out = tmp_path / "res"
    proc = _run("psych201_jax.cli.score", f"--config.out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model score" in proc.stdout and "15 scored, 0 unscored, 0 rejected" in proc.stdout
    rows = _export(out, tmp_path / "a.jsonl")
    assert len(rows) == 15 and all(r["status"] == "scored" for r in rows)
    assert all(len(r["nll"]) == r["n_markers"] for r in rows if r["study"] != "xu2023augmenting")
    xu = [r for r in rows if r["study"] == "xu2023augmenting"]
    assert any(len(r["nll"]) < r["n_markers"] for r in xu)  # the 32,768-character cut
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["determinants"]["protocol"] == "reference" and manifest["tokenizer"]["sha256"]

    # Same config again: nothing new is scored, results unchanged.
    again = _run("psych201_jax.cli.score", f"--config.out={out}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "15 already done" in again.stderr
    assert _export(out, tmp_path / "b.jsonl") == rows

    # A different configuration into the same directory is refused, then allowed with fresh=True.
    changed = _run("psych201_jax.cli.score", f"--config.out={out}", "--config.protocol=robust")
    assert changed.returncode != 0 and "different configuration" in changed.stderr
    assert "protocol" in changed.stderr
    fresh = _run("psych201_jax.cli.score", f"--config.out={out}", "--config.protocol=robust", "--config.fresh=True")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    robust = _export(out, tmp_path / "c.jsonl")
    assert len(robust) == 15 and all(len(r["nll"]) == r["n_markers"] for r in robust)


def test_relative_model_and_data_paths(tmp_path):
    """Paths relative to the working directory work (orbax itself takes only absolute ones)."""
    proc = _run(
        "psych201_jax.cli.score",
        f"--config.out={tmp_path / 'r'}",
        "--config.model=psych201_jax/assets/tiny-qwen3",
        "--config.data=psych201_jax/assets/sample",
        "--config.temperatures=none",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "15 scored, 0 unscored, 0 rejected" in proc.stdout


def test_bad_model_dir_is_a_clear_error(tmp_path):
    proc = _run("psych201_jax.cli.score", f"--config.out={tmp_path / 'r'}", f"--config.model={tmp_path}")
    assert proc.returncode != 0
    assert "neither a converted checkpoint" in proc.stderr


def test_a_model_without_model_info_is_labelled_by_its_own_identity(tmp_path):
    """Never the bundled default's: a converted checkpoint's recorded identity, else the name of the HF
    directory it was converted from; explicit model_info fields are kept."""
    from psych201_jax import defaults
    from psych201_jax.runs import job, store
    from psych201_jax.runs.config import ScoreJob

    data = os.path.join(defaults.SAMPLE_DATA, "thoma2025riskychoice")

    def info(model, **over):
        out = str(tmp_path / f"r{len(os.listdir(tmp_path))}")
        job.run(ScoreJob().with_overrides({"model": model, "data": data, "out": out, "log_every_s": 1e9, **over}))
        return store.read_manifest(out)["config"]["model_info"]

    post = info(defaults.DEFAULT_POST_MODEL)
    assert post["hf_id"] == "psych201_jax/tiny-qwen3-post" and post["kind"] == "Instruction-tuned"
    bare = tmp_path / "bare"
    shutil.copytree(defaults.DEFAULT_MODEL, bare)
    provenance = json.loads((bare / "provenance.json").read_text())
    del provenance["model_info"]
    (bare / "provenance.json").write_text(json.dumps(provenance))
    unnamed = info(str(bare))
    assert unnamed["hf_id"] == os.path.basename(provenance["source"]) != "psych201_jax/tiny-qwen3"
    assert unnamed["kind"] == "unknown"
    named = info(str(bare), **{"model_info.hf_id": "org/mine", "model_info.kind": "base"})
    assert (named["hf_id"], named["kind"]) == ("org/mine", "base")
    assert info(str(bare), **{"model_info.family": "F"})["family"] == "F"  # kept beside the derived id
