"""Post-trained vs base pairs: the reference's d_pair, and paired statistics on matched responses.

Reference (docs/reference-protocol.md, "Merge and aggregation"): per study
d_e = (μ_post − μ_base) / sqrt((σ_post² + σ_base²) / 2) over response-level NLLs, d_pair = mean of d_e over
the studies both models have (NaN d_e skipped, as pandas does), at least 2 studies as plot.py (fig3a's
plot_evolution.py takes 1: ``tables``); positive = post-training moved the model away from humans.
Accuracy: the same d on the 0/1 token values (negative = worse).

Paired (not in the reference): both models score the very same responses, so differences are taken
response by response (same study, experiment, participant and response index), with bootstrap confidence
intervals over studies, and over studies then participants, and a Wilcoxon signed-rank test across studies.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from psych201_jax.analysis.metrics import Run, accuracy_moments, nll_moments
from psych201_jax.analysis.stats import (
    Moments,
    bootstrap_ci,
    bootstrap_two_level_ci,
    cohens_d,
    nanmean,
    wilcoxon_test,
)
from psych201_jax.conditions import STAGE_ORDER, Condition, Stage

# Post-training types whose pairs with a base of their own generation form the project's broader
# by-generation table (generations_all_pairs.csv): Instruction-tuned AND Reasoning, so DeepSeek-R1 distills of a
# Qwen2.5 base count as Qwen2.5 pairs here; Vision, Code and Math pairs are left out. fig3a itself
# (generations.csv) takes only plot_evolution.py's listed pairs: ``paper.EVOLUTION_PAIRS``.
GENERATION_TYPES = ("Instruction-tuned", "Reasoning")


@dataclasses.dataclass(frozen=True)
class Chain:
    """Runs of one model lineage under one condition in training order: the base first, the final release
    last. A (post, base) pair is a chain of two; a stage chain (``model_info.chain``) holds every published
    post-training stage (e.g. base → SFT → DPO → RL). ``name`` is the chain's name ("" for a pair)."""

    name: str
    runs: tuple[Run, ...]

    @property
    def base(self) -> Run:
        return self.runs[0]

    @property
    def final(self) -> Run:
        return self.runs[-1]

    def steps(self) -> list[tuple[Run, Run]]:
        """(stage, previous stage) for every stage after the base, in training order."""
        return list(zip(self.runs[1:], self.runs[:-1]))


def _base_run(run: Run, base_id: str, index: Mapping[tuple[str, Condition], Run]) -> Run | None:
    """``base_id``'s run under ``run``'s condition; a post-trained run scored with the chat template falls
    back to its base's plain run (base models have no template)."""
    return index.get((base_id, run.condition)) or index.get((base_id, run.condition.with_template("none")))


def pair_chains(runs: Sequence[Run]) -> tuple[list[Chain], list[tuple[Run, str]]]:
    """(base, post) chains of two from ``model_info.base_hf_id``, within one condition, and the post-trained
    runs left unpaired, with the reason."""
    index = {(r.model, r.condition): r for r in runs}
    chains, unpaired = [], []
    for run in runs:
        base_id = run.info.get("base_hf_id") or ""
        if not base_id:
            continue
        base = _base_run(run, base_id, index)
        if base is None:
            unpaired.append((run, f"base {base_id} not scored under this condition"))
        else:
            chains.append(Chain("", (base, run)))
    return chains, unpaired


def find_pairs(runs: Sequence[Run]) -> tuple[list[tuple[Run, Run]], list[tuple[Run, str]]]:
    """(post, base) pairs: the chains of two of ``pair_chains``, and the unpaired post-trained runs."""
    chains, unpaired = pair_chains(runs)
    return [(c.final, c.base) for c in chains], unpaired


def find_chains(runs: Sequence[Run]) -> tuple[list[Chain], list[str]]:
    """Stage chains from ``model_info.chain`` and ``stage``, within one condition, and a note per chain left
    out. Members are the runs naming the chain, ordered by ``STAGE_ORDER``; the base is the member of stage
    ``base``, else the run of the members' common ``base_hf_id`` (one base may start several chains, e.g.
    OLMo 3 7B's Think and Instruct), found as ``pair_chains`` finds a pair's."""
    index = {(r.model, r.condition): r for r in runs}
    groups: dict[tuple[str, Condition], list[Run]] = {}
    for run in runs:
        if run.info.get("chain"):
            groups.setdefault((run.info["chain"], run.condition), []).append(run)
    chains, notes = [], []
    for (name, condition), members in groups.items():
        shown = condition.values(("protocol", "template", "persona"))
        where = f"chain {name!r} ({', '.join(f'{k}={v}' for k, v in shown.items())})"
        stages = [str(r.info.get("stage") or "") for r in members]
        if "" in stages or len(set(stages)) < len(stages):
            notes.append(
                f"{where}: every member needs its own stage (got {', '.join(s or '?' for s in stages)}); left out"
            )
            continue
        order = {s.value: i for i, s in enumerate(STAGE_ORDER)}
        members = sorted(members, key=lambda r: order[r.info["stage"]])
        if members[0].info["stage"] != Stage.BASE:
            base_ids = {r.info.get("base_hf_id") or "" for r in members}
            base = _base_run(members[0], base_ids.pop(), index) if len(base_ids) == 1 else None
            if base is None:
                notes.append(
                    f"{where}: no base (a stage-base member, or one scored base_hf_id of all members); left out"
                )
                continue
            members = [base, *members]
        if len(members) < 2:
            notes.append(f"{where}: only its base is scored; left out")
            continue
        chains.append(Chain(name, tuple(members)))
    return chains, notes


