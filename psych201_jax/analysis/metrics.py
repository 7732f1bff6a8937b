"""Metrics and statistics over scored results: the reference study's exact numbers, and paired ones.

Everything here is pure (no I/O): a ``Run`` is built from a manifest dict and row dicts
(``psych201_jax.runs.store``), and every function maps runs or arrays to numbers or plain row dicts.

Reference metrics (``../shared/docs/psych201-reference.md`` §6, §7, §9, §10, §13):
  * model score = mean over studies of the response-pooled mean NLL (studies weigh equally);
  * post-training misalignment of a pair (post, base): per study
    d_e = (μ_post − μ_base) / sqrt((σ_post² + σ_base²) / 2) over response-level NLLs, d_pair = mean of
    d_e over the studies both models have (NaN d_e skipped, as pandas does), at least 2 studies;
    positive = post-training moved the model away from humans;
  * domains: d_e with ddof=0, inner-joined with the category CSV, the mean d_e per category; the
    reference figure drops four categories (``REFERENCE_DROPPED_DOMAINS``);
  * persona: d = (μ_none − μ_persona) / pooled (ddof=0), positive = the persona helps, on all scored
    participants of each condition (different subsets) without ``PERSONA_EXCLUDED``;
  * accuracy: per token (argmax == human token), pooled per study, mean over studies; pair d on the
    0/1 token values with the same formula (post − base: negative = post-training is worse).

Paired statistics (not in the reference): both models of a pair score the very same responses, so
differences are taken response by response (same study, experiment, participant and response index),
with percentile bootstrap confidence intervals over studies, and over studies then participants,
and a Wilcoxon signed-rank test across studies.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import scipy.stats

from psych201_jax.conditions import Condition, ModelInfo, Persona

# Post-training types whose pairs form the by-generation comparison (fig3a compares the Instruct /
# default post-trained model with its own generation's base; VL, Coder, Math and distills are left out).
GENERATION_TYPES = ("Instruction-tuned", "Reasoning")
REFERENCE_DROPPED_DOMAINS = ("Intertemporal Choice", "Moral Judgment", "Psychophysics", "Cognitive Control")
PERSONA_EXCLUDED = ("evangelidis2023upscaling", "gunadi2021deferral")
OTHER_DOMAIN = "Other"
DDOF_MODES = ("reference", "0", "1")


# --------------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Participant:
    """One scored participant.

    nll: float64 [R], summed NLL per response in text order; NaN for a response with no scored token.
    n_tokens: scored tokens with an argmax (accuracy denominator); n_correct: argmax == human token.
    n_option_tokens / n_option_correct: tokens of single-token responses whose study has options, and how
    many of them the argmax restricted to the study's options gets right; None if not recorded.
    nll_t: float64 [R, nT], the NLL per response at each temperature of the run's grid; entropy: float64 [R],
    the summed T = 1 entropy per response; None when the run has no grid.
    """

    study: str
    experiment: str
    participant: str
    nll: np.ndarray
    n_tokens: int
    n_correct: int
    n_option_correct: int | None
    n_option_tokens: int | None = None
    nll_t: np.ndarray | None = None
    entropy: np.ndarray | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.study, self.experiment, self.participant)


@dataclasses.dataclass(frozen=True)
class Run:
    """One results directory: a model scored under one condition.

    info: the manifest's ``config.model_info`` (hf_id, family, generation, size_b, kind, base_hf_id).
    participants: scored participants, in row order; n_rejected: rows with status "rejected".
    complete: the job finished (complete.json); n_done / n_input: participants committed / the job's input
    participants (None: unknown), so an incomplete run is reported with its counts.
    """

    path: str
    info: Mapping
    condition: Condition
    participants: tuple[Participant, ...]
    n_rejected: int
    complete: bool = True
    n_done: int = 0
    n_input: int | None = None
    temperatures: tuple[float, ...] = ()  # the head's grid (results without one: empty)

    def status(self) -> str:
        total = "?" if self.n_input is None else str(self.n_input)
        return "complete" if self.complete else f"incomplete ({self.n_done} of {total} participants)"

    @property
    def model(self) -> str:
        return self.info["hf_id"]

    @property
    def kind(self) -> str:
        return self.info["kind"]


def model_info(manifest: dict) -> dict:
    """``config.model_info`` as a ``ModelInfo`` dict; a manifest without it gets an unpaired label."""
    config = manifest.get("config", {})
    fallback = str(config.get("model", "unknown")).rstrip("/").split("/")[-1]
    return ModelInfo.from_mapping(config.get("model_info") or {}, default_hf_id=fallback).as_dict()


def condition_of(manifest: dict) -> Condition:
    """The run's condition as the analysis compares it (head-only fields dropped: same NLLs)."""
    return Condition.from_mapping(manifest.get("config", {})).nll_condition()


