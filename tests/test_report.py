"""Results discovery, tables, figures and report.md (psych201_jax.analysis), and psych201_jax.cli.analyze end to end."""

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from psych201_jax.analysis import report, runs, tables
from psych201_jax.testing.results import load, tokens, write_results

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The figures drawn for the synthetic sweep below. Its made-up model ids are in none of the study's scripts'
# lists, so the paper's fig3a, fig4 and fig5 (PAPER_ONLY) are skipped and their broader variants drawn
# (tests/test_paper_definitions.py covers the paper's selections with real ids).
FIGURES = [
    "fig_nll_by_size.png",
    "fig_misalignment_by_generation_all_pairs.png",
    "fig_domains_all_pairs.png",
    "fig_persona_all_models.png",
    "fig_accuracy.png",
    "fig_pair_ci.png",
]
PAPER_ONLY = ["fig_misalignment_by_generation.png", "fig_domains.png", "fig_persona.png"]
CSVS = [
    "model_scores.csv",
    "study_scores.csv",
    "pair_misalignment.csv",
    "pair_paired_stats.csv",
    "domains.csv",
    "domains_all_pairs.csv",
    "domains_extended.csv",
    "persona.csv",
    "persona_all_models.csv",
    "persona_summary_all_models.csv",
    "generation_pairs.csv",
    "generations_all_pairs.csv",
    "pair_types_all_pairs.csv",
    "persona_summary.csv",
    "accuracy.csv",
    "pair_types.csv",
    "generations.csv",
]
# Real study names, so the bundled category CSV applies: Risky Choice, Psycholinguistics (two), Moral
# Judgment (dropped by the reference figure) and one study not in the CSV.
STUDIES = ["thoma2025riskychoice", "franke2024bayesian", "guenther2024substitutions", "awad2018moral", "not_in_csv"]


