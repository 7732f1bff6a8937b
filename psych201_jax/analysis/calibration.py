"""Calibration control: how much of post-training's misalignment is over-confidence a temperature undoes?

The head stores, per response, the NLL under softmax(logits / T) for a grid of temperatures. Per model
(and per model x study) this module finds the best temperature by *cross-fitting*: participants are split
into two halves by a seeded hash of their identity; the temperature is fitted on one half (the minimum of
its score-vs-T curve, refined by a parabola in log T) and applied to the other half, and vice versa. No
participant is ever evaluated at a temperature fitted on itself: ``cross_fit`` takes no half argument.

A response's NLL at an off-grid T* is the quadratic interpolation in log T through the three grid points
nearest T* (NLL is smooth in log T). The calibrated run (every response at its cross-fitted temperature)
then goes through the same metrics as the raw run: score, the reference's d_pair and the paired statistics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from psych201_jax.analysis import metrics
from psych201_jax.analysis.pairs import pair_statistics, reference_pair_d
from psych201_jax.errors import UserError
from psych201_jax.hashing import half_of

ParticipantKey = tuple[str, str, str]


def score_curve(participants: Sequence[metrics.Participant], n_t: int) -> np.ndarray:
    """float64 [nT]: the model score (mean over studies of the response-pooled mean NLL) at each T."""
    per_study: dict[str, list[np.ndarray]] = {}
    for p in participants:
        if p.nll_t is not None and len(p.nll_t):
            per_study.setdefault(p.study, []).append(p.nll_t)
    means = []
    for rows in per_study.values():
        x = np.concatenate(rows)  # [responses, nT]
        x = x[~np.isnan(x).any(axis=1)]
        if len(x):
            means.append(x.mean(axis=0))
    return np.mean(means, axis=0) if means else np.full(n_t, np.nan)


def refine(log_t: np.ndarray, values: np.ndarray) -> float:
    """log T* minimising ``values`` on the grid ``log_t``, refined by the parabola through the minimum and
    its neighbours (the grid point itself at an edge or for a non-convex triple); NaN if all NaN."""
    if np.isnan(values).all():
        return math.nan
    i = int(np.nanargmin(values))
    if i == 0 or i == len(values) - 1:
        return float(log_t[i])
    x, y = log_t[i - 1 : i + 2], values[i - 1 : i + 2]
    a, b, _ = np.polyfit(x, y, 2)
    if not a > 0:
        return float(log_t[i])
    return float(np.clip(-b / (2 * a), x[0], x[2]))


def nll_at(nll_t: np.ndarray, log_t: np.ndarray, log_t_star: float) -> np.ndarray:
    """float64 [R]: each response's NLL at log T*, quadratic in log T through the 3 nearest grid points."""
    j = int(np.clip(np.searchsorted(log_t, log_t_star), 1, len(log_t) - 2)) if len(log_t) >= 3 else 0
    if len(log_t) < 3:
        return nll_t[:, int(np.argmin(np.abs(log_t - log_t_star)))]
    xs = log_t[j - 1 : j + 2]
    weights = [np.prod([(log_t_star - xs[m]) / (xs[k] - xs[m]) for m in range(3) if m != k]) for k in range(3)]
    return nll_t[:, j - 1 : j + 2] @ np.asarray(weights)


@dataclasses.dataclass(frozen=True)
class CrossFit:
    """A run at its cross-fitted temperatures.

    fitted: (T fitted on half 0, T fitted on half 1); half 0 is evaluated at fitted[1] and vice versa.
    applied: participant key -> the temperature its responses were evaluated at (never its own half's).
    calibrated: the run with every response's NLL at its applied temperature (nll_t dropped).
    curve: the whole run's score at each grid temperature (for the figures; not used for fitting).
    """

    fitted: tuple[float, float]
    applied: dict[ParticipantKey, float]
    calibrated: metrics.Run
    curve: np.ndarray


