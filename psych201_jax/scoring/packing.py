"""Pack participants into fixed-shape rows and build the scoring plan (pure numpy, deterministic).

A participant is any object with ``key`` (a unique, sortable, hashable id such as a str or a tuple of
str; kept as given), ``token_ids`` (int [T]), ``response_index``
(int [T]: the response number 0..R-1 each token belongs to, -1 outside responses) and ``n_responses``
(R). Token t is scored iff t >= 1 and ``response_index[t] >= 0``; it is predicted from the hidden state
at t-1 (causal shift), so a response token at t = 0 is reported as unscorable.

Participants are packed best-fit-decreasing into rows of the largest row length; the few leftover rows
that do not fill a whole batch are re-packed into the cheapest (row length, power-of-two rows) shape.
Every batch therefore has one of a few static shapes (rows B, row length L, plan capacity C), so the
number of compilations is O(number of row lengths x capacities), never O(participants).
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Hashable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from jaxtyping import Bool, Int

if TYPE_CHECKING:  # the head's output class; this module stays numpy only
    from psych201_jax.scoring.head import HeadOutputs


@dataclasses.dataclass(frozen=True)
class Segment:
    """One participant in a batch: its tokens are ``tokens[row, start:start + length]``."""

    key: Hashable
    row: int
    start: int
    length: int
    n_responses: int


@dataclasses.dataclass(frozen=True, eq=False)
class PackedBatch:
    """One static-shape batch and its scoring plan.

    Device arrays (B rows of length L, plan capacity C):
      tokens       int32 [B, L]  token ids, 0 in padding.
      segment_ids  int32 [B, L]  1..k for the k participants of a row, 0 = padding.
      positions    int32 [B, L]  position within the participant (0 at each segment start), 0 in padding.
      score_index  int32 [C]     flat index row * L + t - 1 into the [B * L] hidden states predicting t.
      score_target int32 [C]     token id at t.
      score_slot   int32 [C]     response slot 0..len(slot_keys)-1 of the entry (0 for padding).
      score_valid  bool  [C]     False for padding entries.
    Host-side bookkeeping:
      score_position int32 [C]   t, the token's position within its participant (-1 for padding).
      slot_keys      slot -> (participant key, response number).
      row_keys       row -> participant keys in segment order (segment id s is ``row_keys[row][s - 1]``).
      segments       every participant of the batch with its row and offset.
      unscorable     (key, response number) of response tokens at position 0 (first pass only).
      real_tokens    participant tokens first computed in this batch (0 for an overflow pass).
      overflow_pass  0, or k > 0 when this batch re-runs the same rows to score plan entries that
                     did not fit the capacity of the previous k passes.
    """

    tokens: Int[np.ndarray, "b l"]
    segment_ids: Int[np.ndarray, "b l"]
    positions: Int[np.ndarray, "b l"]
    score_index: Int[np.ndarray, " c"]
    score_target: Int[np.ndarray, " c"]
    score_slot: Int[np.ndarray, " c"]
    score_valid: Bool[np.ndarray, " c"]
    score_position: Int[np.ndarray, " c"]
    slot_keys: tuple[tuple[Hashable, int], ...]
    row_keys: tuple[tuple[Hashable, ...], ...]
    segments: tuple[Segment, ...]
    unscorable: tuple[tuple[Hashable, int], ...]
    real_tokens: int
    overflow_pass: int

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def row_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def capacity(self) -> int:
        return self.score_index.shape[0]

    @property
    def computed_tokens(self) -> int:
        return self.tokens.size

    @property
    def n_scored(self) -> int:
        return int(self.score_valid.sum())


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParticipantScores:
    """Unpacked head outputs of one participant, by the ``HeadOutputs`` names (None: not computed).

    n_scored      int32 [R]         scored tokens per response.
    Per response (the slot sums, NaN for a response with no scored token):
    nll           float64 [R]       summed NLL.
    nll_t         float64 [R, nT]   summed NLL per temperature.
    entropy       float64 [R]       summed T = 1 entropy.
    option_mass   float64 [R]       summed T = 1 probability of the study's option set.
    Per token position t (-1 where t is not scored):
    argmax        int32 [T]         the model's top token predicted for t.
    option_argmax int32 [T]         the top token among the study's option set (-1 also where it has none).
    """

    n_scored: np.ndarray
    nll: np.ndarray
    argmax: np.ndarray
    option_argmax: np.ndarray | None = None
    nll_t: np.ndarray | None = None
    entropy: np.ndarray | None = None
    option_mass: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _Item:
    key: Hashable
    tokens: np.ndarray
    responses: np.ndarray
    n_responses: int

    @property
    def length(self) -> int:
        return len(self.tokens)


def choose_row_lengths(max_len: int, min_len: int = 2048) -> tuple[int, ...]:
    """Eighth-octave lengths ((8 + j) / 8 times a power of two, j = 0..7) from ``min_len`` below ``max_len``,
    plus ``max_len`` (the model context or the longest row).

    Full batches use the longest rows; the tail of each chunk takes the cheapest of these. Powers of two
    alone left a small job's or a chunk's tail up to half padding (4 transcripts of 8.6K tokens: 34.5K
    tokens in a 65,536-token row); eighth-octave steps bound a single row's padding to 11% (the 34.5K
    tokens fill a 36,864-token row; quarter-octave steps gave a 40,960-token row, 16% more body work).
    """
    if max_len < 1 or min_len < 1:
        raise ValueError(f"row lengths must be positive, got max_len={max_len}, min_len={min_len}")
    lengths: list[int] = []
    power = 1 << (min_len - 1).bit_length()
    while power < max_len:
        lengths.extend(n for n in (power * (8 + j) // 8 for j in range(8)) if n < max_len)
        power *= 2
    return tuple(lengths) + (max_len,)


def pack(
    participants: Iterable,
    row_lengths: Sequence[int],
    *,
    tokens_per_batch: int = 65536,
    capacity: int | None = None,
    min_capacity: int = 256,
) -> list[PackedBatch]:
    """Pack participants into static-shape batches with their scoring plans.

    A batch of row length L has ``max(1, tokens_per_batch // L)`` rows, except the final leftover batch,
    which may use a power of two fewer rows. Plan capacity: ``capacity`` if given, with entries beyond it
    scored by overflow passes (extra batches re-running the same rows, see ``PackedBatch.overflow_pass``);
    otherwise each batch's scored-token count rounded up to a quarter-octave step (1, 1.25, 1.5 or 1.75
    times a power of two, so at most 25% of the log-prob head is padding) and at least ``min_capacity``.
    The output depends only on the set of participants, not on their order.
    """
    row_lengths = sorted(set(int(n) for n in row_lengths))
    if not row_lengths or row_lengths[0] < 1:
        raise ValueError(f"row_lengths must be positive, got {row_lengths}")
    if tokens_per_batch < 1 or (capacity is not None and capacity < 1) or min_capacity < 1:
        raise ValueError("tokens_per_batch, capacity and min_capacity must be positive")
    items = sorted(_validate(participants, row_lengths[-1]), key=lambda it: (-it.length, it.key))
    batches = []
    for length, rows in _layout(items, row_lengths, tokens_per_batch):
        batches.extend(_materialize(rows, length, capacity, min_capacity))
    return batches


def packing_stats(batches: Sequence[PackedBatch]) -> dict:
    """Real vs computed tokens (efficiency), scored tokens and the distinct (B, L, C) shapes."""
    real = sum(b.real_tokens for b in batches)
    computed = sum(b.computed_tokens for b in batches)
    return {
        "batches": len(batches),
        "real_tokens": real,
        "computed_tokens": computed,
        "efficiency": real / computed if computed else 1.0,
        "scored_tokens": sum(b.n_scored for b in batches),
        "plan_entries": sum(b.capacity for b in batches),
        "overflow_passes": sum(b.overflow_pass > 0 for b in batches),
        "shapes": sorted({(b.rows, b.row_length, b.capacity) for b in batches}),
    }


def unpack(
    batches: Sequence[PackedBatch], outputs: Sequence[HeadOutputs[np.ndarray]]
) -> dict[Hashable, ParticipantScores]:
    """Per-participant results from per-batch head outputs (host copies), one field per computed output.

    ``outputs[i]``: batch i's ``HeadOutputs``, every batch with the same outputs computed. Its per-slot
    outputs ([>= len(slot_keys), ...] slot sums; trailing axes, such as one per temperature, are kept) are
    summed per response in float64, overflow passes of the same rows included; its per-entry outputs ([C])
    are placed at the entries' token positions.
    """
    results: dict[Hashable, ParticipantScores] = {}
    if not batches:
        return results
    first = outputs[0]
    trailing = {name: np.shape(x)[1:] for name, x in first.slot_sums().items()}
    for batch in batches:
        for seg in batch.segments:
            if seg.key not in results:
                results[seg.key] = ParticipantScores(
                    n_scored=np.zeros(seg.n_responses, np.int32),
                    **{name: np.zeros((seg.n_responses, *shape), np.float64) for name, shape in trailing.items()},
                    **{name: np.full(seg.length, -1, np.int32) for name in first.entry_values()},
                )
    for batch, out in zip(batches, outputs, strict=True):
        sums = {name: np.asarray(x, np.float64) for name, x in out.slot_sums().items()}
        values = {name: np.asarray(x) for name, x in out.entry_values().items()}
        valid = batch.score_valid
        counts = np.bincount(batch.score_slot[valid], minlength=len(batch.slot_keys))
        for slot, (key, response) in enumerate(batch.slot_keys):
            scores = results[key]
            scores.n_scored[response] += counts[slot]
            for name, x in sums.items():
                getattr(scores, name)[response] += x[slot]
        owner_ids: dict[Hashable, int] = {}
        slot_owner = np.array([owner_ids.setdefault(key, len(owner_ids)) for key, _ in batch.slot_keys], np.int64)
        entries = np.flatnonzero(valid)
        entry_owner = slot_owner[batch.score_slot[entries]]
        for key, owner in owner_ids.items():
            mine = entries[entry_owner == owner]
            for name, x in values.items():
                getattr(results[key], name)[batch.score_position[mine]] = x[mine]
    for scores in results.values():
        for name in trailing:
            getattr(scores, name)[scores.n_scored == 0] = np.nan
    return results


def _validate(participants: Iterable, max_row: int) -> list[_Item]:
    items, seen = [], set()
    for p in participants:
        key = p.key
        if key in seen:
            raise ValueError(f"duplicate participant key {key!r}")
        seen.add(key)
        tokens = np.asarray(p.token_ids, dtype=np.int32)
        responses = np.asarray(p.response_index, dtype=np.int32)
        n_responses = int(p.n_responses)
        if tokens.ndim != 1 or responses.shape != tokens.shape:
            raise ValueError(
                f"participant {key!r}: token_ids {tokens.shape} and response_index "
                f"{responses.shape} must be 1-D of equal length"
            )
        if len(tokens) > max_row:
            raise ValueError(
                f"participant {key!r} has {len(tokens)} tokens, more than the largest row "
                f"length {max_row}; truncate it before packing"
            )
        if responses.size and (responses.min() < -1 or responses.max() >= n_responses):
            raise ValueError(f"participant {key!r}: response_index outside [-1, {n_responses})")
        items.append(_Item(key, tokens, responses, n_responses))
    return items


def _best_fit_decreasing(items: Sequence[_Item], row_length: int) -> list[list[_Item]]:
    """Place each item (already sorted by decreasing length) in the fullest row it fits."""
    rows: list[list[_Item]] = []
    free: list[tuple[int, int]] = []  # sorted (free tokens, row id); ties go to the oldest row
    for item in items:
        j = bisect.bisect_left(free, (item.length, -1))
        if j < len(free):
            room, row = free.pop(j)
        else:
            room, row = row_length, len(rows)
            rows.append([])
        rows[row].append(item)
        bisect.insort(free, (room - item.length, row))
    return rows


def _rows_per_batch(length: int, tokens_per_batch: int) -> int:
    return max(1, tokens_per_batch // length)


def _layout(
    items: Sequence[_Item], row_lengths: Sequence[int], tokens_per_batch: int
) -> list[tuple[int, list[list[_Item]]]]:
    """(row length, rows) per batch: full batches of the largest rows, then the cheapest tail shape."""
    longest = row_lengths[-1]
    per_batch = _rows_per_batch(longest, tokens_per_batch)
    rows = sorted(_best_fit_decreasing(items, longest), key=lambda r: -sum(it.length for it in r))
    n_full = (len(rows) - 1) // per_batch * per_batch  # the least-filled rows always go to the tail
    layout = [(longest, rows[i : i + per_batch]) for i in range(0, n_full, per_batch)]
    tail = sorted((it for row in rows[n_full:] for it in row), key=lambda it: (-it.length, it.key))
    if not tail:
        return layout
    best = None
    for length in row_lengths:
        if length < tail[0].length:
            continue
        tail_rows = _best_fit_decreasing(tail, length)
        per_batch = min(_rows_per_batch(length, tokens_per_batch), _next_pow2(len(tail_rows)))
        n_batches = -(-len(tail_rows) // per_batch)
        cost = (n_batches * per_batch * length, -length)
        if best is None or cost < best[0]:
            best = (cost, length, per_batch, tail_rows)
    assert best is not None  # the longest row length always fits the tail
    _, length, per_batch, tail_rows = best
    for i in range(0, len(tail_rows), per_batch):
        chunk = tail_rows[i : i + per_batch]
        layout.append((length, chunk + [[] for _ in range(per_batch - len(chunk))]))
    return layout


def _quarter_octave(n: int) -> int:
    """Smallest value >= n of the form (4 + j) * 2**k / 4, j in 0..3: few shapes, little padding."""
    if n <= 4:
        return max(n, 1)
    step = _next_pow2(n) // 8
    return -(-n // step) * step


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _materialize(
    rows: Sequence[Sequence[_Item]], length: int, capacity: int | None, min_capacity: int
) -> list[PackedBatch]:
    """Token arrays of one batch, plus one PackedBatch per capacity-sized slice of its plan."""
    shape = (len(rows), length)
    tokens = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    segments: list[Segment] = []
    unscorable: list[tuple[Hashable, int]] = []
    index_parts: list[np.ndarray] = []
    target_parts: list[np.ndarray] = []
    position_parts: list[np.ndarray] = []
    owner_parts: list[np.ndarray] = []
    response_parts: list[np.ndarray] = []
    for r, row in enumerate(rows):
        start = 0
        for s, item in enumerate(row, start=1):
            end = start + item.length
            tokens[r, start:end] = item.tokens
            segment_ids[r, start:end] = s
            positions[r, start:end] = np.arange(item.length)
            if item.length and item.responses[0] >= 0:
                unscorable.append((item.key, int(item.responses[0])))
            t = np.flatnonzero(item.responses[1:] >= 0) + 1
            index_parts.append(r * length + start + t - 1)
            target_parts.append(item.tokens[t])
            position_parts.append(t)
            owner_parts.append(np.full(len(t), len(segments)))
            response_parts.append(item.responses[t])
            segments.append(Segment(item.key, r, start, item.length, item.n_responses))
            start = end
    index, target, position, owner, response = (
        np.concatenate(a).astype(np.int64) if a else np.zeros(0, np.int64)
        for a in (index_parts, target_parts, position_parts, owner_parts, response_parts)
    )
    n = len(index)
    size = capacity if capacity is not None else max(min_capacity, _quarter_octave(n))
    common = dict(
        tokens=tokens,
        segment_ids=segment_ids,
        positions=positions,
        row_keys=tuple(tuple(it.key for it in row) for row in rows),
        segments=tuple(segments),
    )
    batches = []
    for p, lo in enumerate(range(0, max(n, 1), size)):
        part = slice(lo, lo + size)
        pairs, slot = np.unique(owner[part] * (1 << 32) + response[part], return_inverse=True)
        batches.append(
            PackedBatch(
                score_index=_pad(index[part], size, 0, np.int32),
                score_target=_pad(target[part], size, 0, np.int32),
                score_slot=_pad(slot, size, 0, np.int32),
                score_valid=_pad(np.ones(len(slot), bool), size, False, bool),
                score_position=_pad(position[part], size, -1, np.int32),
                slot_keys=tuple((segments[k >> 32].key, int(k & 0xFFFFFFFF)) for k in pairs.tolist()),
                unscorable=tuple(unscorable) if p == 0 else (),
                real_tokens=sum(it.length for row in rows for it in row) if p == 0 else 0,
                overflow_pass=p,
                **common,  # type: ignore[arg-type]
            )
        )
    return batches


def _pad(values: np.ndarray, size: int, fill, dtype) -> np.ndarray:
    """``values`` followed by ``fill`` up to ``size`` entries."""
    out = np.full(size, fill, dtype)
    out[: len(values)] = values
    return out