def common_responses(runs: Sequence[Run]) -> tuple[tuple[Run, ...], int]:
    """``runs`` restricted to the responses every one of them scored (same participant, same response
    count, non-NaN in all), and how many scored responses that left out (summed over the runs). On those responses the
    paired mean differences of consecutive stages add up exactly to the last stage's difference from the
    first. Runs that already agree are returned as they are (the same objects)."""
    keyed = [{p.key: p for p in r.participants} for r in runs]
    shared = set(keyed[0]).intersection(*keyed[1:])
    keep: dict[tuple[str, str, str], np.ndarray] = {}
    for key in shared:
        sizes = {k[key].nll.size for k in keyed}
        if len(sizes) == 1:
            keep[key] = np.all([~np.isnan(k[key].nll) for k in keyed], axis=0)
    dropped = 0
    out = []
    for run in runs:
        parts = []
        for p in run.participants:
            mask = keep.get(p.key)
            n = int(np.sum(~np.isnan(p.nll)))
            if mask is None:
                dropped += n
                continue
            dropped += n - int(mask.sum())
            parts.append(p if n == mask.sum() else dataclasses.replace(p, nll=np.where(mask, p.nll, np.nan)))
        out.append(
            run
            if len(parts) == len(run.participants) and all(a is b for a, b in zip(parts, run.participants))
            else dataclasses.replace(run, participants=tuple(parts))
        )
    return tuple(out), dropped


@dataclasses.dataclass(frozen=True)
class PairD:
    """The reference's pair score: d (NaN with ``reason`` when undefined), d_e per common study."""

    d: float
    per_study: dict[str, float]
    reason: str


def reference_pair_d(
    post: Mapping[str, Moments], base: Mapping[str, Moments], ddof: int, min_studies: int = 2
) -> PairD:
    """d_pair = mean over common studies of d_e = (μ_post − μ_base)/sqrt((σ_post² + σ_base²)/2).

    post, base: study → moments of response-level values (NLL, or 0/1 accuracy). d_e that are NaN
    (e.g. one response with ddof=1) are skipped in the mean, like pandas. Fewer than ``min_studies``
    common studies (plot.py: 2; plot_experiments: 1) give d = NaN with the reason; d_e are kept."""
    common = sorted(set(post) & set(base))
    per_study = {s: cohens_d(post[s], base[s], ddof) for s in common}
    if len(common) < min_studies:
        return PairD(math.nan, per_study, f"{len(common)} common studies (need ≥ {min_studies})")
    d = nanmean(per_study.values())
    return PairD(d, per_study, "" if not math.isnan(d) else "every per-study d is undefined")


# --------------------------------------------------------------------------------- paired matching


@dataclasses.dataclass(frozen=True)
class Matched:
    """One study's responses matched between run a and run b (same participants, same responses).

    a, b: per matched participant, float64 [R_p] NLLs on the same responses (aligned, both scored).
    only_a / only_b: participants scored in one run only; unaligned: participants in both whose
    response counts differ (strict alignment); dropped: responses of participants in both left out
    (unaligned participants, a response scored in one run only, responses past the common prefix).
    """

    study: str
    a: tuple[np.ndarray, ...]
    b: tuple[np.ndarray, ...]
    only_a: int
    only_b: int
    unaligned: int
    dropped: int

    @property
    def n_responses(self) -> int:
        return int(sum(x.size for x in self.a))

    def differences(self) -> np.ndarray:
        """float64 [N] a − b for every matched response, pooled over participants."""
        return np.concatenate([x - y for x, y in zip(self.a, self.b)]) if self.a else np.zeros(0)