def cross_fit(run: metrics.Run, seed: int = 0) -> CrossFit | None:
    """The run evaluated at cross-fitted temperatures; None without a temperature grid in the results."""
    if not run.temperatures or not any(p.nll_t is not None for p in run.participants):
        return None
    log_t = np.log(np.asarray(run.temperatures, np.float64))
    halves: tuple[list[metrics.Participant], list[metrics.Participant]] = ([], [])
    for p in run.participants:
        halves[half_of(p.key, seed)].append(p)
    fitted = tuple(math.exp(refine(log_t, score_curve(h, len(log_t)))) for h in halves)
    applied, out = {}, []
    for p in run.participants:
        other = fitted[1 - half_of(p.key, seed)]
        applied[p.key] = other
        nll = p.nll if p.nll_t is None or math.isnan(other) else nll_at(p.nll_t, log_t, math.log(other))
        out.append(dataclasses.replace(p, nll=nll, nll_t=None))
    calibrated = dataclasses.replace(run, participants=tuple(out), temperatures=())
    return CrossFit((fitted[0], fitted[1]), applied, calibrated, score_curve(run.participants, len(log_t)))


def mean_entropy(run: metrics.Run) -> float:
    """Mean over studies of the per-token T = 1 entropy (nats), pooled over each study's participants."""
    per_study: dict[str, list[tuple[float, int]]] = {}
    for p in run.participants:
        if p.entropy is not None and p.n_tokens:
            per_study.setdefault(p.study, []).append((float(np.nansum(p.entropy)), p.n_tokens))
    means = [sum(e for e, _ in v) / sum(n for _, n in v) for v in per_study.values()]
    return float(np.mean(means)) if means else math.nan


def by_study(run: metrics.Run) -> dict[str, metrics.Run]:
    """The run restricted to each of its studies (per-study cross-fitting)."""
    studies: dict[str, list[metrics.Participant]] = {}
    for p in run.participants:
        studies.setdefault(p.study, []).append(p)
    return {s: dataclasses.replace(run, participants=tuple(v)) for s, v in sorted(studies.items())}


def model_rows(runs: Sequence[metrics.Run], seed: int) -> list[dict]:
    """calibration.csv: per model (study "ALL") and per model x study, the raw and calibrated score, the
    two cross-fitted temperatures, the mean entropy and the score at every grid temperature."""
    rows = []
    for run in runs:
        for study, sub in [("ALL", run), *by_study(run).items()]:
            fit = cross_fit(sub, seed)
            if fit is None:
                continue
            raw = metrics.model_score(metrics.study_scores(sub))["score"]
            calibrated = metrics.model_score(metrics.study_scores(fit.calibrated))["score"]
            row = {
                "model": run.model,
                "kind": run.kind,
                "family": run.info.get("family", ""),
                "study": study,
                "n_participants": len(sub.participants),
                "raw_score": raw,
                "t_fit_half0": fit.fitted[0],
                "t_fit_half1": fit.fitted[1],
                "calibrated_score": calibrated,
                "mean_entropy": mean_entropy(sub),
            }
            row.update({f"score_T{t:.3g}": v for t, v in zip(run.temperatures, fit.curve)})
            rows.append(row)
    return rows


def share_removed_ci(
    raw: Mapping[str, float], calibrated: Mapping[str, float], n_boot: int, seed: int
) -> tuple[float, float, float]:
    """1 - mean(calibrated d_e) / mean(raw d_e) over common studies, with a percentile bootstrap 95% CI
    over studies (NaN when the raw misalignment is 0 or fewer than 2 studies)."""
    studies = [s for s in raw if s in calibrated and np.isfinite(raw[s]) and np.isfinite(calibrated[s])]
    r = np.asarray([raw[s] for s in studies])
    c = np.asarray([calibrated[s] for s in studies])
    if len(studies) < 2 or r.mean() == 0:
        return (math.nan, math.nan, math.nan)
    share = 1.0 - c.mean() / r.mean()
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(studies), size=(n_boot, len(studies)))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = 1.0 - c[draws].mean(axis=1) / r[draws].mean(axis=1)
    boot = boot[np.isfinite(boot)]
    if not len(boot):
        return (float(share), math.nan, math.nan)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return (float(share), float(lo), float(hi))


