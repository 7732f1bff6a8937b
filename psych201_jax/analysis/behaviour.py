"""Simulated participants (issue 30, item 4): metrics that judge sampled responses against the human ones.

A simulated participant is a human transcript in which every response slot ``<<...>>`` also holds k responses
sampled from a model given the transcript up to that slot. Per study this module classifies the responses
(``responses.classify_study``: category, ordinal, number or free text, from the human responses only, so
every model gets the same type) and computes:

  * the exact-match rate of samples to the human response (every type);
  * the fair CRPS of the samples against the human value (ordinal and number);
  * pooled samples against pooled human responses: total variation and Jensen–Shannon (category), the
    1-Wasserstein distance (ordinal and number), each with a percentile bootstrap CI over participants;
  * diversity: per-slot entropy (bits) and number of distinct samples, against the human spread across
    participants at the same slot.

``paired_differences`` compares a post-trained model with its base (or a stage with the previous one: a stage
chain is consecutive pairs, ``pairs.Chain.steps``) as post − base per metric, mean over the studies both have,
with a bootstrap CI over studies. Pure numpy/scipy, no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import scipy.sparse

from psych201_jax.analysis.responses import (
    Key,
    ResponseType,
    classify_study,
    crps_fair,
    entropy_bits,
    jensen_shannon,
    normalise,
    parse_number,
    total_variation,
    wasserstein_on_grid,
)
from psych201_jax.analysis.stats import bootstrap_ci, nanmean


@dataclasses.dataclass(frozen=True)
class Slot:
    """One human response and the k sampled responses at its place (texts without the ``>>`` marker; a sample
    that never produced the marker is the text generated up to the length limit)."""

    human: str
    samples: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SimulatedParticipant:
    """One human participant's transcript with samples at every response slot, slots in text order."""

    study: str
    experiment: str
    participant: str
    slots: tuple[Slot, ...]


# ------------------------------------------------------------------------------------- per-study metrics


def exact_match_rate(participants: Sequence[SimulatedParticipant], kind: ResponseType) -> float:
    """EM = mean over slots with samples of (1/k) Σ_i [normalise(x_i) == normalise(y)]; an unparsable sample of a
    numeric study counts as a miss. NaN when no slot has samples."""
    rates = [
        np.mean([normalise(x, kind) == human for x in s.samples])
        for p in participants
        for s in p.slots
        if s.samples
        for human in (normalise(s.human, kind),)
    ]
    return float(np.mean(rates)) if rates else math.nan


@dataclasses.dataclass(frozen=True)
class CrpsResult:
    """Mean fair CRPS over the slots it is defined on (n_slots); n_skipped_slots: slots whose human response
    does not parse or with fewer than 2 parsable samples; n_unparsable_samples: samples that do not parse
    (excluded from their slot's CRPS, never read as 0)."""

    crps: float
    n_slots: int
    n_skipped_slots: int
    n_unparsable_samples: int


def study_crps(participants: Sequence[SimulatedParticipant]) -> CrpsResult:
    """CRPS = mean over slots of ``crps_fair``(parsable samples; human value)."""
    values, skipped, unparsable = [], 0, 0
    for s in (s for p in participants for s in p.slots):
        parsed = [parse_number(x) for x in s.samples]
        xs = [x for x in parsed if x is not None]
        unparsable += len(parsed) - len(xs)
        y = parse_number(s.human)
        if y is None or len(xs) < 2:
            skipped += 1
        else:
            values.append(crps_fair(xs, y))
    return CrpsResult(float(np.mean(values)) if values else math.nan, len(values), skipped, unparsable)


@dataclasses.dataclass(frozen=True)
class PooledDistance:
    """A distance between pooled samples and pooled human responses, and its bootstrap CI over participants."""

    value: float
    ci: tuple[float, float]