def run_from_rows(manifest: dict, rows: Iterable[dict], path: str = "") -> Run:
    """Builds a ``Run`` from a manifest and its result rows (``results.iter_rows`` dicts)."""
    participants, rejected = [], 0
    temperatures = tuple(float(t) for t in manifest.get("determinants", {}).get("temperatures") or ())
    for row in rows:
        if row.get("status") != "scored":
            rejected += 1
            continue
        nll = np.asarray([np.nan if x is None else x for x in row.get("nll") or []], dtype=np.float64)
        argmax = np.asarray(row.get("argmax") or [], dtype=np.int64)
        target = np.asarray(row.get("target") or [], dtype=np.int64)
        option = row.get("option_argmax")
        n_option = n_option_tokens = None
        if option is not None:
            # Options are the study's single-token responses, so only those responses are option choices.
            per_response = np.asarray(row.get("n_tokens") or [], dtype=np.int64)
            single = np.repeat(per_response == 1, per_response)
            option = np.asarray(option, dtype=np.int64)
            chosen = single & (option >= 0)
            n_option, n_option_tokens = int(np.sum(option[chosen] == target[chosen])), int(chosen.sum())
        nll_t = entropy = None
        if temperatures and row.get("nll_t") is not None:
            nll_t = np.asarray([[np.nan if x is None else x for x in r] for r in row["nll_t"]], np.float64)
            nll_t = nll_t.reshape(len(nll), len(temperatures))
            entropy = np.asarray([np.nan if x is None else x for x in row.get("entropy") or []], np.float64)
        participants.append(
            Participant(
                row["study"],
                row.get("experiment", ""),
                str(row["participant"]),
                nll,
                int(target.size),
                int(np.sum(argmax == target)),
                n_option,
                n_option_tokens,
                nll_t,
                entropy,
            )
        )
    return Run(
        path,
        model_info(manifest),
        condition_of(manifest),
        tuple(participants),
        rejected,
        temperatures=temperatures,
    )


def resolve_ddof(mode: str) -> dict[str, int]:
    """ddof per analysis. ``reference``: plot.py / plot_evolution / plot_accuracy use pandas ``std``
    (ddof=1) for pairs and generations; plot_experiments / plot_meta use streaming sums (ddof=0) for
    domains and persona. ``0`` / ``1`` force one convention everywhere."""
    if mode == "reference":
        return {"pair": 1, "domain": 0, "persona": 0, "accuracy": 1}
    if mode in ("0", "1"):
        return dict.fromkeys(("pair", "domain", "persona", "accuracy"), int(mode))
    raise ValueError(f"unknown ddof mode {mode!r}; expected one of {DDOF_MODES}")


# ---------------------------------------------------------------------------------------- moments


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


# ----------------------------------------------------------------------------------- model scores


def study_nll(run: Run) -> dict[str, np.ndarray]:
    """Study → float64 [N] every scored response NLL of the study, pooled over its participants."""
    out: dict[str, list[np.ndarray]] = {}
    for p in run.participants:
        out.setdefault(p.study, []).append(p.nll[~np.isnan(p.nll)])
    return {s: np.concatenate(v) for s, v in sorted(out.items())}


def nll_moments(run: Run) -> dict[str, Moments]:
    """Study → moments of its pooled response NLLs (studies with at least one scored response)."""
    return {s: moments(x) for s, x in study_nll(run).items() if x.size}


