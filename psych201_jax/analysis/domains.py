"""Domains (docs/reference-protocol.md, "Merge and aggregation"): the study category CSV and the pair × category
mean of d_e; the reference figure drops four categories (``REFERENCE_DROPPED_DOMAINS``)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from psych201_jax.analysis.stats import nanmean

REFERENCE_DROPPED_DOMAINS = ("Intertemporal Choice", "Moral Judgment", "Psychophysics", "Cognitive Control")

OTHER_DOMAIN = "Other"


@dataclasses.dataclass(frozen=True)
class Categories:
    """The category CSV: names (its 11 binary columns, in order) and study → its categories."""

    names: tuple[str, ...]
    of: dict[str, tuple[str, ...]]


def parse_categories(rows: Iterable[Mapping[str, str]]) -> Categories:
    """From ``csv.DictReader`` rows of the category CSV (``experiment`` = study, ``dataset``, 0/1 columns)."""
    names: tuple[str, ...] = ()
    of = {}
    for row in rows:
        if not names:
            names = tuple(k for k in row if k not in ("experiment", "dataset"))
        of[row["experiment"]] = tuple(n for n in names if str(row[n]).strip() in ("1", "1.0"))
    return Categories(names, of)


def domain_matrix(
    per_study_d: Mapping[Any, Mapping[str, float]],
    categories: Categories,
    *,
    drop: Sequence[str] = (),
    other: bool = False,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Pair × category mean of d_e (plot_experiments): (column names, matrix [P, C], average [C]).

    per_study_d: pair label → study → d_e (rows in the mapping's order). A cell is the mean d_e over
    the pair's studies in that category (NaN if none). Studies absent from the CSV are dropped (inner
    join) unless ``other``, which adds an "Other" column for them and for uncategorised studies.
    average: per column the mean over pairs, skipping NaN (the figure's "Average" row)."""
    cols = [n for n in categories.names if n not in drop] + ([OTHER_DOMAIN] if other else [])
    matrix = np.full((len(per_study_d), len(cols)), np.nan)
    for i, d_e in enumerate(per_study_d.values()):
        for j, col in enumerate(cols):
            if col == OTHER_DOMAIN:
                vals = [d for s, d in d_e.items() if not categories.of.get(s)]
            else:
                vals = [d for s, d in d_e.items() if col in categories.of.get(s, ())]
            matrix[i, j] = nanmean(vals)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        average = np.nanmean(matrix, axis=0) if len(matrix) else np.full(len(cols), np.nan)
    return cols, matrix, average
