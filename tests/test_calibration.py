"""Calibration control: cross-fitting recovers a known temperature, never evaluates a half on itself, and
the report's calibration tables and figures come out of a real results directory."""

import dataclasses
import inspect
import math
import os

import numpy as np
import pytest

from psych201_jax import defaults
from psych201_jax.analysis import calibration, metrics
from psych201_jax.conditions import DEFAULT_TEMPERATURES, Condition

GRID = np.asarray(DEFAULT_TEMPERATURES)


def _synthetic_run(best_t: float, n_participants=120, studies=("s1", "s2", "s3"), seed=0, model="M") -> metrics.Run:
    """Responses whose NLL is a parabola in log T with its minimum at ``best_t`` (plus noise)."""
    rng = np.random.default_rng(seed)
    participants = []
    for i in range(n_participants):
        study = studies[i % len(studies)]
        n = int(rng.integers(3, 8))
        depth = rng.uniform(0.5, 2.0, size=(n, 1))
        base = rng.uniform(1.0, 4.0, size=(n, 1))
        nll_t = base + depth * (np.log(GRID) - math.log(best_t)) ** 2 + rng.normal(0, 0.01, size=(n, len(GRID)))
        participants.append(
            metrics.Participant(study, "e", f"p{i}", nll_t[:, 8].copy(), n, 0, None, None, nll_t, np.full(n, 2.0))
        )
    info = {"hf_id": model, "family": "F", "generation": "", "size_b": 1.0, "kind": "base", "base_hf_id": ""}
    return metrics.Run("path", info, Condition(), tuple(participants), 0, temperatures=DEFAULT_TEMPERATURES)


@pytest.mark.parametrize("best_t", [0.6, 1.0, 1.7, 2.9])
def test_cross_fitting_recovers_a_known_temperature(best_t):
    fit = calibration.cross_fit(_synthetic_run(best_t), seed=3)
    assert fit is not None
    for t in fit.fitted:
        assert abs(math.log(t) - math.log(best_t)) < 0.03, (fit.fitted, best_t)  # refined between grid points
    raw = metrics.model_score(metrics.study_scores(_synthetic_run(best_t)))["score"]
    calibrated = metrics.model_score(metrics.study_scores(fit.calibrated))["score"]
    assert calibrated <= raw + 1e-4  # at T = 1 the raw score is already the optimum (noise only)
    if abs(math.log(best_t)) > 0.3:
        assert calibrated < raw - 0.01


def test_the_halves_are_a_seeded_partition():
    run = _synthetic_run(1.0)
    halves = [calibration.half_of(p.key, 0) for p in run.participants]
    assert 0.3 < np.mean(halves) < 0.7
    assert halves == [calibration.half_of(p.key, 0) for p in run.participants]
    assert halves != [calibration.half_of(p.key, 1) for p in run.participants]


def test_no_half_is_ever_evaluated_at_its_own_fit():
    """Leak test: the public function takes no half, and a half's applied temperature ignores its own data."""
    assert set(inspect.signature(calibration.cross_fit).parameters) == {"run", "seed"}
    run = _synthetic_run(1.0)
    fit = calibration.cross_fit(run, seed=0)
    for p in run.participants:
        assert fit.applied[p.key] == fit.fitted[1 - calibration.half_of(p.key, 0)]
    # Move half 0's optimum far away: half 0 is still evaluated at the temperature fitted on half 1.
    shifted = []
    for p in run.participants:
        if calibration.half_of(p.key, 0) == 0:
            p = dataclasses.replace(p, nll_t=p.nll_t + 5.0 * (np.log(GRID) - math.log(3.5)) ** 2)
        shifted.append(p)
    moved = calibration.cross_fit(dataclasses.replace(run, participants=tuple(shifted)), seed=0)
    assert moved.fitted[1] == fit.fitted[1] and moved.fitted[0] > 2.0
    for p in run.participants:
        if calibration.half_of(p.key, 0) == 0:
            assert moved.applied[p.key] == fit.applied[p.key]


def test_interpolation_is_exact_on_the_grid_and_smooth_between():
    nll_t = (np.log(GRID)[None, :] - 0.3) ** 2 * np.asarray([[1.0], [2.0]])
    for j in (0, 5, 8, 16):
        np.testing.assert_allclose(calibration.nll_at(nll_t, np.log(GRID), math.log(GRID[j])), nll_t[:, j])
    np.testing.assert_allclose(calibration.nll_at(nll_t, np.log(GRID), 0.3), [0.0, 0.0], atol=1e-12)


def test_share_removed_by_calibration_with_a_bootstrap_ci():
    raw = {"a": 1.0, "b": 0.8, "c": 1.2}
    share, lo, hi = calibration.share_removed_ci(raw, {k: v / 4 for k, v in raw.items()}, 500, 0)
    assert share == pytest.approx(0.75) and lo <= share <= hi
    assert math.isnan(calibration.share_removed_ci({"a": 1.0}, {"a": 0.5}, 100, 0)[0])


def test_the_job_stores_the_grid_and_the_report_has_the_calibration_section(tmp_path):
    from psych201_jax.analysis import report
    from psych201_jax.runs import job
    from psych201_jax.runs.config import ScoreJob

    outs = []
    for name, model, kind, base in (
        ("base", defaults.DEFAULT_MODEL, "base", ""),
        ("post", defaults.DEFAULT_POST_MODEL, "Instruction-tuned", "tiny/base"),
    ):
        data = ",".join(os.path.join(defaults.SAMPLE_DATA, s) for s in ("thoma2025riskychoice", "busch2024_stroop"))
        cfg = ScoreJob().with_overrides(
            {
                "out": str(tmp_path / name),
                "model": model,
                "data": data,
                "model_info.hf_id": f"tiny/{name}",
                "model_info.kind": kind,
                "model_info.base_hf_id": base,
                "model_info.family": "Tiny",
                "log_every_s": 1e9,
            }
        )
        job.run(cfg)
        outs.append(cfg.out)
    run = report.load_run(outs[0])
    assert run.temperatures == DEFAULT_TEMPERATURES
    p = run.participants[0]
    assert p.nll_t.shape == (len(p.nll), 17) and p.entropy.shape == p.nll.shape
    np.testing.assert_array_equal(p.nll_t[:, DEFAULT_TEMPERATURES.index(1.0)], p.nll)  # T = 1 is the NLL
    out = tmp_path / "report"
    report.generate(outs, str(out), n_boot=100)
    text = (out / "report.md").read_text()
    assert "## Calibration control" in text and "- Tiny: mean d_pair" in text
    for name in (
        "calibration.csv",
        "calibration_pairs.csv",
        "fig_calibration_curves.png",
        "fig_calibrated_misalignment.png",
    ):
        assert (out / name).is_file(), name
    lines = (out / "calibration_pairs.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("tiny/post,tiny/base")
