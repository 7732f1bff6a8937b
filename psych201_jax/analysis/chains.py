"""Stage chains: which post-training stage costs human-likeness (issue 29).

A chain (``pairs.Chain``, from ``model_info.chain`` / ``stage``) is one lineage in training order, e.g.
base → SFT → DPO → RL. Every stage is compared with the base and with the previous stage through
``pairs.pair_statistics`` (the one statistics path of the pair tables): the reference d (d_pair) and the
paired mean NLL difference over studies with its bootstrap CIs.

Share of a stage: its paired mean difference from the previous stage divided by the final stage's paired mean
difference from the base. On responses that every member scored, per-response differences telescope
((s1 − s0) + (s2 − s1) = s2 − s0) and means are linear, so the shares sum to 1 exactly (to float rounding);
chains are therefore restricted to those common responses first (``pairs.common_responses``; nothing changes
when the members already agree). A final difference within ``SHARE_EPS`` nats of 0 leaves the shares
undefined (NaN): there is no misalignment to divide. Its CI resamples studies, the same draws for every stage
of the chain, so the replicate shares sum to 1 too. The same per domain: per-study values averaged per
category of the study category CSV (``domains.domain_matrix``, all 11 categories plus Other).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from psych201_jax.analysis.domains import Categories, domain_matrix
from psych201_jax.analysis.metrics import Run
from psych201_jax.analysis.pairs import Chain, common_responses

SHARE_EPS = 1e-9  # nats: a final paired mean difference this close to 0 has no shares

Statistics = Callable[[Run, Run], tuple[dict, list[dict]]]  # (post, base) -> pair_statistics' (summary, studies)

SIDES = ("base", "previous")
_STATS = ("d_pair", "reason", "mean_diff", "ci_studies_lo", "ci_studies_hi", "ci_two_level_lo", "ci_two_level_hi")

COLUMNS = (
    "chain",
    "stage",
    "model",
    "previous",
    "base",
    "n_stages",
    *(f"{k}_vs_{side}" for side in SIDES for k in (*_STATS, "wilcoxon_p")),
    "share",
    "share_ci_lo",
    "share_ci_hi",
    "n_paired_studies",
    "matched_responses",
    "chain_dropped_responses",
)
DOMAIN_COLUMNS = (
    "chain",
    "stage",
    "model",
    "domain",
    "n_studies",
    "d_vs_base",
    "d_vs_previous",
    "mean_diff_vs_base",
    "mean_diff_vs_previous",
    "share",
)


@dataclasses.dataclass(frozen=True)
class StageTables:
    """stages.csv and stages_by_domain.csv rows (condition columns included) and the longest chain's length."""

    rows: list[dict]
    by_domain: list[dict]
    longest: int


def stage_tables(
    chains: Sequence[Chain],
    statistics: Statistics,
    compute: Statistics,
    categories: Categories,
    condition_cols: Callable[[Run], dict],
    n_boot: int,
    seed: int,
) -> StageTables:
    """Per chain and stage after the base: statistics against the base and the previous stage, the share of
    the final misalignment, and the same per domain (see the module docstring).

    statistics: ``pair_statistics`` as the pair tables compute it (cached by run path); compute: the same,
    uncached, for a chain restricted to its common responses (its runs keep their paths)."""
    rows: list[dict] = []
    by_domain: list[dict] = []
    for chain in chains:
        runs, dropped = common_responses(chain.runs) if len(chain.runs) > 2 else (chain.runs, 0)
        common = Chain(chain.name, runs)
        stats = statistics if all(a is b for a, b in zip(runs, chain.runs)) else compute
        total, total_studies = stats(common.final, common.base)
        steps = [(run, prev, stats(run, common.base), stats(run, prev)) for run, prev in common.steps()]
        study_total = _per_study(total_studies, "mean_diff")
        draws = _study_draws(sorted(study_total), n_boot, seed)
        for run, prev, (vs_base, base_studies), (vs_prev, prev_studies) in steps:
            head = {
                "chain": chain.name,
                "stage": run.info.get("stage") or "",
                "model": run.model,
                "previous": prev.model,
                "base": common.base.model,
                **condition_cols(run),
            }
            row = {**head, "n_stages": len(runs)}
            for side, summary in (("base", vs_base), ("previous", vs_prev)):
                row.update({f"{k}_vs_{side}": summary[k] for k in (*_STATS, "wilcoxon_p")})
            row["share"] = share(vs_prev["mean_diff"], total["mean_diff"])
            row["share_ci_lo"], row["share_ci_hi"] = _share_ci(
                _per_study(prev_studies, "mean_diff"), study_total, draws
            )
            row.update(
                n_paired_studies=vs_base["n_paired_studies"],
                matched_responses=vs_base["matched_responses"],
                chain_dropped_responses=dropped,
            )
            rows.append(row)
            by_domain += _domain_rows(head, base_studies, prev_studies, total_studies, categories)
    return StageTables(rows, by_domain, max((len(c.runs) for c in chains), default=0))


