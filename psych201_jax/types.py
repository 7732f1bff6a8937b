"""The data that flows between stages, numpy only: participant identity, records, rejections, spans, results.

Every stage passes these frozen, keyword-only dataclasses; nothing here imports jax, so the data
stage, the results store and the analysis can use them without the accelerator stack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

ParticipantKey = tuple[str, str, str]  # (study, experiment, participant): raw files reuse ids across experiments
InputId = tuple[str, int]  # (source, line): one input line, unique even for malformed lines and duplicates

# Per-participant counts of the token-span stage, in the order the audit and the results table report them.
SPAN_COUNTERS = (
    "responses_text",
    "responses_metadata",
    "responses_scored",
    "lost_truncation",
    "missed",
    "runaway",
    "merged",
    "straddle",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record:
    """One participant's session, ready for the transcript stage."""

    study: str
    experiment: str
    participant: str
    text: str
    metadata: Mapping[str, str]  # the 25 canonical columns, "N/A" when missing
    source: str
    line: int  # 1-based line (jsonl) or row (parquet / dataset) in ``source``

    @property
    def key(self) -> ParticipantKey:
        return (self.study, self.experiment, self.participant)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rejected:
    """An input line that cannot be scored, and why."""

    study: str
    experiment: str
    participant: str
    source: str
    line: int
    reason: str

    @property
    def key(self) -> ParticipantKey:
        return (self.study, self.experiment, self.participant)

    @classmethod
    def of(cls, item: Record | ParticipantSpans, reason: str) -> Rejected:
        """The rejection of a record (or of its spans) with ``reason``."""
        return cls(
            study=item.study,
            experiment=item.experiment,
            participant=item.participant,
            source=item.source,
            line=item.line,
            reason=reason,
        )

    def describe(self) -> str:
        return (
            f"study {self.study!r}, participant {self.participant!r} ({self.source}, line {self.line}): {self.reason}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Excluded:
    """A condition's verdict that a participant is not part of it (e.g. no metadata for a persona)."""

    reason: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParticipantSpans:
    """One participant's tokens and response positions.

    token_ids:      int32 [T]
    response_index: int32 [T]; response number (0 … n_responses-1, text order) of each token, -1 outside.
    responses_text: responses (``<<``) in the record's text.
    responses_metadata: reference with a persona: responses marked inside the persona's metadata values,
      which the study's eval_meta.py labels like the others (robust breaks such markers up: always 0).
    responses_scored: responses with at least one scorable token (position ≥ 1).
    lost_truncation: responses cut off by the character cut (reference) or token budget (robust).
    missed / runaway / merged: reference failure modes (see ``data.spans``); straddle: robust tokens
      that cover marker or context characters too.
    """

    study: str
    experiment: str
    participant: str
    token_ids: np.ndarray
    response_index: np.ndarray
    n_responses: int
    responses_text: int
    responses_scored: int
    lost_truncation: int
    responses_metadata: int = 0
    missed: int = 0
    runaway: int = 0
    merged: int = 0
    straddle: int = 0
    source: str = ""
    line: int = 0

    @property
    def key(self) -> ParticipantKey:
        return (self.study, self.experiment, self.participant)

    def counters(self) -> dict[str, int]:
        """The ``SPAN_COUNTERS`` of this participant."""
        return {name: int(getattr(self, name)) for name in SPAN_COUNTERS}

    @property
    def warnings(self) -> tuple[str, ...]:
        out = []
        if self.responses_metadata:
            out.append(f"{self.responses_metadata} response(s) marked inside the persona's metadata scored")
        if self.missed:
            out.append(f"{self.missed} response(s) missed by the marker-token search")
        if self.runaway:
            out.append(f"{self.runaway} span(s) run past their response")
        if self.merged:
            out.append(f"{self.merged} response(s) merged into a neighbouring span")
        if self.straddle:
            out.append(f"{self.straddle} token(s) straddle a marker")
        return tuple(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParticipantResult:
    """One scored participant.

    nll      float64 [R]  summed NLL per response (R = spans.n_responses); NaN if nothing was scorable.
    n_scored int32 [R]    scored tokens per response.
    argmax   int32 [S]    the model's top token at each of the S scored tokens (text order).
    target   int32 [S]    the human token at those positions.
    option_argmax int32 [S] or None   the top token among the study's options at those positions (-1: the
                          study has none); None when the scorer has no options.
    nll_t    float64 [R, nT] or None   summed NLL per response under softmax(logits / T) for each temperature
                          of the scorer's grid; None without a grid.
    entropy  float64 [R] or None       summed entropy (nats) of the T = 1 distribution at the response's tokens.
    option_mass float64 [R] or None    summed probability (T = 1) of the study's options at its tokens
                          (with options and a grid).
    """

    spans: ParticipantSpans
    nll: np.ndarray
    n_scored: np.ndarray
    argmax: np.ndarray
    target: np.ndarray
    option_argmax: np.ndarray | None = None
    nll_t: np.ndarray | None = None
    entropy: np.ndarray | None = None
    option_mass: np.ndarray | None = None

    @property
    def key(self) -> ParticipantKey:
        return self.spans.key

    @property
    def study(self) -> str:
        return self.spans.study


@dataclasses.dataclass(frozen=True, kw_only=True)
class GeneratedResponse:
    """One sampled response: ``tokens`` int32 and ``text`` without the closing marker or stop token;
    ``logprob`` the model's (T = 1) log-probability of everything drawn, the marker or stop token included;
    ``stop``: ``marker``, ``token`` (EOS) or ``length`` (max_new_tokens reached, not stopped)."""

    tokens: np.ndarray
    text: str
    logprob: float
    stop: str

    @property
    def stopped(self) -> bool:
        return self.stop != "length"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlotDraws:
    """The samples of one response slot: ``response`` its number (text order), ``human`` and
    ``human_tokens`` (int32) the human's response as the scorer labels it, ``temperature`` the one drawn at."""

    response: int
    human: str
    human_tokens: np.ndarray
    temperature: float
    samples: tuple[GeneratedResponse, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParticipantSamples:
    """One simulated participant: every response slot's samples, in text order."""

    spans: ParticipantSpans
    slots: tuple[SlotDraws, ...]

    @property
    def key(self) -> ParticipantKey:
        return self.spans.key

    @property
    def study(self) -> str:
        return self.spans.study


def input_id(item: Record | Rejected | ParticipantSpans | ParticipantResult | ParticipantSamples) -> InputId:
    """(source, line) of the input line an item came from."""
    if isinstance(item, (ParticipantResult, ParticipantSamples)):
        item = item.spans
    return (item.source, item.line)
