"""Simulation results in the analysis (issue 30 item 4): loading (psych201_jax.analysis.simulated), behaviour.csv and
behaviour_pairs.csv, the behaviour figures and report.md's generated-behaviour section, on synthetic simulations of a
wide base model and a narrow post-trained one (psych201_jax.testing.simulations)."""

import csv
import math

import pytest

from psych201_jax.analysis import behaviour_figures, report, runs, simulated
from psych201_jax.testing.results import write_results
from psych201_jax.testing.simulations import (
    NARROW_STUDIES,
    Model,
    narrow_and_wide_studies,
    write_narrow_and_wide,
    write_simulation,
)

TYPES = {"letters": "category", "ratings": "ordinal", "amounts": "number", "sentences": "free_text"}
SECTION = "## Generated behaviour"
PNG = b"\x89PNG\r\n\x1a\n"


def read_csv(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A scoring run and the narrow / wide simulations in one tree, analysed once."""
    root = tmp_path_factory.mktemp("sims")
    base, post = write_narrow_and_wide(str(root / "runs" / "simulate"))
    write_results(str(root / "runs" / "score" / "Wide-1B-Base"), "Wide-1B-Base", [("s1", "p1", [1.0, 2.0])])
    out = root / "out"
    figures = report.generate([str(root / "runs")], str(out), n_boot=100)
    return base, post, out, figures


def test_loads_simulations_apart_from_scoring_runs(analysed, tmp_path):
    base_dir, post_dir, _, _ = analysed
    scoring = write_results(str(tmp_path / "score"), "S", [("s1", "p1", [1.0])])
    found = runs.find_results_dirs([str(tmp_path), base_dir, post_dir])
    assert runs.split_simulations(found) == ([scoring], [base_dir, post_dir])
    with pytest.raises(runs.NotScoringRunError):
        runs.load_run(base_dir)
    with pytest.raises(simulated.NotASimulationError):
        simulated.load_simulation(scoring)
    base = simulated.load_simulation(base_dir)
    assert (base.model, base.kind, base.complete, base.simulation.samples) == ("Wide-1B-Base", "base", True, 6)
    assert base.simulation.temperature == 1.0 and base.mean_temperature == 1.0
    assert len(base.participants) == 8 * len(NARROW_STUDIES)
    assert base.rejected == (simulated.RejectedParticipant("letters", "letters/", "p-rejected", "no response marker"),)
    assert base.n_done == 8 * len(NARROW_STUDIES) + 1
    first = base.participants[0]
    assert len(first.slots) == 4 and len(first.slots[0].samples) == 6
    post = simulated.load_simulation(post_dir)
    assert post.info["base_hf_id"] == "Wide-1B-Base" and post.rejected == ()
    # the first participant's last sample of each slot ended at the length limit: 4 slots of 8 × 4 × 6 samples
    assert {s: (c.n_samples, c.n_length) for s, c in post.stops.items()} == dict.fromkeys(NARROW_STUDIES, (192, 4))


def test_incomplete_simulation_refused_or_listed_and_left_out(tmp_path):
    wide, narrow = narrow_and_wide_studies(k=4)
    write_simulation(str(tmp_path / "runs" / "base"), Model("B"), wide, samples=4)
    post = Model("P", kind="Instruction-tuned", base_hf_id="B")
    write_simulation(str(tmp_path / "runs" / "post"), post, narrow, samples=4, complete=False)
    with pytest.raises(runs.IncompleteRunError, match="incomplete"):
        report.generate([str(tmp_path / "runs")], str(tmp_path / "out"), n_boot=20)
    report.generate([str(tmp_path / "runs")], str(tmp_path / "out"), n_boot=20, allow_incomplete=True)
    _, rows = read_csv(tmp_path / "out" / "behaviour_runs.csv")
    assert {(r["model"], r["complete"]) for r in rows} == {("B", "True"), ("P", "False")}
    assert {r["model"] for r in read_csv(tmp_path / "out" / "behaviour.csv")[1]} == {"B"}
    assert read_csv(tmp_path / "out" / "behaviour_pairs.csv")[1] == []
    text = (tmp_path / "out" / "report.md").read_text()
    assert "simulation of P incomplete (32 of 37 participants); left out" in text


def test_behaviour_csv_one_row_per_model_and_study(analysed):
    _, _, out, _ = analysed
    header, rows = read_csv(out / "behaviour.csv")
    assert tuple(header) == simulated.BEHAVIOUR_COLUMNS
    assert sorted((r["model"], r["study"]) for r in rows) == sorted(
        (m, s) for m in ("Narrow-1B", "Wide-1B-Base") for s in NARROW_STUDIES
    )
    assert all(r["response_type"] == TYPES[r["study"]] for r in rows)
    assert all(r["kind"] in ("base", "Instruction-tuned") and r["samples"] == "6" for r in rows)
    by = {(r["model"], r["study"]): r for r in rows}
    assert float(by[("Narrow-1B", "letters")]["share_length_stopped"]) == pytest.approx(4 / 192)
    assert not math.isnan(float(by[("Wide-1B-Base", "letters")]["tv"]))
    assert math.isnan(float(by[("Wide-1B-Base", "letters")]["wasserstein"]))  # categories: no W1
    assert not math.isnan(float(by[("Wide-1B-Base", "amounts")]["crps"]))
    assert tuple(read_csv(out / "behaviour_runs.csv")[0]) == simulated.RUN_COLUMNS


def test_pairs_show_the_narrow_post_trained_model(analysed):
    _, _, out, _ = analysed
    header, rows = read_csv(out / "behaviour_pairs.csv")
    assert tuple(header) == simulated.PAIR_COLUMNS
    assert {(r["post"], r["base"], r["against"]) for r in rows} == {("Narrow-1B", "Wide-1B-Base", "base")}
    assert {r["response_type"] for r in rows} == {"all", *TYPES.values()}
    by = {(r["response_type"], r["metric"]): r for r in rows}

    def diff(t, m):
        r = by[(t, m)]
        return float(r["mean_diff"]), float(r["ci_lo"]), float(r["ci_hi"]), int(r["n_studies"])

    mean, lo, hi, n = diff("all", "sample_entropy")
    assert n == 4 and lo <= mean <= hi < 0  # narrower on every study
    assert diff("all", "sample_distinct")[2] < 0
    mean, lo, hi, n = diff("all", "wasserstein_scaled")
    assert n == 2 and 0 < lo <= mean <= hi  # ordinal and number: further from the humans
    assert diff("category", "tv")[0] > 0 and diff("category", "js")[0] > 0
    assert diff("category", "exact_match")[0] > 0  # always "A", the humans' mode
    assert diff("free_text", "exact_match")[3] == 1
    entropy = by[("all", "sample_entropy")]
    assert float(entropy["mean_post"]) < float(entropy["mean_base"]) < float(entropy["mean_human"])
    assert float(entropy["mean_post"]) - float(entropy["mean_base"]) == pytest.approx(float(entropy["mean_diff"]))


def test_stage_chains_and_settings(tmp_path):
    wide, narrow = narrow_and_wide_studies(k=3)
    chain = {"chain": "C", "kind": "Instruction-tuned", "base_hf_id": "B"}
    dirs = [
        write_simulation(str(tmp_path / "b"), Model("B", stage="base", chain="C"), wide, samples=3),
        write_simulation(str(tmp_path / "s"), Model("S", stage="sft", **chain), wide, samples=3),
        write_simulation(str(tmp_path / "r"), Model("R", stage="rl", **chain), narrow, samples=3),
        write_simulation(
            str(tmp_path / "g"), Model("G", kind="Reasoning", base_hf_id="B"), narrow, samples=3, temperature=0.0
        ),
    ]
    calibrated = [  # each at its own fitted temperature: one setting, so paired (a chain of its base and RL stage)
        write_simulation(str(tmp_path / f"{m.hf_id}-cal"), m, wide, samples=3, temperature="calibrated")
        for m in (Model("B", stage="base", chain="C"), Model("R", stage="rl", **chain))
    ]
    loaded = simulated.load_simulations(dirs + calibrated)
    assert loaded.complete[-1].simulation.calibrated and loaded.complete[-1].mean_temperature == pytest.approx(0.8)
    comparisons, notes = simulated.find_comparisons(loaded.complete)
    assert {(c.post.model, c.base.model, c.against, c.chain, c.post.label()) for c in comparisons} == {
        ("S", "B", "base", "C", "k=3, T=1"),
        ("R", "B", "base", "", "k=3, T=1"),
        ("R", "S", "previous", "C", "k=3, T=1"),
        ("R", "B", "base", "C", "k=3, T=calibrated"),
    }
    assert any("simulation of G (k=3, T=0): base B not scored" in n for n in notes)  # greedy: another setting
    bt = simulated.build_behaviour(loaded.complete, n_boot=20)
    step = next(p for p in bt.pairs if p.comparison.against == "previous")
    assert step.difference("sample_entropy").mean < 0  # the RL stage narrowed the SFT stage's samples


def test_figures_are_png_and_skipped_without_pairs(analysed, tmp_path):
    _, _, out, figures = analysed
    for name, _, _ in behaviour_figures.BEHAVIOUR_FIGURES:
        assert figures[name] is None, name
        assert (out / name).read_bytes()[:8] == PNG
    wide, _ = narrow_and_wide_studies(k=3)
    write_simulation(str(tmp_path / "runs" / "b"), Model("B"), wide, samples=3)
    notes = report.generate([str(tmp_path / "runs")], str(tmp_path / "out"), n_boot=20)
    for name, _, _ in behaviour_figures.BEHAVIOUR_FIGURES:
        assert notes[name] == behaviour_figures.NO_PAIR and not (tmp_path / "out" / name).exists()
    assert "_No base / post-trained pair of simulations" in (tmp_path / "out" / "report.md").read_text()


def test_report_section_only_with_simulations(analysed, tmp_path):
    _, _, out, _ = analysed
    text = (out / "report.md").read_text()
    assert text.count(SECTION) == 1 and "not a closed-loop simulation of the task" in text
    assert "**Narrow-1B** against its base Wide-1B-Base (k=6, T=1): sample_entropy" in text
    assert "(narrower)" in text and "1 runs analysed and 2 simulation runs" in text
    for name, _, _ in behaviour_figures.BEHAVIOUR_FIGURES:
        assert f"]({name})" in text
    write_results(str(tmp_path / "runs" / "a"), "A", [("s1", "p1", [1.0, 2.0])])
    notes = report.generate([str(tmp_path / "runs")], str(tmp_path / "out"), n_boot=20)
    scoring_only = (tmp_path / "out" / "report.md").read_text()
    assert SECTION not in scoring_only and "behaviour" not in scoring_only
    assert not any("behaviour" in n for n in notes)
    assert not (tmp_path / "out" / "behaviour.csv").exists()
