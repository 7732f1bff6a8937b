"""Stage 3: transcripts → token ids + the token positions of every human response.

Two protocols (``SpanRules.protocol``):

``reference`` — exactly the published scripts: tokenise the processed string with special tokens, then
  search left to right for the token ids of `` <<`` and ``>>`` (chat: the template's assistant-turn
  delimiters found from placeholder messages) and label everything in between. Its failure modes are
  kept and counted: a response whose `` <<`` merged into another token is *missed*; a ``>>`` that
  merged with what follows makes the span *run away* to the next standalone ``>>``, swallowing
  context and *merging* the next response. A response is a maximal run of labelled positions.

``robust`` — each response's tokens come from character offsets: the tokens overlapping the
  characters between ``<<`` and ``>>``. A token that also covers marker or context characters is
  kept and reported as a *straddle*. Truncation is by a token budget on the experiment text, never
  inside a response; the persona prefix does not count against the budget; chat mode adds no second
  BOS.

Both give per participant the token ids, a per-token response index (-1 outside any response) and the
counts the audit reports. A position-0 token can never be scored (nothing predicts it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from psych201_jax import conditions
from psych201_jax.conditions import Template
from psych201_jax.data import transcripts
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.types import Excluded, ParticipantSpans, Record, Rejected

__all__ = ["SpanRules", "tokenize_records"]


@dataclasses.dataclass(frozen=True)
class SpanRules:
    """How records become token spans.

    protocol: reference | robust.  template: none | chat (strings are read as the enums).
    max_chars: the reference's character cut (applied after the persona prefix, as it does).
    token_budget: robust only; tokens of experiment text kept (persona prefix excluded). None = no cut.
    """

    protocol: conditions.Protocol = conditions.Protocol.REFERENCE
    template: Template = Template.NONE
    max_chars: int = transcripts.REFERENCE_MAX_CHARS
    token_budget: int | None = None

    def __post_init__(self):
        for name, cls in (("protocol", conditions.Protocol), ("template", Template)):
            value = getattr(self, name)
            if value not in tuple(cls):
                raise ValueError(f"unknown {name} {value!r}; expected one of {tuple(m.value for m in cls)}")
            object.__setattr__(self, name, cls(value))
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"token_budget must be positive, got {self.token_budget}")

    @property
    def chat(self) -> bool:
        return self.template == Template.CHAT


# ---------------------------------------------------------------------------------------------------
# Reference labelling


def _match_starts(ids: np.ndarray, pattern: Sequence[int]) -> np.ndarray:
    """Sorted start indices where ``pattern`` occurs in ``ids`` (overlapping matches included)."""
    m = len(pattern)
    if m == 0 or len(ids) < m:
        return np.zeros(0, dtype=np.int64)
    hits = ids[: len(ids) - m + 1] == pattern[0]
    for j in range(1, m):
        hits &= ids[j : len(ids) - m + 1 + j] == pattern[j]
    return np.flatnonzero(hits)


def reference_labels(ids: np.ndarray, l_id: Sequence[int], r_id: Sequence[int]) -> np.ndarray:
    """bool [T]: positions the reference's ``collate`` labels (greedy left-to-right subsequence search)."""
    n = len(ids)
    labels = np.zeros(n, dtype=bool)
    if not l_id:
        raise ValueError("empty opening-marker id sequence")
    lefts, rights = _match_starts(ids, l_id), _match_starts(ids, r_id)
    i = 0
    while True:
        k = np.searchsorted(lefts, i)
        if k == len(lefts):
            break
        content_start = int(lefts[k]) + len(l_id)
        m = np.searchsorted(rights, content_start)
        end = int(rights[m]) if m < len(rights) else n
        labels[content_start:end] = True
        i = end + len(r_id)
    return labels