def accuracy_moments(run: Run) -> dict[str, Moments]:
    """Study → moments of its per-token 0/1 accuracies (studies with at least one scored token)."""
    counts: dict[str, list[int]] = {}
    for p in run.participants:
        c = counts.setdefault(p.study, [0, 0])
        c[0] += p.n_tokens
        c[1] += p.n_correct
    return {s: bernoulli_moments(n, k) for s, (n, k) in sorted(counts.items()) if n}


def study_scores(run: Run) -> list[dict]:
    """One row per study: participants, responses (scored / unscored), the response-pooled mean NLL
    (the reference's), the per-participant mean (mean over participants of their mean response NLL),
    the response SD (ddof=1), accuracy and option-restricted accuracy (pooled over single-token
    responses; NaN unless every participant of the study carries ``option_argmax`` and the study has
    options)."""
    by_study: dict[str, list[Participant]] = {}
    for p in run.participants:
        by_study.setdefault(p.study, []).append(p)
    rows = []
    for study, ps in sorted(by_study.items()):
        pooled = np.concatenate([p.nll[~np.isnan(p.nll)] for p in ps])
        per_participant = [float(np.nanmean(p.nll)) for p in ps if np.any(~np.isnan(p.nll))]
        tokens = sum(p.n_tokens for p in ps)
        recorded = all(p.n_option_correct is not None for p in ps)
        option_tokens = sum(p.n_option_tokens or 0 for p in ps) if recorded else 0
        # ``recorded``: every n_option_correct is an int when option_tokens > 0
        option = sum(cast(int, p.n_option_correct) for p in ps) / option_tokens if option_tokens else math.nan
        rows.append(
            {
                "study": study,
                "n_participants": len(ps),
                "n_responses": int(pooled.size),
                "n_unscored_responses": int(sum(np.isnan(p.nll).sum() for p in ps)),
                "mean_nll": float(pooled.mean()) if pooled.size else math.nan,
                "participant_mean_nll": nanmean(per_participant),
                "sd_nll": float(pooled.std(ddof=1)) if pooled.size > 1 else math.nan,
                "n_tokens": tokens,
                "accuracy": sum(p.n_correct for p in ps) / tokens if tokens else math.nan,
                "option_accuracy": option,
            }
        )
    return rows


def model_score(study_rows: Sequence[dict]) -> dict:
    """Model-level scores from ``study_scores`` rows: each a mean over studies (equal weight).

    score: the reference alignment score (lower = more human-like); score_participant: the same from
    per-participant means; accuracy over studies with scored tokens; option_accuracy over the studies
    that have it (NaN when none has)."""
    scored = [r for r in study_rows if r["n_responses"]]
    with_tokens = [r for r in study_rows if r["n_tokens"]]
    option = [r["option_accuracy"] for r in with_tokens if not math.isnan(r["option_accuracy"])]
    return {
        "n_studies": len(scored),
        "n_accuracy_studies": len(with_tokens),
        "n_participants": sum(r["n_participants"] for r in study_rows),
        "n_responses": sum(r["n_responses"] for r in study_rows),
        "score": nanmean(r["mean_nll"] for r in scored),
        "score_participant": nanmean(r["participant_mean_nll"] for r in scored),
        "accuracy": nanmean(r["accuracy"] for r in with_tokens),
        "option_accuracy": float(np.mean(option)) if option else math.nan,
    }


# ------------------------------------------------------------------------------ pairs (reference)


def find_pairs(runs: Sequence[Run]) -> tuple[list[tuple[Run, Run]], list[tuple[Run, str]]]:
    """(post, base) pairs from ``model_info.base_hf_id``, within one condition. A post-trained run
    scored with the chat template falls back to its base's plain run (base models have no template).
    Returns the pairs and the post-trained runs left unpaired, with the reason."""
    index = {(r.model, r.condition): r for r in runs}
    pairs, unpaired = [], []
    for run in runs:
        base_id = run.info.get("base_hf_id") or ""
        if not base_id:
            continue
        base = index.get((base_id, run.condition)) or index.get((base_id, run.condition.with_template("none")))
        if base is None:
            unpaired.append((run, f"base {base_id} not scored under this condition"))
        else:
            pairs.append((run, base))
    return pairs, unpaired


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


# ------------------------------------------------------------------------------------ inference


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


# ----------------------------------------------------------------------------------------- domains


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


# ----------------------------------------------------------------------------------------- persona


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