def _pools(
    participants: Sequence[SimulatedParticipant], key: Callable[[str], Key | None]
) -> tuple[list, scipy.sparse.csr_matrix, scipy.sparse.csr_matrix]:
    """(sorted support, human weights [P, V], sample weights [P, V]): per participant each included human
    response weighs 1 and each slot's included samples weigh 1 in all (1/k' each), so a slot counts once in
    either pool. ``key`` gives None for a response to leave out."""
    support: dict[Key, int] = {}
    rows: tuple[list, list] = ([], [])
    cols: tuple[list, list] = ([], [])
    weights: tuple[list, list] = ([], [])
    for i, p in enumerate(participants):
        for s in p.slots:
            xs = [k for k in (key(x) for x in s.samples) if k is not None]
            h = key(s.human)
            for side, ks, w in ((0, [] if h is None else [h], 1.0), (1, xs, 1.0 / max(len(xs), 1))):
                for k in ks:
                    rows[side].append(i)
                    cols[side].append(support.setdefault(k, len(support)))
                    weights[side].append(w)
    order = sorted(support, key=lambda k: (str(type(k)), k))
    remap = np.empty(len(support), np.int64)
    remap[[support[k] for k in order]] = np.arange(len(order))
    shape = (len(participants), len(order))
    human, samples = (
        scipy.sparse.csr_matrix((weights[i], (rows[i], remap[np.asarray(cols[i], np.int64)])), shape=shape)
        for i in (0, 1)
    )
    return order, human, samples