def _align(x: np.ndarray, y: np.ndarray, prefix: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """The responses of one participant scored in both runs; None if they cannot be aligned."""
    if x.size != y.size:
        if not prefix:
            return None
        n = min(x.size, y.size)
        x, y = x[:n], y[:n]
    keep = ~np.isnan(x) & ~np.isnan(y)
    return x[keep], y[keep]


def match_runs(a: Run, b: Run, *, prefix: bool = False, exclude: Iterable[str] = ()) -> dict[str, Matched]:
    """Study → ``Matched`` over the studies of either run (minus ``exclude``).

    Participants are matched on (study, experiment, participant). prefix=False (model pairs): a
    participant counts only when both runs have the same number of responses, matched by response
    index. prefix=True (persona): responses are matched on the common prefix of response indices,
    since the persona prefix can push tail responses past the reference's character cut."""
    skip = set(exclude)
    pa = {p.key: p for p in a.participants if p.study not in skip}
    pb = {p.key: p for p in b.participants if p.study not in skip}
    keys: dict[str, tuple[set, set]] = {}
    for side, ps in enumerate((pa, pb)):
        for k in ps:
            keys.setdefault(k[0], (set(), set()))[side].add(k)
    out = {}
    for study, (keys_a, keys_b) in sorted(keys.items()):
        xs, ys, unaligned, dropped = [], [], 0, 0
        for key in sorted(keys_a & keys_b):
            x, y = pa[key].nll, pb[key].nll
            aligned = _align(x, y, prefix)
            if aligned is None:
                unaligned += 1
                dropped += int(max(np.sum(~np.isnan(x)), np.sum(~np.isnan(y))))
                continue
            dropped += int(max(np.sum(~np.isnan(x)), np.sum(~np.isnan(y)))) - aligned[0].size
            if aligned[0].size:
                xs.append(aligned[0])
                ys.append(aligned[1])
        out[study] = Matched(
            study, tuple(xs), tuple(ys), len(keys_a - keys_b), len(keys_b - keys_a), unaligned, dropped
        )
    return out


def paired_study_stats(m: Matched, ddof: int) -> dict:
    """A study's paired statistics of a − b over matched responses: n, mean difference, SD of the
    differences and the paired d (d_z = mean / SD)."""
    diff = m.differences()
    sd = float(diff.std(ddof=ddof)) if diff.size > ddof else math.nan
    mean = float(diff.mean()) if diff.size else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        d = float(np.float64(mean) / np.float64(sd))
    return {
        "n_participants": len(m.a),
        "n_responses": int(diff.size),
        "mean_diff": mean,
        "sd_diff": sd,
        "paired_d": d,
        "only_post": m.only_a,
        "only_base": m.only_b,
        "unaligned_participants": m.unaligned,
        "dropped_responses": m.dropped,
    }


def pair_statistics(post: Run, base: Run, ddofs: Mapping[str, int], n_boot: int, seed: int) -> tuple[dict, list[dict]]:
    """Everything about one pair: (summary row, per-study rows).

    Reference: d_pair (``ddofs['pair']``, ≥ 2 studies), and the domain d_e (``ddofs['domain']``).
    Paired: per study the mean of post − base over the same responses; over studies their mean
    (equal weight), its bootstrap CIs (studies; studies then participants) and the Wilcoxon
    signed-rank test; the mean paired d. Accuracy: the reference pair d on 0/1 tokens
    (``ddofs['accuracy']``, post − base, negative = post-training is worse)."""
    post_m, base_m = nll_moments(post), nll_moments(base)
    ref = reference_pair_d(post_m, base_m, ddofs["pair"])
    domain = reference_pair_d(post_m, base_m, ddofs["domain"], min_studies=1)
    acc = reference_pair_d(accuracy_moments(post), accuracy_moments(base), ddofs["accuracy"])
    matched = match_runs(post, base)
    studies: list[dict[str, Any]] = []
    for study, m in matched.items():
        row: dict[str, Any] = {
            "study": study,
            "n_post": post_m[study].n if study in post_m else 0,
            "n_base": base_m[study].n if study in base_m else 0,
            "reference_d": ref.per_study.get(study, math.nan),
            "domain_d": domain.per_study.get(study, math.nan),
        }
        row.update(paired_study_stats(m, ddofs["pair"]))
        studies.append(row)
    usable = [r for r in studies if r["n_responses"]]
    means = [r["mean_diff"] for r in usable]
    groups = [
        (np.array([np.sum(x - y) for x, y in zip(m.a, m.b)]), np.array([x.size for x in m.a]))
        for m in matched.values()
        if m.n_responses
    ]
    ci = bootstrap_ci(means, n_boot, seed)
    ci2 = bootstrap_two_level_ci(groups, n_boot, seed)
    w_stat, w_p = wilcoxon_test(means)
    summary = {
        "n_common_studies": len(ref.per_study),
        "d_pair": ref.d,
        "reason": ref.reason,
        "n_paired_studies": len(usable),
        "mean_diff": nanmean(means) if means else math.nan,
        "ci_studies_lo": ci[0],
        "ci_studies_hi": ci[1],
        "ci_two_level_lo": ci2[0],
        "ci_two_level_hi": ci2[1],
        "wilcoxon_stat": w_stat,
        "wilcoxon_p": w_p,
        "mean_paired_d": nanmean(r["paired_d"] for r in usable) if usable else math.nan,
        "matched_responses": sum(r["n_responses"] for r in studies),
        "unaligned_participants": sum(r["unaligned_participants"] for r in studies),
        "unmatched_participants": sum(r["only_post"] + r["only_base"] for r in studies),
        "dropped_responses": sum(r["dropped_responses"] for r in studies),
        "accuracy_d": acc.d,
        "accuracy_reason": acc.reason,
    }
    return summary, studies
