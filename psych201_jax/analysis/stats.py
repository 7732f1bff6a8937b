"""Numeric statistics the metrics share: moments and the unpaired d, NaN-skipping means, percentile
bootstrap confidence intervals (one and two levels) and the Wilcoxon signed-rank test."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np
import scipy.stats


@dataclasses.dataclass(frozen=True)
class Moments:
    """n values, their mean and m2 = sum of squared deviations from the mean."""

    n: int
    mean: float
    m2: float

    def var(self, ddof: int) -> float:
        return self.m2 / (self.n - ddof) if self.n - ddof > 0 else math.nan


def moments(x: np.ndarray) -> Moments:
    """Moments of the finite values of x (NaN entries are responses nobody scored)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return Moments(0, math.nan, math.nan)
    mean = float(x.mean())
    return Moments(int(x.size), mean, float(np.sum((x - mean) ** 2)))


def bernoulli_moments(n: int, k: int) -> Moments:
    """Moments of n 0/1 values of which k are 1 (m2 = n·p·(1 − p))."""
    if n == 0:
        return Moments(0, math.nan, math.nan)
    p = k / n
    return Moments(n, p, n * p * (1.0 - p))


def cohens_d(a: Moments, b: Moments, ddof: int) -> float:
    """(mean_a − mean_b) / sqrt((var_a + var_b) / 2): the reference's unpaired d. Division by a zero
    pooled SD gives ±inf or NaN, as it does in pandas."""
    pooled = math.sqrt((a.var(ddof) + b.var(ddof)) / 2) if a.n and b.n else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(a.mean - b.mean) / np.float64(pooled))


def nanmean(values: Iterable[float]) -> float:
    """Mean of the non-NaN values (pandas ``mean``); NaN when there is none."""
    x = np.asarray(list(values), dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def bootstrap_ci(values: Sequence[float], n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (e.g. per-study effects), resampling them
    with replacement. NaN values are dropped; fewer than 2 values give (NaN, NaN)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size < 2 or n_boot < 1:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return (float(lo), float(hi))


def bootstrap_two_level_ci(
    groups: Sequence[tuple[np.ndarray, np.ndarray]], n_boot: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile CI of the mean over studies, resampling studies, then participants within each
    drawn study (a fresh participant draw for every draw of a study).

    groups: per study (sums float64 [P], counts float64 [P]): per participant the sum of its values
    and how many there are; a resampled study's statistic is sum(sums) / sum(counts) (response-pooled
    mean; counts of 1 give the mean over participants). Fewer than 2 studies give (NaN, NaN)."""
    groups = [(np.asarray(s, np.float64), np.asarray(c, np.float64)) for s, c in groups if np.sum(c) > 0]
    if len(groups) < 2 or n_boot < 1:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(groups), size=(n_boot, len(groups)))
    stat = np.empty(drawn.shape)
    for g, (sums, counts) in enumerate(groups):
        rows, cols = np.nonzero(drawn == g)
        block = max(1, 4_000_000 // sums.size)  # bound the [draws, P] index matrix
        for start in range(0, rows.size, block):
            idx = rng.integers(0, sums.size, size=(min(block, rows.size - start), sums.size))
            stat[rows[start : start + block], cols[start : start + block]] = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = np.percentile(stat.mean(axis=1), [50 * (1 - level), 50 * (1 + level)])
    return (float(lo), float(hi))


def wilcoxon_test(values: Sequence[float]) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test that per-study effects are centred on 0
    (``scipy.stats.wilcoxon``, zeros dropped). (statistic, p); NaN with fewer than 2 studies or no
    non-zero effect."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size < 2 or not np.any(x != 0):
        return (math.nan, math.nan)
    res = scipy.stats.wilcoxon(x)
    return (float(res.statistic), float(res.pvalue))


def means_by(rows: Sequence[dict], keys: Sequence[str], values: Sequence[str]) -> list[dict]:
    """Group ``rows`` by ``keys``; per group the number of rows and the NaN-skipping mean of each of
    ``values`` (the reference's "mean over pairs" per post-training type or generation)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for group, members in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        row = dict(zip(keys, group))
        row["n_pairs"] = len(members)
        for v in values:
            row[v] = nanmean(r[v] for r in members)
        out.append(row)
    return out