def runs_to_response_index(labels: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Maximal runs of labelled positions ≥ 1 → (response index [T], [(start, end)] token runs)."""
    scorable = labels.copy()
    if len(scorable):
        scorable[0] = False  # logits[:-1] vs labels[1:]: position 0 is never scored
    padded = np.concatenate([[False], scorable, [False]]).astype(np.int8)
    edges = np.diff(padded)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    index = np.full(len(labels), -1, dtype=np.int32)
    for r, (a, b) in enumerate(zip(starts, ends)):
        index[a:b] = r
    return index, list(zip(starts.tolist(), ends.tolist()))


def _diagnose_runs(
    runs: list[tuple[int, int]], offsets: np.ndarray, responses: list[tuple[int, int]]
) -> tuple[int, int, int]:
    """(missed, runaway, merged) of labelled token runs against response character ranges."""
    if not responses:
        return 0, len(runs), 0
    cs = np.asarray([s for s, _ in responses])
    ce = np.asarray([e for _, e in responses])
    covered = np.zeros(len(responses), dtype=bool)
    runaway = merged = 0
    for a, b in runs:
        start, end = int(offsets[a, 0]), int(offsets[b - 1, 1])
        first = int(np.searchsorted(ce, start, side="right"))  # first response ending after start
        last = int(np.searchsorted(cs, end, side="left")) - 1  # last response starting before end
        if first > last:
            runaway += 1
            continue
        covered[first : last + 1] = True
        merged += last - first
        if last > first or start < cs[first] or end > ce[last]:
            runaway += 1
    return int((~covered).sum()), runaway, merged


# ---------------------------------------------------------------------------------------------------
# Robust labelling


def offsets_to_response_index(offsets: np.ndarray, responses: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-token response index from character offsets, and which tokens straddle (bool [T]).

    A token belongs to response j when it overlaps j's content characters; zero-width (special)
    tokens belong to none.
    """
    n = len(offsets)
    index = np.full(n, -1, dtype=np.int32)
    if not responses or n == 0:
        return index, np.zeros(n, dtype=bool)
    cs = np.asarray([s for s, _ in responses])
    ce = np.asarray([e for _, e in responses])
    ts, te = offsets[:, 0], offsets[:, 1]
    j = np.searchsorted(ce, ts, side="right")
    valid = (j < len(responses)) & (te > ts)
    jc = np.minimum(j, len(responses) - 1)
    hit = valid & (cs[jc] < te)
    index[hit] = jc[hit]
    return index, hit & ((ts < cs[jc]) | (te > ce[jc]))


def _tokens_ending_by(offsets: np.ndarray, char: int) -> int:
    """Length of the leading run of tokens that end at or before character ``char``."""
    beyond = offsets[:, 1] > char
    return int(np.argmax(beyond)) if beyond.any() else len(offsets)


def _budget_cut(
    index: np.ndarray, offsets: np.ndarray, text_start_char: int, budget: int | None, marker_starts: np.ndarray
) -> int:
    """Token count to keep: prefix tokens + at most ``budget`` text tokens, never cutting a response."""
    n = len(index)
    if budget is None:
        return n
    cut = _tokens_ending_by(offsets, text_start_char) + budget  # prefix and leading BOS are free
    if cut >= n:
        return n
    r = index[cut]
    if r >= 0 and index[cut - 1] == r:
        # The cut falls inside response r: keep only the tokens before its opening marker.
        cut = _tokens_ending_by(offsets, int(marker_starts[r]))
    return cut


# ---------------------------------------------------------------------------------------------------
# Per participant


@dataclasses.dataclass(frozen=True)
class _Prepared:
    text: str  # what gets tokenised
    add_special: bool
    responses: list[tuple[int, int]]  # content character ranges in ``text``
    responses_text: int
    responses_metadata: int  # reference: responses marked inside the persona's metadata values
    lost_chars: int  # responses removed before tokenisation (reference character cut)
    text_start: int  # characters before the experiment text (chat header, persona prefix): outside the budget
    marker_starts: list[int]  # char index of each response's opening marker in ``text``


def _prepare(record: Record, persona: Mapping[str, str] | None, rules: SpanRules, tok: TokenizerInfo) -> _Prepared:
    n_text = record.text.count("<<")
    full, prefix_len = transcripts.with_persona(record.text, persona, rules.protocol)
    if rules.protocol == conditions.Protocol.REFERENCE:
        # As eval_meta.py, the persona's values are prepended as they are: their markers are labelled too,
        # and counted apart from the responses in the text.
        n_meta = full[:prefix_len].count("<<")
        chat = rules.chat
        processed = transcripts.reference_truncate(full, rules.max_chars, chat=chat)
        lost = n_text + n_meta - processed.count("<<")
        if not chat:
            spans = transcripts.response_char_spans(processed)
            return _Prepared(processed, True, spans, n_text, n_meta, lost, 0, [s - 2 for s, _ in spans])
        messages = transcripts.split_into_messages(processed)
        rendered, spans = tok.render_with_spans(messages)
        spans = [s for s, m in zip(spans, messages) if m["role"] == "assistant"]
        return _Prepared(rendered, True, spans, n_text, n_meta, lost, 0, [s for s, _ in spans])
    # robust: the persona's values carry no markers (metadata.persona_prefix breaks them up)
    if not rules.chat:
        spans = transcripts.response_char_spans(full)
        return _Prepared(full, True, spans, n_text, 0, 0, prefix_len, [s - 2 for s, _ in spans])
    text = full + "." if transcripts.ends_with_response(full) else full
    messages = transcripts.split_into_messages(text)
    rendered, all_spans = tok.render_with_spans(messages)
    spans = [s for s, m in zip(all_spans, messages) if m["role"] == "assistant"]
    add = not (tok.bos_token and rendered.startswith(tok.bos_token))
    text_start = all_spans[0][0] + prefix_len  # template header and persona prefix are outside the budget
    return _Prepared(rendered, add, spans, n_text, 0, 0, text_start, [s for s, _ in spans])


def _label(
    record: Record, prep: _Prepared, ids: np.ndarray, offsets: np.ndarray, rules: SpanRules, tok: TokenizerInfo
) -> ParticipantSpans:
    if rules.protocol == conditions.Protocol.REFERENCE:
        l_id, r_id = tok.chat_markers() if rules.chat else (tok.base_l_id, tok.base_r_id)
        labels = reference_labels(ids, l_id, r_id)
        index, runs = runs_to_response_index(labels)
        missed, runaway, merged = _diagnose_runs(runs, offsets, prep.responses)
        return ParticipantSpans(
            study=record.study,
            experiment=record.experiment,
            participant=record.participant,
            token_ids=ids,
            response_index=index,
            n_responses=len(runs),
            responses_text=prep.responses_text,
            responses_metadata=prep.responses_metadata,
            responses_scored=len(runs),
            lost_truncation=prep.lost_chars,
            missed=missed,
            runaway=runaway,
            merged=merged,
            source=record.source,
            line=record.line,
        )
    index, straddling = offsets_to_response_index(offsets, prep.responses)
    cut = _budget_cut(index, offsets, prep.text_start, rules.token_budget, np.asarray(prep.marker_starts))
    straddle = int(straddling[:cut].sum())  # only tokens that are kept
    ids, index = ids[:cut], index[:cut]
    n_kept = len(prep.responses) if cut == len(offsets) else int(index.max(initial=-1)) + 1
    scorable = index[1:]
    scored = int(np.unique(scorable[scorable >= 0]).size)
    missed = n_kept - scored
    index = index.copy()
    if len(index):
        index[0] = -1
    return ParticipantSpans(
        study=record.study,
        experiment=record.experiment,
        participant=record.participant,
        token_ids=ids,
        response_index=index,
        n_responses=n_kept,
        responses_text=prep.responses_text,
        responses_scored=scored,
        lost_truncation=prep.responses_text - n_kept,
        missed=missed,
        straddle=straddle,
        source=record.source,
        line=record.line,
    )


def tokenize_records(
    records: Iterable[Record | Rejected],
    tok: TokenizerInfo,
    rules: SpanRules,
    *,
    persona_of=None,
    batch_size: int = 64,
) -> Iterator[ParticipantSpans | Rejected]:
    """Streams records → ``ParticipantSpans`` or ``Rejected`` (passed through or made here), in input order.

    persona_of: None for no persona, else a function record → the metadata to interview on, None for no
    prefix, or an ``Excluded`` saying why the participant is not in this condition (see
    ``metadata.persona_selector``).
    Texts are encoded in batches of ``batch_size`` (one Rust call, both cores), never across studies.
    """
    pending: list[tuple[Record, _Prepared] | Rejected] = []
    n_prepared = 0

    def flush():
        nonlocal n_prepared
        prepared = [p for p in pending if not isinstance(p, Rejected)]
        encoded = iter(tok.encode_batch([p.text for _, p in prepared], [p.add_special for _, p in prepared]))
        for entry in pending:
            if isinstance(entry, Rejected):
                yield entry
            else:
                ids, offsets = next(encoded)
                yield _label(entry[0], entry[1], ids, offsets, rules, tok)
        pending.clear()
        n_prepared = 0

    for record in records:
        if pending and _study(pending[-1]) != record.study:
            yield from flush()  # batches stay within a study so per-study timings stay honest
        if isinstance(record, Rejected):
            pending.append(record)
            continue
        persona = persona_of(record) if persona_of is not None else None
        if isinstance(persona, Excluded):
            pending.append(_reject(record, f"excluded by the persona condition: {persona.reason}"))
            continue
        try:
            pending.append((record, _prepare(record, persona, rules, tok)))
            n_prepared += 1
        except ValueError as err:
            pending.append(_reject(record, str(err)))
        if n_prepared >= batch_size or len(pending) >= 4 * batch_size:
            yield from flush()
    if pending:
        yield from flush()


def _study(entry: tuple[Record, _Prepared] | Rejected) -> str:
    return entry.study if isinstance(entry, Rejected) else entry[0].study


def _reject(record: Record, reason: str) -> Rejected:
    return Rejected.of(record, reason)
