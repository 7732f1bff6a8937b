"""psych201-audit end to end on real studies: table, CSV and rejection list; and the audit of every
condition counts exactly what the scoring job of that condition stores."""

import collections
import csv
import json
import os
import subprocess
import sys

import pytest

from psych201_jax import defaults
from psych201_jax.runs import audit as audit_lib
from psych201_jax.runs import job as job_lib
from psych201_jax.runs import store
from psych201_jax.runs.config import ScoreJob
from psych201_jax.types import SPAN_COUNTERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_audit(tmp_path, data, tokenizer, *extra):
    out = tmp_path / "audit.csv"
    flags = [f"--config.data={data}", f"--config.model={tokenizer}", f"--out={out}", *extra]
    proc = subprocess.run(
        [sys.executable, "-m", "psych201_jax.cli.audit", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    with open(out) as fh:
        rows = {r["study"]: r for r in csv.DictReader(fh)}
    with open(tmp_path / "audit_rejected.csv") as fh:
        rejected = list(csv.DictReader(fh))
    return proc.stdout, rows, rejected


def _readme_counts(data_root):
    """{study: (participants, responses)} from the data README's per-study table."""
    counts = {}
    with open(os.path.join(data_root, "README.md")) as fh:
        for line in fh:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 3 and cells[1].isdigit() and not cells[0].startswith("**"):
                counts[cells[0]] = (int(cells[1]), int(cells[2]))
    return counts


def test_audit_reference_and_robust(tmp_path, data_root, qwen_tokenizer_dir):
    data = f"{data_root}/thoma2025riskychoice,{data_root}/xu2023augmenting"
    counts = _readme_counts(data_root)
    (thoma_n, thoma_r), (xu_n, xu_r) = counts["thoma2025riskychoice"], counts["xu2023augmenting"]
    stdout, ref, rejected = _run_audit(tmp_path, data, qwen_tokenizer_dir, "--config.protocol=reference")
    assert "thoma2025riskychoice" in stdout and "TOTAL" in stdout and not rejected
    assert int(ref["TOTAL"]["participants"]) == thoma_n + xu_n  # 301 + 79 in the full corpus
    assert int(ref["TOTAL"]["responses_text"]) == thoma_r + xu_r  # 2709 + 13496 in the full corpus
    assert int(ref["xu2023augmenting"]["lost_truncation"]) > 0  # transcripts over 32,768 characters
    assert int(ref["thoma2025riskychoice"]["runaway"]) > 0  # this tokenizer merges '>>.\n'
    _, rob, _ = _run_audit(tmp_path, data, qwen_tokenizer_dir, "--config.protocol=robust", "--config.max_tokens=100000")
    assert rob["TOTAL"]["responses_scored"] == rob["TOTAL"]["responses_text"]
    assert int(rob["TOTAL"]["runaway"]) == int(rob["TOTAL"]["merged"]) == 0


def test_audit_lists_rejections_and_persona_exclusions(tmp_path, data_root, qwen_tokenizer_dir):
    study = tmp_path / "data" / "mixed"
    study.mkdir(parents=True)
    lines = [
        {"text": "You pick <<A>>.", "experiment": "e", "participant": 1, "age": 30},
        {"text": "You pick <<B>>.", "experiment": "e", "participant": 2},
        {"text": "no marker", "experiment": "e", "participant": 3},
    ]
    (study / "prompts.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    _, rows, rejected = _run_audit(tmp_path, study, qwen_tokenizer_dir, "--config.persona=matched")
    assert rows["mixed"]["participants"] == "3" and rows["mixed"]["rejected"] == "2"
    reasons = {r["participant"]: r["reason"] for r in rejected}
    assert "no response marker" in reasons["3"] and "no metadata" in reasons["2"]
    assert all(r["study"] == "mixed" and r["line"] for r in rejected)


# Conditions whose span stage differs: the cut, the robust budget (made to bind), chat, the three personas,
# the persona subset and a persona under robust.
AUDITED = {
    "reference": {},
    "robust_budget": {"protocol": "robust", "persona_reserve": 30000},
    "chat": {"template": "chat", "model": defaults.DEFAULT_POST_MODEL},
    "persona": {"persona": "matched"},
    "persona_shuffled": {"persona": "shuffled", "seed": 3},
    "persona_subset": {"persona_subset": True},
    "robust_persona": {"protocol": "robust", "persona": "matched", "max_tokens": 1500},
}
AUDITED_STUDIES = ("xu2023augmenting", "thoma2025riskychoice", "alsobay2025publicGoodsGame")


def _stored_counts(out: str) -> dict:
    """Per study: participants, rejected and the span counters summed over the job's stored rows."""
    counts: dict = collections.defaultdict(collections.Counter)
    for row in store.iter_rows(out):
        c = counts[row["study"]]
        c["participants"] += 1
        if row["status"] == "rejected":
            c["rejected"] += 1
            continue
        c.update({k: row[k] for k in SPAN_COUNTERS})
        c["tokens"] += row["tokens"]
    return {study: dict(c) for study, c in counts.items()}


@pytest.fixture(scope="module")
def loaded_models():
    """Each model restored once for every condition (as a sweep worker does)."""
    cache: dict = {}

    def get(job: ScoreJob):
        if job.load_key() not in cache:
            cache[job.load_key()] = job_lib.load(job)
        return cache[job.load_key()]

    return get


@pytest.mark.parametrize("name", list(AUDITED))
def test_audit_counts_what_the_job_stores(tmp_path, data_root, loaded_models, name):
    data = ",".join(os.path.join(data_root, s) for s in AUDITED_STUDIES)
    job = ScoreJob().with_overrides(
        {"out": str(tmp_path / "out"), "data": data, "log_every_s": 1e9, "temperatures": "none", **AUDITED[name]}
    )
    job_lib.run_conditions(loaded_models(job), [job])
    rows, rejected, _ = audit_lib.audit_job(job)
    audited = {
        a.study: {k: v for k, v in {**a.row(), "tokens": a.tokens}.items() if k not in ("study", "tokens_per_s")}
        for a in rows
    }
    stored = _stored_counts(job.out)
    for counts in stored.values():  # a study without rejections or scored rows stores no such count
        for k in ("rejected", *SPAN_COUNTERS, "tokens"):
            counts.setdefault(k, 0)
    assert audited == stored
    assert sum(a.rejected for a in rows) == len(rejected)
