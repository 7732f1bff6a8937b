"""Streams participants through the scorer: chunks → packed batches → lockstep SPMD steps → results.

``score_spans`` packs a chunk of participants, agrees with the other processes on one schedule of step
shapes (``plan_steps``: same step count and shapes everywhere, empty sub-batches where a process has
nothing of that shape), dispatches every step before reading any result, then unpacks each head's named
outputs (``head.HeadOutputs``) once per chunk into per-participant results, in input order. Results do
not depend on how participants are grouped (segment-isolated attention, per-segment positions), which the
invariance tests check. Each process packs only its own participants.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from psych201_jax.parallel import distributed
from psych201_jax.scoring import packing
from psych201_jax.scoring.head import HeadOutputs
from psych201_jax.scoring.scorer import Scorer
from psych201_jax.types import ParticipantKey, ParticipantResult, ParticipantSpans, Rejected


@dataclasses.dataclass
class Progress:
    participants: int = 0
    tokens: int = 0
    computed_tokens: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def tokens_per_s(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.tokens / elapsed if elapsed > 0 else 0.0


def score_spans(
    items: Iterable[ParticipantSpans | Rejected], scorer: Scorer, **kwargs
) -> Iterator[ParticipantResult | Rejected]:
    """Scores a stream of participants with one scorer (``score_spans_heads`` with one head)."""
    for results in score_spans_heads(items, [scorer], **kwargs):
        yield results[0]


def score_spans_heads(
    items: Iterable[ParticipantSpans | Rejected],
    heads: Sequence[Scorer],
    *,
    row_lengths: tuple[int, ...],
    tokens_per_batch: int = 131072,
    chunk_tokens: int = 1 << 22,
    max_tokens: int | None = None,
    progress: Progress | None = None,
    on_chunk: Callable[[Progress], None] | None = None,
) -> Iterator[tuple[ParticipantResult | Rejected, ...]]:
    """Scores a stream of participants; rejections pass through, in input order within each chunk.

    ``heads``: scorers made by ``Scorer.with_head`` from one scorer; each batch runs the forward once and
    every head on it, and each participant yields one result per head, equal to that head's scorer alone.
    A participant longer than ``max_tokens`` (the model context; default: the longest row) is rejected.
    Rows may be longer than the context: they are only containers of whole participants.
    ``items`` are this process's participants, ``tokens_per_batch`` is per row shard (one
    packed sub-batch; a step computes ``layout.shards`` of them) and every process must call this
    (chunks run in lockstep rounds until every process has run out of items).
    """
    progress = progress or Progress()
    limit = min(max(row_lengths), max_tokens or max(row_lengths))

    def checked(items):
        for item in items:
            if isinstance(item, ParticipantSpans) and len(item.token_ids) > limit:
                item = Rejected.of(
                    item,
                    f"{len(item.token_ids)} tokens exceed the limit of {limit} tokens (the model "
                    f"context or the longest row); the reference protocol cuts by characters only "
                    f"(use --protocol=robust); a robust budget plus its free prefix (BOS, chat header, "
                    f"persona) must fit (lower --config.max_tokens or raise --config.persona_reserve)",
                )
            yield item

    def run_chunk(chunk, results):
        scored = [p for p in chunk if isinstance(p, ParticipantSpans)]
        for item in chunk:
            yield tuple(r[item.key] for r in results) if isinstance(item, ParticipantSpans) else (item,) * len(heads)
        progress.participants += len(chunk)
        progress.tokens += sum(len(p.token_ids) for p in scored)
        if on_chunk is not None:
            on_chunk(progress)

    yield from _rounds(checked(items), list(heads), row_lengths, tokens_per_batch, chunk_tokens, progress, run_chunk)


def _results(
    participants: list[ParticipantSpans], batches: list[packing.PackedBatch], outputs: list[HeadOutputs[np.ndarray]]
) -> dict[ParticipantKey, ParticipantResult]:
    """Per-participant results of one head from its per-batch host outputs (one ``packing.unpack``)."""
    unpacked = packing.unpack(batches, outputs)
    out = {}
    for p in participants:
        scores = unpacked[p.key]
        positions = np.flatnonzero(scores.argmax >= 0)  # the scored tokens, in text order
        out[p.key] = ParticipantResult(
            spans=p,
            nll=scores.nll,
            n_scored=scores.n_scored,
            argmax=scores.argmax[positions],
            target=p.token_ids[positions],
            option_argmax=None if scores.option_argmax is None else scores.option_argmax[positions],
            nll_t=scores.nll_t,
            entropy=scores.entropy,
            option_mass=scores.option_mass,
        )
    return out


@dataclasses.dataclass(frozen=True)
class Step:
    """One SPMD step of a round: sub-batch shape, plan capacity, per local slot the index of this
    process's packed batch that fills it (None: empty), and the option capacity K (0: no study options)."""

    rows: int
    length: int
    capacity: int
    slots: tuple[int | None, ...]
    option_capacity: int = 0