def share(step: float, total: float) -> float:
    """``step / total``; NaN when the final misalignment ``total`` is within ``SHARE_EPS`` of 0 (or NaN)."""
    if not math.isfinite(total) or abs(total) <= SHARE_EPS:
        return math.nan
    return step / total


def _per_study(studies: Sequence[dict], key: str) -> dict[str, float]:
    """Study -> ``key`` of ``pair_statistics``' per-study rows with matched responses."""
    return {s["study"]: s[key] for s in studies if s["n_responses"]}


def _study_draws(studies: list[str], n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap draws of study indices [n_boot, S], shared by every stage of a chain."""
    if len(studies) < 2 or n_boot < 1:
        return np.zeros((0, len(studies)), dtype=np.int64)
    return np.random.default_rng(seed).integers(0, len(studies), size=(n_boot, len(studies)))


def _share_ci(step: Mapping[str, float], total: Mapping[str, float], draws: np.ndarray) -> tuple[float, float]:
    """95% percentile CI of the share, resampling studies (``draws``); NaN when a replicate's total is ~0."""
    if not draws.size:
        return (math.nan, math.nan)
    names = sorted(total)
    a = np.array([step.get(s, math.nan) for s in names])[draws].mean(axis=1)
    b = np.array([total[s] for s in names])[draws].mean(axis=1)
    if np.any(~np.isfinite(a)) or np.any(~np.isfinite(b)) or np.any(np.abs(b) <= SHARE_EPS):
        return (math.nan, math.nan)
    lo, hi = np.percentile(a / b, [2.5, 97.5])
    return (float(lo), float(hi))


def _domain_rows(
    head: dict, base_studies: list[dict], prev_studies: list[dict], total_studies: list[dict], categories: Categories
) -> list[dict]:
    """One stage's rows per category (all 11 plus Other): mean over the category's studies of d_e and of the
    paired mean differences, and the stage's share of the category's final misalignment."""
    values = {
        "d_vs_base": _per_study(base_studies, "domain_d"),
        "d_vs_previous": _per_study(prev_studies, "domain_d"),
        "mean_diff_vs_base": _per_study(base_studies, "mean_diff"),
        "mean_diff_vs_previous": _per_study(prev_studies, "mean_diff"),
        "total": _per_study(total_studies, "mean_diff"),
    }
    cols, matrix, _ = domain_matrix(values, categories, other=True)
    out = []
    for j, domain in enumerate(cols):
        cell = dict(zip(values, matrix[:, j]))
        n = sum(1 for s in values["mean_diff_vs_base"] if _in_domain(s, domain, categories))
        if not n:
            continue
        out.append(
            {
                **head,
                "domain": domain,
                "n_studies": n,
                **{k: cell[k] for k in ("d_vs_base", "d_vs_previous", "mean_diff_vs_base", "mean_diff_vs_previous")},
                "share": share(cell["mean_diff_vs_previous"], cell["total"]),
            }
        )
    return out


def _in_domain(study: str, domain: str, categories: Categories) -> bool:
    of = categories.of.get(study, ())
    return domain in of if domain in categories.names else not of


STAGE_NAMES = {"base": "base", "sft": "SFT", "dpo": "DPO", "rl": "RL", "final": "the final step"}


def conclusions(rows: Sequence[dict]) -> list[str]:
    """One sentence per chain (rows of one condition), e.g. "OLMo-3 7B Think: SFT adds 70% of the final
    misalignment (d vs previous +0.05), DPO 20% (...), RL 10% (...)"."""
    chains: dict[str, list[dict]] = {}
    for r in rows:
        chains.setdefault(r["chain"], []).append(r)
    out = []
    for name, stages in chains.items():
        final = stages[-1]
        ci = f"[{_num(final['ci_studies_lo_vs_base'])}, {_num(final['ci_studies_hi_vs_base'])}]"
        tail = (
            f"(final vs base: paired mean difference {_num(final['mean_diff_vs_base'])} nats {ci}, "
            f"d {_num(final['d_pair_vs_base'])})"
        )
        if math.isnan(final["share"]):
            out.append(
                f"- **{name}**: the final model is not measurably misaligned, so the stages have no shares {tail}."
            )
            continue
        parts = [
            f"{STAGE_NAMES.get(r['stage'], r['stage'])}{' adds' if k == 0 else ''} {_pct(r['share'])}"
            f"{' of the final misalignment' if k == 0 else ''} (d vs previous {_num(r['d_pair_vs_previous'])})"
            for k, r in enumerate(stages)
        ]
        out.append(f"- **{name}**: {', '.join(parts)} {tail}.")
    return out


def _num(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{v:+.3g}"


def _pct(v: float) -> str:
    return "n/a" if not math.isfinite(v) else f"{100 * v:.0f}%"
