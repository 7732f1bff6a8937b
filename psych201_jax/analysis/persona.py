"""Persona benefit (docs/reference-protocol.md, "Merge and aggregation"): d = (μ_none − μ_persona) / pooled SD,
positive = the persona helps, on each run's own participants without ``PERSONA_EXCLUDED``; and paired
statistics on the participants both runs scored."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from psych201_jax.analysis.metrics import Run, nll_moments
from psych201_jax.analysis.pairs import match_runs, reference_pair_d
from psych201_jax.analysis.stats import bootstrap_ci, bootstrap_two_level_ci, cohens_d, moments, nanmean, wilcoxon_test
from psych201_jax.conditions import Persona

PERSONA_EXCLUDED = ("evangelidis2023upscaling", "gunadi2021deferral")


def find_persona_comparisons(runs: Sequence[Run]) -> list[tuple[str, Run, Run]]:
    """(comparison, a, b) with b the matched-persona run and a its control, the same model under the
    same condition otherwise: ``matched_vs_none`` (a = no persona, all participants, as the reference),
    ``matched_vs_none_subset`` (a = no persona restricted to the persona subset) and
    ``matched_vs_shuffled``."""
    index = {(r.model, r.condition): r for r in runs}
    out = []
    for run in runs:
        if run.condition.persona != "matched":
            continue
        controls = (
            ("matched_vs_none", run.condition.with_persona("none")),
            ("matched_vs_none_subset", dataclasses.replace(run.condition, persona=Persona.NONE, persona_subset=True)),
            ("matched_vs_shuffled", run.condition.with_persona("shuffled")),
        )
        for name, condition in controls:
            other = index.get((run.model, condition))
            if other is not None:
                out.append((name, other, run))
    return out


def persona_statistics(
    control: Run, persona: Run, ddof: int, n_boot: int, seed: int, exclude: Iterable[str] = PERSONA_EXCLUDED
) -> tuple[dict, list[dict]]:
    """Persona benefit = control − persona NLL (positive = the persona helps): (summary, per study).

    Per study: the reference d = (μ_control − μ_persona)/pooled (``ddof``) on each run's own
    participants (as plot_meta: different subsets); the same d on the common subset (participants
    scored in both, responses on the common prefix); and per participant (paired) the difference of
    their mean NLLs on those responses: mean, SD, d_z and the share of participants helped. Summary:
    means over studies, bootstrap CIs of the mean per-study benefit (studies; studies then
    participants) and the Wilcoxon test across studies."""
    skip = set(exclude)
    ref = reference_pair_d(
        {s: m for s, m in nll_moments(control).items() if s not in skip},
        {s: m for s, m in nll_moments(persona).items() if s not in skip},
        ddof,
        min_studies=1,
    )
    matched = match_runs(control, persona, prefix=True, exclude=skip)
    studies: list[dict[str, Any]] = []
    groups = []
    for study, m in matched.items():
        benefit = np.array([x.mean() - y.mean() for x, y in zip(m.a, m.b)])
        sd = float(benefit.std(ddof=ddof)) if benefit.size > ddof else math.nan
        mean = float(benefit.mean()) if benefit.size else math.nan
        common_d = cohens_d(moments(np.concatenate(m.a)), moments(np.concatenate(m.b)), ddof) if m.a else math.nan
        with np.errstate(divide="ignore", invalid="ignore"):
            d_z = float(np.float64(mean) / np.float64(sd))
        studies.append(
            {
                "study": study,
                "reference_d": ref.per_study.get(study, math.nan),
                "common_d": common_d,
                "n_common": len(m.a),
                "only_control": m.only_a,
                "only_persona": m.only_b,
                "n_responses": m.n_responses,
                "dropped_responses": m.dropped,
                "mean_benefit": mean,
                "sd_benefit": sd,
                "paired_d": d_z,
                "share_helped": float(np.mean(benefit > 0)) if benefit.size else math.nan,
            }
        )
        if benefit.size:
            groups.append((benefit, np.ones(benefit.size)))
    usable = [r for r in studies if r["n_common"]]
    means = [r["mean_benefit"] for r in usable]
    ci = bootstrap_ci(means, n_boot, seed)
    ci2 = bootstrap_two_level_ci(groups, n_boot, seed)
    w_stat, w_p = wilcoxon_test(means)
    summary = {
        "n_reference_studies": len(ref.per_study),
        "reference_d": nanmean(ref.per_study.values()),
        "n_common_studies": len(usable),
        "common_d": nanmean(r["common_d"] for r in usable),
        "n_common_participants": sum(r["n_common"] for r in studies),
        "only_control": sum(r["only_control"] for r in studies),
        "only_persona": sum(r["only_persona"] for r in studies),
        "mean_benefit": nanmean(means),
        "ci_studies_lo": ci[0],
        "ci_studies_hi": ci[1],
        "ci_two_level_lo": ci2[0],
        "ci_two_level_hi": ci2[1],
        "wilcoxon_stat": w_stat,
        "wilcoxon_p": w_p,
        "mean_paired_d": nanmean(r["paired_d"] for r in usable),
        "share_helped": (float(np.mean(np.concatenate([g[0] for g in groups]) > 0)) if groups else math.nan),
    }
    return summary, studies
