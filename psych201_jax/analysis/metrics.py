"""Runs and model scores: the reference study's per-study and per-model numbers.

Everything here is pure (no I/O): a ``Run`` is built from a manifest dict and row dicts
(``psych201_jax.runs.store``), and every function maps runs to numbers or plain row dicts.

Reference metrics (docs/reference-protocol.md, "Accuracy" and "Merge and aggregation"):
  * model score = mean over studies of the response-pooled mean NLL (studies weigh equally);
  * accuracy: per token (argmax == human token), pooled per study, mean over studies.
Pairs, domains and persona are in ``pairs``, ``domains`` and ``persona``; the shared statistics in ``stats``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import numpy as np

from psych201_jax.analysis.stats import Moments, bernoulli_moments, moments, nanmean
from psych201_jax.conditions import Condition, ModelInfo

DDOF_MODES = ("reference", "0", "1")


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

    info: the manifest's ``config.model_info`` (hf_id, family, generation, size_b, kind, base_hf_id, stage, chain;
    results written before stage and chain existed read them as "").
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
    model_fingerprint: str = ""  # the scored weights' hashes (``model_fingerprint``); "" when the manifest has none
    options: str = "none"  # the head's option mode: "none" (a plain run) or "study" (an accuracy run)

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


def model_fingerprint(manifest: dict) -> str:
    """What identifies the scored weights: the manifest's ``determinants.model_sources`` (the converted
    checkpoint's source hashes), else ``model.provenance.sha256``, as canonical JSON; "" when neither is there
    (results written before manifests carried them, or by the test helpers)."""
    sources = manifest.get("determinants", {}).get("model_sources")
    if not sources:
        sources = (manifest.get("model", {}).get("provenance") or {}).get("sha256")
    return json.dumps(sources, sort_keys=True) if sources else ""


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
            per_response = np.asarray(row.get("n_scored") or [], dtype=np.int64)
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
        model_fingerprint=model_fingerprint(manifest),
        options=str(manifest.get("config", {}).get("options") or "none"),
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