def plan_steps(tables: Sequence[np.ndarray], process_share: Sequence[int], share: int, slots: int) -> list[Step]:
    """The common step schedule of one round, as seen by share ``share``.

    ``tables[p]``: int [n_p, 3] (rows, length, capacity) of process p's packed batches, or [n_p, 4] with
    their option capacities (processes of one share hold identical tables); ``process_share[p]``: p's
    share; ``slots``: sub-batches per share and step. For each sub-batch shape (sorted), each share's
    batches of that shape are ordered by decreasing capacity and dealt ``slots`` per step; the step count
    is the largest share's and a step's capacity (and option capacity) the largest among its sub-batches.
    Every process derives the same steps from the same tables.
    """
    firsts: dict[int, int] = {}  # share -> its first process
    for p, s in enumerate(process_share):
        firsts.setdefault(s, p)
    width = np.shape(tables[0])[-1]
    per_share = {s: np.asarray(tables[p]).reshape(-1, width) for s, p in firsts.items()}
    shapes = sorted({(int(r), int(n)) for t in per_share.values() for r, n in t[:, :2]})
    steps = []
    for rows, length in shapes:
        order = {}
        for s, t in per_share.items():
            mine = [i for i in range(len(t)) if (t[i, 0], t[i, 1]) == (rows, length)]
            order[s] = sorted(mine, key=lambda i: (-int(t[i, 2]), i))
        n_steps = max(-(-len(o) // slots) for o in order.values())
        for j in range(n_steps):
            members = [per_share[s][i] for s, o in order.items() for i in o[j * slots : (j + 1) * slots]]
            capacity = max(int(t[2]) for t in members)
            option_capacity = max(int(t[3]) if width > 3 else 0 for t in members)
            mine = order.get(share, [])[j * slots : (j + 1) * slots]
            steps.append(Step(rows, length, capacity, tuple(mine) + (None,) * (slots - len(mine)), option_capacity))
    return steps


def _rounds(
    items: Iterator, heads: list[Scorer], row_lengths, tokens_per_batch, chunk_tokens, progress: Progress, run_chunk
) -> Iterator:
    """Lockstep rounds: each process packs its next chunk (possibly empty), all agree on the steps, run them."""
    scorer = heads[0]
    layout = scorer.layout
    option_head = next((h for h in heads if h.study_options is not None), None)  # gives the option capacities
    done = False
    while True:
        chunk, chunk_len = [], 0
        while not done and chunk_len < chunk_tokens:
            item = next(items, None)
            if item is None:
                done = True
                break
            chunk.append(item)
            chunk_len += len(item.token_ids) if isinstance(item, ParticipantSpans) else 0
        scored = [p for p in chunk if isinstance(p, ParticipantSpans)]
        batches = packing.pack(scored, row_lengths, tokens_per_batch=tokens_per_batch) if scored else []
        width = 3 if option_head is None else 4  # + the option capacity
        table = np.asarray(
            [
                (b.rows, b.row_length, b.capacity, option_head.option_capacity(b) if option_head else 0)[:width]
                for b in batches
            ],
            np.int32,
        ).reshape(-1, width)
        header = distributed.allgather(np.asarray([len(batches), done], np.int32))
        tables = distributed.allgather_rows(table) if header[:, 0].max() > 0 else [table[:0]] * len(header)
        steps = plan_steps(tables, layout.process_share, layout.share_index, len(layout.local_shards))
        outputs = [
            scorer.dispatch_step(
                [None if i is None else batches[i] for i in st.slots],
                rows=st.rows,
                length=st.length,
                capacity=st.capacity,
                option_capacity=st.option_capacity,
                heads=heads,
            )
            for st in steps
        ]
        results = []
        for h in range(len(heads)):
            host: list = [None] * len(batches)  # per batch: this head's HeadOutputs, host copies
            for st, out in zip(steps, outputs):
                leaves, tree = jax.tree.flatten(out[h])
                blocks = [layout.local_blocks(x) for x in leaves]
                for k, i in enumerate(st.slots):
                    if i is not None:
                        host[i] = jax.tree.unflatten(tree, [b[layout.local_shards[k]] for b in blocks])
            results.append(_results(scored, batches, host) if scored else {})
        progress.computed_tokens += sum(b.computed_tokens for b in batches)
        if chunk:
            yield from run_chunk(chunk, results)
        if header[:, 1].all():
            return