def synthetic_rows(rng, shift, n_participants=4, n_responses=5, option=False):
    rows = []
    for study in STUDIES:
        for p in range(n_participants):
            nll = (1.0 + shift + 0.5 * rng.random(n_responses)).round(3).tolist()
            target = rng.integers(0, 3, size=n_responses).tolist()
            argmax = [t if rng.random() < 0.7 - shift / 4 else 9 for t in target]
            rows.append((study, f"p{p}", nll, tokens(argmax, target, target if option else None)))
    return rows


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A tiny sweep: two generations × (base, post-trained), a Vision pair, and persona runs."""
    root = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(0)
    specs = [
        ("G1-1B-Base", "base", "", "G1", 1.0, 0.0),
        ("G1-1B", "Instruction-tuned", "G1-1B-Base", "G1", 1.0, 0.3),
        ("G1-4B-Base", "base", "", "G1", 4.0, -0.2),
        ("G1-4B", "Instruction-tuned", "G1-4B-Base", "G1", 4.0, 0.1),
        ("G2-2B-Base", "base", "", "G2", 2.0, -0.1),
        ("G2-2B", "Reasoning", "G2-2B-Base", "G2", 2.0, 0.4),
        ("G2-VL-2B", "Vision", "G2-2B-Base", "G2", 2.0, 0.2),
    ]
    for hf_id, kind, base, generation, size, shift in specs:
        write_results(
            str(root / hf_id),
            hf_id,
            synthetic_rows(rng, shift, option=kind == "base"),
            kind=kind,
            base_hf_id=base,
            generation=generation,
            size_b=size,
            family=generation,
        )
    for hf_id, kind in (("G1-1B-Base", "base"), ("G1-1B", "Instruction-tuned")):
        rows = [r for r in synthetic_rows(rng, -0.05) if r[1] != "p3"]  # fewer participants have metadata
        write_results(
            str(root / f"{hf_id}-persona"),
            hf_id,
            rows,
            kind=kind,
            generation="G1",
            size_b=1.0,
            family="G1",
            persona="matched",
            base_hf_id="G1-1B-Base" if kind != "base" else "",
        )
    return str(root)


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_find_results_dirs(sweep, tmp_path):
    dirs = runs.find_results_dirs([sweep])
    assert len(dirs) == 9
    pick = runs.find_results_dirs([f"{dirs[0]},{dirs[1]}", dirs[1]])
    assert pick == dirs[:2]
    with pytest.raises(ValueError):
        runs.find_results_dirs([str(tmp_path)])


def test_tables(sweep):
    loaded = [runs.load_run(d) for d in runs.find_results_dirs([sweep])]
    t = tables.build_tables(loaded, runs.load_categories(), n_boot=200, seed=0)
    assert t.primary.persona == "none" and t.primary.protocol == "reference"
    pairs = {(r["post"], r["persona"]): r for r in t.rows["pair_misalignment"]}
    assert set(pairs) == {
        ("G1-1B", "none"),
        ("G1-4B", "none"),
        ("G2-2B", "none"),
        ("G2-VL-2B", "none"),
        ("G1-1B", "matched"),
    }
    assert all(r["n_common_studies"] == 5 for r in pairs.values())
    assert all(r["d_pair"] > 0 for k, r in pairs.items() if k[1] == "none")  # post-trained runs are shifted up
    # The made-up ids are in none of the study's scripts' lists: the paper's tables are empty, the broader
    # (_all_pairs, _all_models) tables hold what the paper's tables held before they followed the scripts.
    for name in ("generations", "generation_pairs", "pair_types", "domains", "persona_summary"):
        assert t.rows[name] == [], name
    assert {(r["generation"], r["n_pairs"]) for r in t.rows["generations_all_pairs"] if r["persona"] == "none"} == {
        ("G1", 2),
        ("G2", 1),
    }  # the Vision pair is left out of generations
    types = {r["kind"]: r for r in t.rows["pair_types_all_pairs"] if r["persona"] == "none"}
    assert types["Instruction-tuned"]["n_pairs"] == 2
    assert types["Instruction-tuned"]["d_pair"] == pytest.approx(
        (pairs[("G1-1B", "none")]["d_pair"] + pairs[("G1-4B", "none")]["d_pair"]) / 2
    )
    ref_cols, ext_cols = t.domain_columns
    assert len(ref_cols) == 7 and "Moral Judgment" not in ref_cols and len(ext_cols) == 12
    avg = [r for r in t.rows["domains_all_pairs"] if r["post"] == "Average" and r["persona"] == "none"][0]
    assert avg["Risky Choice"] > 0 and math.isnan(avg["Reinforcement Learning"])
    ext = [r for r in t.rows["domains_extended"] if r["post"] == "G1-1B" and r["persona"] == "none"][0]
    assert not math.isnan(ext["Moral Judgment"]) and not math.isnan(ext["Other"])  # awad2018moral, not_in_csv
    per_study = {
        r["study"]: r["domain_d"]
        for r in t.rows["pair_paired_stats"]
        if r["post"] == "G1-1B" and r["persona"] == "none"
    }
    assert ext["Psycholinguistics"] == pytest.approx(
        (per_study["franke2024bayesian"] + per_study["guenther2024substitutions"]) / 2
    )
    persona = {(r["comparison"], r["model"]): r for r in t.rows["persona_summary_all_models"]}
    assert set(persona) == {("matched_vs_none", "G1-1B-Base"), ("matched_vs_none", "G1-1B")}
    assert persona[("matched_vs_none", "G1-1B")]["only_control"] == 5  # p3 of each study
    acc = {(r["model"], r["persona"]): r for r in t.rows["accuracy"]}
    assert not math.isnan(acc[("G1-1B-Base", "none")]["option_accuracy"])
    assert math.isnan(acc[("G1-1B", "none")]["option_accuracy"])
    assert acc[("G1-1B", "none")]["base_accuracy"] == acc[("G1-1B-Base", "none")]["accuracy"]


def test_launch_analyze_end_to_end(sweep, tmp_path):
    out = tmp_path / "report"
    dirs = runs.find_results_dirs([sweep])
    cmd = [
        sys.executable,
        "-m",
        "psych201_jax.cli.analyze",
        f"--results={sweep}",
        f"--out={out}",
        "--bootstrap=200",
        "--seed=1",
        "--ddof=reference",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in FIGURES + CSVS + ["report.md"]:
        assert (out / name).is_file(), name
    text = (out / "report.md").read_text()
    assert all(f"]({f})" in text for f in FIGURES)
    # No temperature grid: the two calibration figures are skipped, and the paper-only ones (no listed model).
    assert text.count("_Skipped:") == 2 + len(PAPER_ONLY) and text.count("no results with a temperature grid") == 1
    scores = read_csv(out / "model_scores.csv")
    assert len(scores) == 9 and {r["path"] for r in scores} == set(dirs)
    assert len(read_csv(out / "pair_paired_stats.csv")) == 5 * 5
    # the same results given as a comma list and positional dirs, ddof forced to 0
    out0 = tmp_path / "report0"
    cmd = [
        sys.executable,
        "-m",
        "psych201_jax.cli.analyze",
        f"--results={dirs[0]},{dirs[1]}",
        *dirs[2:],
        f"--out={out0}",
        "--bootstrap=50",
        "--ddof=0",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d1 = {r["post"] + r["persona"]: float(r["d_pair"]) for r in read_csv(out / "pair_misalignment.csv")}
    d0 = {r["post"] + r["persona"]: float(r["d_pair"]) for r in read_csv(out0 / "pair_misalignment.csv")}
    assert d1.keys() == d0.keys() and all(abs(d0[k]) > abs(d1[k]) for k in d1)  # ddof 0: smaller SDs


def test_report_degrades_without_pairs_or_persona(tmp_path):
    write_results(
        str(tmp_path / "runs" / "only"), "Solo", [("s1", "p1", [1.0, 2.0]), ("s2", "p1", [3.0])], size_b=float("nan")
    )
    out = tmp_path / "out"
    figures = report.generate([str(tmp_path / "runs")], str(out), n_boot=10)
    every = FIGURES + PAPER_ONLY
    assert all(figures[f] is not None for f in every)  # nothing to draw, each with its reason
    assert not any((out / f).exists() for f in every)
    text = (out / "report.md").read_text()
    assert text.count("_Skipped:") == len(every) + 2  # + the two calibration figures (no temperature grid)
    assert "| Solo |" in text
    for name in CSVS:
        assert (out / name).is_file(), name
    assert read_csv(out / "pair_misalignment.csv") == []


def test_unpaired_and_duplicate_runs_are_noted(tmp_path):
    loaded = [
        load(write_results(str(tmp_path / "a"), "A", [("s1", "p1", [1.0]), ("s2", "p1", [2.0])])),
        load(write_results(str(tmp_path / "b"), "A", [("s1", "p1", [1.0])])),
        load(write_results(str(tmp_path / "c"), "C", [("s1", "p1", [1.0])], kind="Math", base_hf_id="Z")),
    ]
    t = tables.build_tables(loaded, runs.load_categories(), n_boot=10)
    assert len(t.rows["model_scores"]) == 2
    assert any("same model and condition" in n for n in t.notes) and any("Z not scored" in n for n in t.notes)
    (row,) = t.rows["pair_misalignment"]
    assert math.isnan(row["d_pair"]) and "not scored" in row["reason"]