def pair_rows(
    pairs: Sequence[tuple[metrics.Run, metrics.Run]], ddofs: Mapping[str, int], n_boot: int, seed: int
) -> list[dict]:
    """calibration_pairs.csv: per (post, base) pair the raw and calibrated reference d_pair and paired mean
    difference, the share of the raw misalignment calibration removes (bootstrap CI over studies), both
    models' cross-fitted temperatures and their mean entropies."""
    rows = []
    for post, base in pairs:
        fit_post, fit_base = cross_fit(post, seed), cross_fit(base, seed)
        if fit_post is None or fit_base is None:
            continue
        raw = reference_pair_d(metrics.nll_moments(post), metrics.nll_moments(base), ddofs["pair"])
        cal = reference_pair_d(
            metrics.nll_moments(fit_post.calibrated), metrics.nll_moments(fit_base.calibrated), ddofs["pair"]
        )
        raw_stats, _ = pair_statistics(post, base, ddofs, n_boot, seed)
        cal_stats, _ = pair_statistics(fit_post.calibrated, fit_base.calibrated, ddofs, n_boot, seed)
        share, lo, hi = share_removed_ci(raw.per_study, cal.per_study, n_boot, seed)
        rows.append(
            {
                "post": post.model,
                "base": base.model,
                "kind": post.kind,
                "family": post.info.get("family", ""),
                "d_pair_raw": raw.d,
                "d_pair_calibrated": cal.d,
                **{f"{k}_raw": raw_stats.get(k, math.nan) for k in PAIRED_STATS},
                **{f"{k}_calibrated": cal_stats.get(k, math.nan) for k in PAIRED_STATS},
                "share_removed": share,
                "share_removed_ci_lo": lo,
                "share_removed_ci_hi": hi,
                "t_post_half0": fit_post.fitted[0],
                "t_post_half1": fit_post.fitted[1],
                "t_base_half0": fit_base.fitted[0],
                "t_base_half1": fit_base.fitted[1],
                "entropy_post": mean_entropy(post),
                "entropy_base": mean_entropy(base),
            }
        )
    return rows


# The paired statistics (pairs.pair_statistics) reported raw and at the cross-fitted temperatures.
PAIRED_STATS = ("mean_diff", "ci_studies_lo", "ci_studies_hi", "wilcoxon_p", "mean_paired_d")
MODEL_COLUMNS = (
    "model",
    "kind",
    "family",
    "study",
    "n_participants",
    "raw_score",
    "t_fit_half0",
    "t_fit_half1",
    "calibrated_score",
    "mean_entropy",
)
PAIR_COLUMNS = (
    "post",
    "base",
    "kind",
    "family",
    "d_pair_raw",
    "d_pair_calibrated",
    *(f"{k}_raw" for k in PAIRED_STATS),
    *(f"{k}_calibrated" for k in PAIRED_STATS),
    "share_removed",
    "share_removed_ci_lo",
    "share_removed_ci_hi",
    "t_post_half0",
    "t_post_half1",
    "t_base_half0",
    "t_base_half1",
    "entropy_post",
    "entropy_base",
)


def conclusions(pair_table: Sequence[dict]) -> list[str]:
    """One sentence per family for report.md."""
    out = []
    families: dict[str, list[dict]] = {}
    for row in pair_table:
        families.setdefault(row["family"] or row["post"], []).append(row)
    for family, rows in sorted(families.items()):
        raw = np.nanmean([r["d_pair_raw"] for r in rows])
        cal = np.nanmean([r["d_pair_calibrated"] for r in rows])
        share = (
            np.nanmean([r["share_removed"] for r in rows])
            if any(np.isfinite(r["share_removed"]) for r in rows)
            else math.nan
        )
        verdict = (
            "calibration removes most of it: mostly over-confidence"
            if share > 0.5
            else "most of it survives calibration: more than over-confidence"
        )
        if not np.isfinite(share):
            verdict = "the share removed is undefined (no finite raw misalignment)"
        out.append(
            f"- {family}: mean d_pair {raw:.3f} raw vs {cal:.3f} at cross-fitted temperatures "
            f"({len(rows)} pair(s), share removed {share:.2f}); {verdict}."
        )
    return out


class CalibrationError(UserError, ValueError):
    """A scoring run cannot give cross-fitted temperatures."""


def fitted_temperatures(results_dir: str, seed: int) -> tuple[float, float]:
    """The two cross-fitted temperatures of a scoring run with a temperature grid (fitted on half 0, on
    half 1): a simulation at ``temperature=calibrated`` samples half h's participants at the other's."""
    from psych201_jax.analysis.runs import load_run

    fit = cross_fit(load_run(results_dir), seed)
    if fit is None or not all(math.isfinite(t) and t > 0 for t in fit.fitted):
        raise CalibrationError(
            f"{results_dir}: no cross-fitted temperatures (it needs a temperature grid, config.temperatures, and "
            f"scored responses in both halves); score the model with the default grid first"
        )
    return fit.fitted
