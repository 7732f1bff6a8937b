"""Branch plans: which (participant, response slot, sample) branches a packed batch decodes, and where.

A slot is one human response of a participant (``response_index`` run r, see ``data.spans``). Its prefix
is the participant's tokens up to and including the last token of the opening marker, index p (the token
before the response's first one): the hidden state there predicts the response's first token, as in
scoring. The prefix is teacher-forced, so the participant's earlier responses stand in it as the human gave
them. Each slot has ``samples`` branches. A batch's branches are laid out [B, C] by row (C = the branch
capacity, static): a branch attends to its own row's keys only, so the decode step's attention needs no
copy of any prefix. A row with more than C branches takes several passes over the same prefill.

Per participant, a plan also carries each branch's temperature and the option ids its first token is
restricted to ([B, C, K], padded with -1; K a power of two so that compilations stay few).

Pure numpy and deterministic: a branch's identity (participant, slot, sample) fixes its random stream
(``seed_words``), never its place in the batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np
from jaxtyping import Bool, Float, Int

from psych201_jax.scoring.packing import PackedBatch


@dataclasses.dataclass(frozen=True)
class Slot:
    """One response slot of a participant: response ``response``; ``prefix_end`` p, the participant-relative
    index of the opening marker's last token; ``human`` the human's response tokens (int32)."""

    key: Hashable
    response: int
    prefix_end: int
    human: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class BranchPlan:
    """One decode pass of a packed batch: C branches per row, [B, C] arrays.

    prefix_end  int32 [B, C]  row index of the opening marker's last token (0 for padding branches).
    segment     int32 [B, C]  the branch's segment id in its row (0 = padding branch).
    position    int32 [B, C]  participant-relative position of the first generated token (p + 1).
    seed_words  uint32 [B, C, 3]  (participant hash, response, sample): the branch's random stream.
    temperature float32 [B, C]  the branch's sampling temperature (0: greedy).
    option_ids  int32 [B, C, K]  the ids its first token is drawn among, padded with -1 (all -1: any token).
    branches    per flat branch b * C + c: (key, response, sample), or None for padding.
    """

    prefix_end: Int[np.ndarray, "b c"]
    segment: Int[np.ndarray, "b c"]
    position: Int[np.ndarray, "b c"]
    seed_words: np.ndarray
    temperature: Float[np.ndarray, "b c"]
    option_ids: Int[np.ndarray, "b c k"]
    branches: tuple[tuple[Hashable, int, int] | None, ...]

    ARRAYS = ("prefix_end", "segment", "position", "seed_words", "temperature", "option_ids")

    def arrays(self) -> dict[str, np.ndarray]:
        """The decode program's inputs by name."""
        return {name: getattr(self, name) for name in self.ARRAYS}

    @property
    def capacity(self) -> int:
        return self.prefix_end.shape[1]

    @property
    def valid(self) -> Bool[np.ndarray, "b c"]:
        return self.segment > 0


def participant_hash(key: Hashable) -> int:
    """A stable 32-bit hash of a participant key (sha256 of its repr): the same in every process and run."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:4], "little")


def participant_slots(key: Hashable, token_ids: np.ndarray, response_index: np.ndarray) -> list[Slot]:
    """Every response slot of one participant, in response order; a response at position 0 has no prefix and
    no slot (it is unscorable too)."""
    token_ids, response_index = np.asarray(token_ids), np.asarray(response_index)
    slots = []
    for r in np.unique(response_index[response_index >= 0]).tolist():
        where = np.flatnonzero(response_index == r)
        if where[0] >= 1:
            slots.append(Slot(key, int(r), int(where[0]) - 1, token_ids[where].astype(np.int32)))
    return slots


def option_capacity(n: int) -> int:
    """Static K for option sets of at most n ids: the next power of two, at least 1."""
    return 1 << max(0, n - 1).bit_length()


def plan_batch(
    batch: PackedBatch,
    slots_of: Mapping[Hashable, list[Slot]],
    samples: int,
    capacity: int,
    *,
    temperature: float = 1.0,
    temperature_of: Mapping[Hashable, float] | None = None,
    options: Sequence[int] = (),
    options_of: Mapping[Hashable, Sequence[int]] | None = None,
) -> list[BranchPlan]:
    """The decode passes of one packed batch: every slot of its participants (``slots_of[key]``) times
    ``samples`` branches, laid out by row, ``capacity`` branches per row and pass (as few passes as the
    fullest row needs; rows with fewer branches are padded).

    A participant's branches sample at ``temperature_of[key]`` (default ``temperature``) and draw their first
    token among ``options_of[key]`` (missing or empty: ``options``; empty: any token). K, the option axis,
    is the largest set of the batch rounded up to a power of two (every pass of the batch has the same K)."""
    if samples < 1 or capacity < 1:
        raise ValueError(f"samples ({samples}) and branch capacity ({capacity}) must be positive")
    temperature_of, options_of = temperature_of or {}, options_of or {}
    keys = [seg.key for seg in batch.segments]
    temps = {key: float(temperature_of.get(key, temperature)) for key in keys}
    bad = {key: t for key, t in temps.items() if not np.isfinite(t) or t < 0}
    if bad:
        raise ValueError(f"temperatures must be finite and >= 0, got {bad}")
    default = tuple(int(i) for i in options)
    opts = {key: tuple(int(i) for i in options_of.get(key, ())) or default for key in keys}  # arrays too
    k_opt = option_capacity(max((len(o) for o in opts.values()), default=0))
    per_row: list[list[tuple[Hashable, int, int, int, int, int]]] = [[] for _ in range(batch.rows)]
    for s, seg in enumerate(batch.segments):
        segment_id = int(batch.segment_ids[seg.row, seg.start])
        for slot in slots_of.get(seg.key, []):
            if slot.prefix_end >= seg.length:
                raise ValueError(f"slot {slot.response} of {seg.key!r} lies beyond its {seg.length} tokens")
            for k in range(samples):
                per_row[seg.row].append((seg.key, slot.response, k, seg.start + slot.prefix_end, segment_id, s))
    n_passes = max(1, -(-max(len(r) for r in per_row) // capacity))
    plans = []
    for i in range(n_passes):
        shape = (batch.rows, capacity)
        prefix_end, segment, position = (np.zeros(shape, np.int32) for _ in range(3))
        seed_words = np.zeros((*shape, 3), np.uint32)
        temps_arr = np.zeros(shape, np.float32)
        option_ids = np.full((*shape, k_opt), -1, np.int32)
        branches: list[tuple[Hashable, int, int] | None] = [None] * (batch.rows * capacity)
        for row, entries in enumerate(per_row):
            for c, (key, response, k, p, segment_id, _) in enumerate(entries[i * capacity : (i + 1) * capacity]):
                prefix_end[row, c], segment[row, c] = p, segment_id
                position[row, c] = batch.positions[row, p] + 1
                seed_words[row, c] = (participant_hash(key), response, k)
                temps_arr[row, c] = temps[key]
                option_ids[row, c, : len(opts[key])] = opts[key]
                branches[row * capacity + c] = (key, response, k)
        plans.append(BranchPlan(prefix_end, segment, position, seed_words, temps_arr, option_ids, tuple(branches)))
    return plans


def slots_by_key(participants: Iterable) -> dict[Hashable, list[Slot]]:
    """key -> its slots, for participants with ``key``, ``token_ids`` and ``response_index`` (as packed)."""
    return {p.key: participant_slots(p.key, p.token_ids, p.response_index) for p in participants}