def _bootstrap_pools(
    human: scipy.sparse.csr_matrix,
    samples: scipy.sparse.csr_matrix,
    stat: Callable[[np.ndarray, np.ndarray], np.ndarray],
    n_boot: int,
    seed: int,
    level: float,
) -> PooledDistance:
    """stat(pooled samples, pooled human) and its percentile bootstrap CI (the conventions of
    ``stats.bootstrap_ci``): participants are drawn with replacement (``np.random.default_rng(seed)``), the pools
    are re-summed over the drawn participants and the statistic recomputed; draws whose pools are empty (NaN) are
    dropped (a draw of only participants without, say, a parsable sample). Fewer than 2 participants, a NaN point
    estimate or no defined draw give a (NaN, NaN) CI."""
    n, v = human.shape
    point = float(stat(np.asarray(samples.sum(0)).ravel(), np.asarray(human.sum(0)).ravel())) if v else math.nan
    if n < 2 or n_boot < 1 or math.isnan(point):
        return PooledDistance(point, (math.nan, math.nan))
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n, size=(n_boot, n))
    out = np.empty(n_boot)
    block = max(1, 2_000_000 // max(v, n))  # bounds the dense [block, V] pools
    for start in range(0, n_boot, block):
        d = drawn[start : start + block]
        flat = (d + n * np.arange(len(d))[:, None]).ravel()
        times = np.bincount(flat, minlength=len(d) * n).reshape(len(d), n).astype(np.float64)  # draws of each
        out[start : start + block] = stat(np.asarray(samples.T @ times.T).T, np.asarray(human.T @ times.T).T)
    out = out[~np.isnan(out)]
    if out.size == 0:
        return PooledDistance(point, (math.nan, math.nan))
    lo, hi = np.percentile(out, [50 * (1 - level), 50 * (1 + level)])
    return PooledDistance(point, (float(lo), float(hi)))


def pooled_categories(
    participants: Sequence[SimulatedParticipant], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[PooledDistance, PooledDistance]:
    """(TV, JS) between the pooled sample categories and the pooled human categories (case-folded, ``_pools``
    weights), each with its bootstrap CI over participants."""
    _, human, samples = _pools(participants, lambda t: normalise(t, ResponseType.CATEGORY))
    return (
        _bootstrap_pools(human, samples, total_variation, n_boot, seed, level),
        _bootstrap_pools(human, samples, jensen_shannon, n_boot, seed, level),
    )


def pooled_wasserstein(
    participants: Sequence[SimulatedParticipant], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> PooledDistance:
    """W1 = ∫ |F_samples − F_human| between the pooled parsable sample values and the pooled parsable human values
    (``_pools`` weights; unparsable ones left out), with its bootstrap CI over participants. In the study's unit."""
    grid, human, samples = _pools(participants, parse_number)
    return _bootstrap_pools(human, samples, wasserstein_on_grid(np.asarray(grid, np.float64)), n_boot, seed, level)


@dataclasses.dataclass(frozen=True)
class Diversity:
    """sample_entropy (bits) / sample_distinct: means over slots with samples of the entropy and the number of
    distinct normalised samples; human_entropy / human_distinct: the same over the human responses of all
    participants at one slot position (experiment, slot index), averaged over the n_human_positions positions
    with ≥ 2 participants."""

    sample_entropy: float
    sample_distinct: float
    human_entropy: float
    human_distinct: float
    n_human_positions: int


def diversity(participants: Sequence[SimulatedParticipant], kind: ResponseType) -> Diversity:
    """Per-slot entropy_bits and distinct counts of ``normalise``d samples (an unparsable sample of a numeric study
    is a response of its own), against the human spread. Positions are keyed by experiment as well: the same
    index in two experiments of a study is a different question. Plug-in entropy grows with the number of
    responses (at most log2 k for k samples, log2 n for n participants), so compare like sizes."""
    slots = [[normalise(x, kind) for x in s.samples] for p in participants for s in p.slots if s.samples]
    positions: dict[tuple[str, int], list[Key]] = {}
    for p in participants:
        for i, s in enumerate(p.slots):
            positions.setdefault((p.experiment, i), []).append(normalise(s.human, kind))
    humans = [h for h in positions.values() if len(h) >= 2]
    return Diversity(
        nanmean(entropy_bits(x) for x in slots),
        nanmean(len(set(x)) for x in slots),
        nanmean(entropy_bits(h) for h in humans),
        nanmean(len(set(h)) for h in humans),
        len(humans),
    )


# ------------------------------------------------------------------------------------------ one study

_NO_DISTANCE = PooledDistance(math.nan, (math.nan, math.nan))


@dataclasses.dataclass(frozen=True)
class StudyBehaviour:
    """A model's sampled behaviour on one study. Metrics a type does not have are NaN: crps and wasserstein for
    ordinal and number only, tv and js for category only. *_scaled divide by human_sd, the SD of the pooled
    parsable human values, so that studies in different units can be averaged."""

    study: str
    kind: ResponseType
    n_participants: int
    n_slots: int
    n_samples: int
    n_unparsable_samples: int  # numeric types: samples that do not parse (excluded from crps and wasserstein)
    n_unparsable_human: int  # numeric types: human responses that do not parse (likewise excluded)
    exact_match: float
    crps: CrpsResult
    human_sd: float
    tv: PooledDistance
    js: PooledDistance
    wasserstein: PooledDistance
    diversity: Diversity

    def _scaled(self, value: float) -> float:
        return value / self.human_sd if self.human_sd > 0 else math.nan

    @property
    def crps_scaled(self) -> float:
        return self._scaled(self.crps.crps)

    @property
    def wasserstein_scaled(self) -> float:
        return self._scaled(self.wasserstein.value)

    def metric(self, name: str) -> float:
        """One of ``PAIRED_METRICS`` by name."""
        values = {
            "exact_match": self.exact_match,
            "crps": self.crps.crps,
            "crps_scaled": self.crps_scaled,
            "tv": self.tv.value,
            "js": self.js.value,
            "wasserstein": self.wasserstein.value,
            "wasserstein_scaled": self.wasserstein_scaled,
            "sample_entropy": self.diversity.sample_entropy,
            "sample_distinct": self.diversity.sample_distinct,
        }
        return values[name]

    def as_row(self) -> dict[str, str | int | float]:
        """Flat CSV row (CIs as *_lo / *_hi)."""
        row: dict[str, str | int | float] = {
            "study": self.study,
            "kind": str(self.kind),
            "n_participants": self.n_participants,
            "n_slots": self.n_slots,
            "n_samples": self.n_samples,
            "n_unparsable_samples": self.n_unparsable_samples,
            "n_unparsable_human": self.n_unparsable_human,
            "exact_match": self.exact_match,
            "crps": self.crps.crps,
            "crps_scaled": self.crps_scaled,
            "crps_slots": self.crps.n_slots,
            "crps_skipped_slots": self.crps.n_skipped_slots,
            "human_sd": self.human_sd,
        }
        for name, d in (("tv", self.tv), ("js", self.js), ("wasserstein", self.wasserstein)):
            row.update({name: d.value, f"{name}_lo": d.ci[0], f"{name}_hi": d.ci[1]})
        row["wasserstein_scaled"] = self.wasserstein_scaled
        row.update(dataclasses.asdict(self.diversity))
        return row


def study_behaviour(
    participants: Sequence[SimulatedParticipant],
    *,
    options: Sequence[str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> StudyBehaviour:
    """Every metric of one study's simulated participants (all of one study); the type from ``classify_study``
    of the human responses (and ``options``, the study's discrete options, when known)."""
    studies = {p.study for p in participants}
    if len(studies) != 1:
        raise ValueError(f"study_behaviour takes the participants of one study, got studies {sorted(studies)}")
    slots = [s for p in participants for s in p.slots]
    kind = classify_study([s.human for s in slots], options)
    crps, wasserstein, tv_js = CrpsResult(math.nan, 0, 0, 0), _NO_DISTANCE, (_NO_DISTANCE, _NO_DISTANCE)
    human_values = [v for v in (parse_number(s.human) for s in slots) if v is not None]
    if kind.numeric:
        crps = study_crps(participants)
        wasserstein = pooled_wasserstein(participants, n_boot, seed, level)
    elif kind is ResponseType.CATEGORY:
        tv_js = pooled_categories(participants, n_boot, seed, level)
    return StudyBehaviour(
        study=studies.pop(),
        kind=kind,
        n_participants=len(participants),
        n_slots=len(slots),
        n_samples=sum(len(s.samples) for s in slots),
        n_unparsable_samples=crps.n_unparsable_samples,
        n_unparsable_human=len(slots) - len(human_values) if kind.numeric else 0,
        exact_match=exact_match_rate(participants, kind),
        crps=crps,
        human_sd=float(np.std(human_values)) if kind.numeric and human_values else math.nan,
        tv=tv_js[0],
        js=tv_js[1],
        wasserstein=wasserstein,
        diversity=diversity(participants, kind),
    )


def behaviour_by_study(
    participants: Sequence[SimulatedParticipant],
    *,
    options: Mapping[str, Sequence[str]] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, StudyBehaviour]:
    """Study → ``study_behaviour`` of its participants (studies sorted); options: study → its discrete options."""
    by: dict[str, list[SimulatedParticipant]] = {}
    for p in participants:
        by.setdefault(p.study, []).append(p)
    return {
        s: study_behaviour(ps, options=(options or {}).get(s), n_boot=n_boot, seed=seed, level=level)
        for s, ps in sorted(by.items())
    }


# ------------------------------------------------------------------------------------------------ pairs

PAIRED_METRICS = (
    "exact_match",
    "crps",
    "crps_scaled",
    "tv",
    "js",
    "wasserstein",
    "wasserstein_scaled",
    "sample_entropy",
    "sample_distinct",
)


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """mean over the n_studies common studies where both are defined of post − base, its bootstrap CI over
    studies (``stats.bootstrap_ci``), and the per-study differences."""

    metric: str
    mean: float
    ci: tuple[float, float]
    n_studies: int
    per_study: tuple[tuple[str, float], ...]

    def as_row(self) -> dict[str, str | int | float]:
        return {
            "metric": self.metric,
            "mean_diff": self.mean,
            "ci_lo": self.ci[0],
            "ci_hi": self.ci[1],
            "n_studies": self.n_studies,
        }


def paired_differences(
    post: Mapping[str, StudyBehaviour],
    base: Mapping[str, StudyBehaviour],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[PairedDifference, ...]:
    """Per ``PAIRED_METRICS`` metric, post − base over the studies both have (study → ``study_behaviour``). A
    negative sample_entropy difference: post-training narrowed the sampled distribution; a positive exact_match
    difference: it matches the human response more often. A stage chain is its consecutive (stage, previous)
    pairs. Both sides must give a study the same type (it comes from the human responses, so they do)."""
    common = sorted(set(post) & set(base))
    for s in common:
        if post[s].kind != base[s].kind:
            raise ValueError(f"study {s}: post is {post[s].kind}, base is {base[s].kind}")
    out = []
    for metric in PAIRED_METRICS:
        diffs = tuple((s, post[s].metric(metric) - base[s].metric(metric)) for s in common)
        diffs = tuple((s, d) for s, d in diffs if not math.isnan(d))
        values = [d for _, d in diffs]
        out.append(
            PairedDifference(metric, nanmean(values), bootstrap_ci(values, n_boot, seed, level), len(values), diffs)
        )
    return tuple(out)
