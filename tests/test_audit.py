"""launch.audit end to end on real studies: table, CSV and rejection list."""

import csv
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_audit(tmp_path, data, tokenizer, *extra):
    out = tmp_path / "audit.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.audit", f"--data={data}", f"--tokenizer={tokenizer}", f"--out={out}", *extra],
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
    stdout, ref, rejected = _run_audit(tmp_path, data, qwen_tokenizer_dir, "--protocol=reference")
    assert "thoma2025riskychoice" in stdout and "TOTAL" in stdout and not rejected
    assert int(ref["TOTAL"]["participants"]) == thoma_n + xu_n  # 301 + 79 in the full corpus
    assert int(ref["TOTAL"]["responses_text"]) == thoma_r + xu_r  # 2709 + 13496 in the full corpus
    assert int(ref["xu2023augmenting"]["lost_truncation"]) > 0  # transcripts over 32,768 characters
    assert int(ref["thoma2025riskychoice"]["runaway"]) > 0  # this tokenizer merges '>>.\n'
    _, rob, _ = _run_audit(tmp_path, data, qwen_tokenizer_dir, "--protocol=robust", "--max_tokens=100000")
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
    _, rows, rejected = _run_audit(tmp_path, study, qwen_tokenizer_dir, "--persona=matched")
    assert rows["mixed"]["participants"] == "3" and rows["mixed"]["rejected"] == "2"
    reasons = {r["participant"]: r["reason"] for r in rejected}
    assert "no response marker" in reasons["3"] and "no metadata" in reasons["2"]
    assert all(r["study"] == "mixed" and r["line"] for r in rejected)
