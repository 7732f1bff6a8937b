"""Sweeps: the paper's model set, command emission, and the tiny sweep end to end (+ its report)."""

import json
import os
import subprocess
import sys

from configs.sweeps import psych201_paper
from psych201_jax.runs import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unsupported_architecture_is_skipped_with_its_reason():
    cfg = psych201_paper.get_config()
    cfg.models = [dict(cfg.models[0], arch="qwen3_5_moe")]
    jobs = sweep.expand(cfg)
    assert jobs and all("architecture 'qwen3_5_moe' is not supported" in j.skip_reason for j in jobs)


def test_paper_sweep_lists_the_study_models_and_pairs():
    cfg = psych201_paper.get_config()
    models = cfg.models
    assert len(models) == 101 and len({m["hf_id"] for m in models}) == 101
    assert sum(bool(m["base_hf_id"]) for m in models) == 65
    assert sum(m["chat"] for m in models) == 36 and sum(m["persona"] for m in models) == 86
    ids = {m["hf_id"] for m in models}
    assert all(m["base_hf_id"] in ids for m in models if m["base_hf_id"])
    jobs = sweep.expand(cfg)
    plain = [j for j in jobs if j.condition["name"] == "plain"]
    assert len(plain) == 101
    # Every architecture of the study's 101 models is supported: no job of any condition is skipped.
    assert not [j for j in jobs if j.skip_reason]
    vl = {m["hf_id"] for m in models if m["arch"] in ("qwen2_5_vl", "qwen3_vl", "mllama")}
    assert len(vl) == 14  # scored as their language model
    assert len({m["hf_id"] for m in models if m["arch"] == "qwen3_5"}) == 9
    qwen3 = next(j for j in plain if j.model_info["hf_id"] == "Qwen/Qwen3-8B")
    args = qwen3.score_args(cfg.data, {"dtype": "bfloat16"})
    assert "--config.model=/models/Qwen/Qwen3-8B" in args and "--config.model_info.kind=Reasoning" in args
    assert "--config.model_info.base_hf_id=Qwen/Qwen3-8B-Base" in args and "--config.dtype=bfloat16" in args
    assert "--config.options=none" in args
    accuracy = next(j for j in jobs if j.condition["name"] == "accuracy")
    assert "--config.options=study" in accuracy.score_args(cfg.data, {})
    assert any(
        a.startswith("--config.data=hf:marcelbinz/Psych-201-discrete-test") for a in accuracy.score_args(cfg.data, {})
    )


def test_emitted_commands():
    cfg = psych201_paper.get_config()
    jobs = [j for j in sweep.expand(cfg) if j.condition["name"] == "plain"][:3]
    tpu = sweep.emit_commands(jobs, cfg.data, {}, "tpu")
    assert tpu.count("gcloud compute tpus tpu-vm ssh") == 3 and "--worker=all" in tpu
    slurm = sweep.emit_commands(jobs, cfg.data, {}, "slurm")
    assert "#SBATCH --array=0-2" in slurm and "srun .venv/bin/psych201-score" in slurm


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=1800)


def test_tiny_sweep_end_to_end_with_a_failing_job_and_report(tmp_path):
    config = tmp_path / "tiny_with_broken.py"
    config.write_text(
        "from configs.sweeps import tiny\n"
        "def get_config():\n"
        "    c = tiny.get_config()\n"
        f"    c.out_root = {str(tmp_path / 'sweep')!r}\n"
        "    c.models = list(c.models) + [dict(hf_id='broken/model', path='/nonexistent/model', family='X',\n"
        "        generation='x', size_b=1.0, kind='base', base_hf_id='', arch='qwen3', chat=False, persona=False)]\n"
        "    c.conditions = [c for c in c.conditions if c['name'] in ('plain', 'chat', 'persona',\n"
        "                    'persona_shuffled', 'persona_subset_none')]\n"
        "    return c\n"
    )
    proc = _run("launch.sweep", f"--config={config}")
    assert proc.returncode == 1, proc.stderr[-3000:]  # the broken job failed: the sweep says so
    outcomes = json.loads((tmp_path / "sweep" / "sweep_outcomes.json").read_text())
    status = {o["job"]: o["status"] for o in outcomes}
    assert status.pop("broken--model/plain") == "failed"
    assert len(status) == 2 + 1 + 2 + 2 + 2 and set(status.values()) == {"done"}
    assert "1 failed" in proc.stdout

    again = _run("launch.sweep", f"--config={config}")
    assert again.returncode == 1, again.stderr[-3000:]
    outcomes = json.loads((tmp_path / "sweep" / "sweep_outcomes.json").read_text())
    assert all(o["detail"] == "already complete" for o in outcomes if o["status"] == "done")

    report = tmp_path / "report"
    analyzed = _run("launch.analyze", f"--results={tmp_path / 'sweep'}", f"--out={report}", "--bootstrap=200")
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    pngs = sorted(p for p in os.listdir(report) if p.endswith(".png"))
    assert {"fig_nll_by_size.png", "fig_persona.png"} <= set(pngs)
    text = (report / "report.md").read_text()
    assert "psych201_jax/tiny-qwen3-post" in text
