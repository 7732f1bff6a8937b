"""Stages 4–6 wired together: token spans → packed batches → model → masked log-probs → per participant.

``Scorer`` owns two jitted steps: the model forward per (rows, row length) and the log-prob head per
plan capacity, so changing the capacity never recompiles the forward. ``score_spans`` streams
participants through chunks: pack a chunk, dispatch all its batches, then unpack in input order.
Results do not depend on how participants are grouped (segment-isolated attention, per-segment
positions), which the invariance tests check.

With a mesh (``Scorer(model, mesh=, rules=)``) the same chunks run as one SPMD program over every device
of every process (see ``psych201_jax.sharding``): a step stacks one packed batch per row shard
(data x fsdp) along rows, the forward is GSPMD-partitioned by the logical-axis rules, and the head runs
under ``shard_map`` with each row shard scoring its own plan and the vocabulary split over ``tensor``.
Each process packs only its own participants; before each chunk's steps the processes exchange their
batch shapes and follow one schedule (same step count and shapes everywhere, empty sub-batches where a
process has nothing of that shape).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from psych201_jax import distributed, logprobs, packing, sharding
from psych201_jax.records import Rejected
from psych201_jax.spans import ParticipantSpans


@dataclasses.dataclass(frozen=True)
class ParticipantResult:
    """One scored participant.

    nll      float64 [R]  summed NLL per response (R = spans.n_responses); NaN if nothing was scorable.
    n_scored int32 [R]    scored tokens per response.
    argmax   int32 [S]    the model's top token at each of the S scored tokens (text order).
    target   int32 [S]    the human token at those positions.
    """
    spans: ParticipantSpans
    nll: np.ndarray
    n_scored: np.ndarray
    argmax: np.ndarray
    target: np.ndarray

    @property
    def key(self):
        return self.spans.key

    @property
    def study(self) -> str:
        return self.spans.study


class Scorer:
    """Runs packed batches through a model and the masked log-prob kernel.

    ``mesh=None``: the single-device path. With a mesh, the model's parameters are (re)placed on their
    shardings under ``rules`` (default ``sharding.rules_for(model.spec, mesh)``; restoring with
    ``checkpoint.load_model(mesh=, rules=)`` already puts them there) and batches run as SPMD steps.
    """

    def __init__(self, model: nnx.Module, *, vocab_chunk: int = 8192, mesh: jax.sharding.Mesh | None = None,
                 rules: sharding.Rules | None = None):
        graphdef, state = nnx.split(model)
        self.state = state
        self.vocab_chunk = vocab_chunk
        self.mesh = mesh
        self.layout: sharding.RowLayout | None = None
        if mesh is not None:
            self._init_mesh(graphdef, model.spec, rules)
            return

        def forward(state, tokens, positions, segment_ids):
            return nnx.merge(graphdef, state)(tokens, positions, segment_ids)

        def head(state, hidden, score_index, score_target, score_valid, score_slot):
            unembedding = nnx.merge(graphdef, state).unembedding()
            nll, top = logprobs.masked_logprobs(hidden, unembedding, score_index, score_target, score_valid,
                                                vocab_chunk=self.vocab_chunk)
            sums = logprobs.response_sums(nll, score_slot, score_valid, num_slots=score_index.shape[0])
            return sums, top

        self._forward = jax.jit(forward)
        self._head = jax.jit(head)

    def _init_mesh(self, graphdef, spec, rules):
        mesh = self.mesh
        self.rules = tuple(rules) if rules is not None else sharding.rules_for(spec, mesh)
        self.layout = layout = sharding.RowLayout.create(mesh, sharding.row_axes(self.rules))
        state_shardings = sharding.state_shardings(self.state, mesh, self.rules)
        self.state = jax.device_put(self.state, state_shardings)
        rows, plan = layout.rows_sharding, layout.plan_sharding
        vocab_axes = sharding.vocab_axes(self.rules)
        rows_spec = jax.P(layout.axes or None)
        rules_ = self.rules

        def forward(state, tokens, positions, segment_ids):
            with nnx.logical_axis_rules(rules_):
                return nnx.merge(graphdef, state)(tokens, positions, segment_ids)

        def head(state, hidden, score_index, score_target, score_valid, score_slot):
            unembedding = nnx.merge(graphdef, state).unembedding()
            local = functools.partial(_local_head, vocab_axes=vocab_axes, axis_sizes=dict(mesh.shape),
                                      vocab_chunk=self.vocab_chunk)
            # Each row shard scores its own plan on its own rows; the vocabulary stays split over vocab_axes.
            # check_vma=False: the outputs are combined over vocab_axes by hand (psum / pmax / pmin).
            sharded = jax.shard_map(
                local, mesh=mesh,
                in_specs=(jax.P(layout.axes or None, None, None), jax.P(vocab_axes or None, None),
                          rows_spec, rows_spec, rows_spec, rows_spec),
                out_specs=(rows_spec, rows_spec), check_vma=False)
            return sharded(hidden, unembedding, score_index, score_target, score_valid, score_slot)

        self._forward = jax.jit(forward, in_shardings=(state_shardings, rows, rows, rows),
                                out_shardings=layout.hidden_sharding)
        self._head = jax.jit(head, in_shardings=(state_shardings, layout.hidden_sharding, plan, plan, plan, plan),
                             out_shardings=(plan, plan))

    def dispatch(self, batch: packing.PackedBatch) -> tuple[jax.Array, jax.Array]:
        """Enqueues one batch (asynchronously); returns device (response sums [C], argmax [C]).

        On a mesh this is a step of one sub-batch, so the mesh must not split rows (data = fsdp = 1) and
        run in one process: the single-device vs mesh comparison on one device.
        """
        if self.layout is not None:
            if self.layout.shards != 1 or distributed.is_multiprocess():
                raise ValueError("Scorer.dispatch runs one batch; use score_spans on a mesh that splits rows")
            return self.dispatch_step([batch], batch.rows, batch.row_length, batch.capacity)
        hidden = self._forward(self.state, jnp.asarray(batch.tokens), jnp.asarray(batch.positions),
                               jnp.asarray(batch.segment_ids))
        return self._head(self.state, hidden, jnp.asarray(batch.score_index), jnp.asarray(batch.score_target),
                          jnp.asarray(batch.score_valid), jnp.asarray(batch.score_slot))

    def dispatch_step(self, batches: Sequence[packing.PackedBatch | None], rows: int, length: int,
                      capacity: int) -> tuple[jax.Array, jax.Array]:
        """Enqueues one SPMD step (mesh path; every process calls it with the same rows/length/capacity).

        ``batches[k]``: this process's sub-batch ``layout.local_shards[k]`` ([rows, length], plan capacity
        <= ``capacity``), or None for an empty one. Returns global (sums, argmax) [shards * capacity];
        ``layout.local_blocks`` gives this process's blocks.
        """
        layout = self.layout
        if layout is None:
            raise ValueError("dispatch_step needs a Scorer with a mesh")
        if len(batches) != len(layout.local_shards):
            raise ValueError(f"{len(batches)} sub-batches for {len(layout.local_shards)} local row shards")
        n = len(batches)
        tokens, positions, segment_ids = (np.zeros((n * rows, length), np.int32) for _ in range(3))
        index, target, slot = (np.zeros(n * capacity, np.int32) for _ in range(3))
        valid = np.zeros(n * capacity, bool)
        for k, b in enumerate(batches):
            if b is None:
                continue
            if (b.rows, b.row_length) != (rows, length) or b.capacity > capacity:
                raise ValueError(f"sub-batch shape {(b.rows, b.row_length, b.capacity)} does not fit step "
                                 f"{(rows, length, capacity)}")
            r, c = slice(k * rows, (k + 1) * rows), slice(k * capacity, k * capacity + b.capacity)
            tokens[r], positions[r], segment_ids[r] = b.tokens, b.positions, b.segment_ids
            index[c], target[c], slot[c], valid[c] = b.score_index, b.score_target, b.score_slot, b.score_valid
        with jax.set_mesh(self.mesh):
            arrays = [layout.global_array(x, layout.rows_sharding) for x in (tokens, positions, segment_ids)]
            plan = [layout.global_array(x, layout.plan_sharding) for x in (index, target, valid, slot)]
            hidden = self._forward(self.state, *arrays)
            return self._head(self.state, hidden, *plan)

    def compilations(self) -> dict[str, int]:
        """Distinct compiled programs so far (forward per (B, L); head per (B, L, C))."""
        return {"forward": self._forward._cache_size(), "head": self._head._cache_size()}


def _local_head(hidden, unembedding, score_index, score_target, score_valid, score_slot, *,
                vocab_axes: tuple[str, ...], axis_sizes: dict, vocab_chunk: int):
    """Per-device body of the mesh head: ``logprobs.masked_logprobs`` + ``response_sums`` on this row
    shard's hidden states and plan, over this device's slice of the vocabulary, combined across
    ``vocab_axes`` (max, rescaled sum, target logit, lowest maximal index)."""
    d = hidden.shape[-1]
    v = unembedding.shape[0]
    offset = 0
    for axis in vocab_axes:
        offset = offset * axis_sizes[axis] + lax.axis_index(axis)
    offset = offset * v
    h = hidden.reshape(-1, d).at[score_index].get(mode="clip")  # [C, D]
    target = score_target - offset
    run_max, run_sum, run_arg, target_logit = logprobs.vocab_scan(h, unembedding, target, vocab_chunk)
    c = score_index.shape[0]
    if vocab_axes:
        global_max = lax.pmax(run_max, vocab_axes)
        run_sum = lax.psum(run_sum * jnp.exp(run_max - global_max), vocab_axes)
        owns = (target >= 0) & (target < v)
        target_logit = lax.psum(jnp.where(owns, target_logit, 0.0), vocab_axes)
        top = jnp.where(run_max == global_max, offset + run_arg, jnp.iinfo(jnp.int32).max)
        run_arg = lax.pmin(top.astype(jnp.int32), vocab_axes)
        run_max = global_max
    nll = jnp.where(score_valid, jnp.log(run_sum) + run_max - target_logit, 0.0)
    top = jnp.where(score_valid, run_arg, -1).astype(jnp.int32)
    sums = jax.ops.segment_sum(jnp.where(score_valid, nll, 0.0), score_slot, num_segments=c)
    return sums, top


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


def score_spans(items: Iterable[ParticipantSpans | Rejected], scorer: Scorer, *, row_lengths: tuple[int, ...],
                tokens_per_batch: int = 131072, chunk_tokens: int = 1 << 22, max_tokens: int | None = None,
                progress: Progress | None = None,
                on_chunk: Callable[[Progress], None] | None = None) -> Iterator[ParticipantResult | Rejected]:
    """Scores a stream of participants; rejections pass through, in input order within each chunk.

    A participant longer than ``max_tokens`` (the model context; default: the longest row) is rejected.
    Rows may be longer than the context: they are only containers of whole participants.
    On a mesh, ``items`` are this process's participants, ``tokens_per_batch`` is per row shard (one
    packed sub-batch; a step computes ``layout.shards`` of them) and every process must call this
    (chunks run in lockstep rounds until every process has run out of items).
    """
    progress = progress or Progress()
    limit = min(max(row_lengths), max_tokens or max(row_lengths))

    def checked(items):
        for item in items:
            if isinstance(item, ParticipantSpans) and len(item.token_ids) > limit:
                item = Rejected(item.study, item.experiment, item.participant, item.source, item.line,
                                f"{len(item.token_ids)} tokens exceed the limit of {limit} tokens (the model "
                                f"context or the longest row); use --protocol=robust to cut by a token budget")
            yield item

    def run_chunk(chunk, results):
        scored = [p for p in chunk if isinstance(p, ParticipantSpans)]
        for item in chunk:
            yield results[item.key] if isinstance(item, ParticipantSpans) else item
        progress.participants += len(chunk)
        progress.tokens += sum(len(p.token_ids) for p in scored)
        if on_chunk is not None:
            on_chunk(progress)

    if scorer.layout is not None:
        yield from _score_spans_mesh(checked(items), scorer, row_lengths, tokens_per_batch, chunk_tokens,
                                     progress, run_chunk)
        return

    chunk: list[ParticipantSpans | Rejected] = []
    chunk_len = 0

    def flush():
        scored = [p for p in chunk if isinstance(p, ParticipantSpans)]
        results = _score_chunk(scored, scorer, row_lengths, tokens_per_batch, progress) if scored else {}
        yield from run_chunk(chunk, results)
        chunk.clear()

    for item in checked(items):
        chunk.append(item)
        chunk_len += len(item.token_ids) if isinstance(item, ParticipantSpans) else 0
        if chunk_len >= chunk_tokens:
            yield from flush()
            chunk_len = 0
    if chunk:
        yield from flush()


def _results(participants: list[ParticipantSpans], batches, sums, tops) -> dict:
    unpacked = packing.unpack(batches, sums, tops)
    out = {}
    for p in participants:
        scores = unpacked[p.key]
        positions = np.flatnonzero(scores.argmax >= 0)
        out[p.key] = ParticipantResult(p, scores.nll, scores.n_scored, scores.argmax[positions],
                                       p.token_ids[positions])
    return out


def _score_chunk(participants: list[ParticipantSpans], scorer: Scorer, row_lengths, tokens_per_batch,
                 progress: Progress) -> dict:
    batches = packing.pack(participants, row_lengths, tokens_per_batch=tokens_per_batch)
    outputs = [scorer.dispatch(b) for b in batches]  # all enqueued before the first result is read
    sums, tops = zip(*[(np.asarray(s), np.asarray(t)) for s, t in outputs])
    progress.computed_tokens += sum(b.computed_tokens for b in batches)
    return _results(participants, batches, sums, tops)


@dataclasses.dataclass(frozen=True)
class Step:
    """One SPMD step of a round: sub-batch shape, plan capacity and, per local slot, the index of this
    process's packed batch that fills it (None: empty)."""

    rows: int
    length: int
    capacity: int
    slots: tuple[int | None, ...]


def plan_steps(tables: Sequence[np.ndarray], process_share: Sequence[int], share: int, slots: int) -> list[Step]:
    """The common step schedule of one round, as seen by share ``share``.

    ``tables[p]``: int [n_p, 3] (rows, length, capacity) of process p's packed batches (processes of one
    share hold identical tables); ``process_share[p]``: p's share; ``slots``: sub-batches per share and
    step. For each sub-batch shape (sorted), each share's batches of that shape are ordered by decreasing
    capacity and dealt ``slots`` per step; the step count is the largest share's and a step's capacity
    the largest among its sub-batches. Every process derives the same shapes from the same tables.
    """
    firsts = {}
    for p, s in enumerate(process_share):
        firsts.setdefault(s, p)
    per_share = {s: np.asarray(tables[p]).reshape(-1, 3) for s, p in firsts.items()}
    shapes = sorted({(int(r), int(l)) for t in per_share.values() for r, l, _ in t})
    steps = []
    for rows, length in shapes:
        order = {}
        for s, t in per_share.items():
            mine = [i for i in range(len(t)) if (t[i, 0], t[i, 1]) == (rows, length)]
            order[s] = sorted(mine, key=lambda i: (-int(t[i, 2]), i))
        n_steps = max(-(-len(o) // slots) for o in order.values())
        for j in range(n_steps):
            capacity = max(int(per_share[s][i, 2]) for s, o in order.items() for i in o[j * slots:(j + 1) * slots])
            mine = order.get(share, [])[j * slots:(j + 1) * slots]
            steps.append(Step(rows, length, capacity, tuple(mine) + (None,) * (slots - len(mine))))
    return steps


def _score_spans_mesh(items: Iterator, scorer: Scorer, row_lengths, tokens_per_batch, chunk_tokens,
                      progress: Progress, run_chunk) -> Iterator:
    """Lockstep rounds: each process packs its next chunk (possibly empty), all agree on the steps, run them."""
    layout = scorer.layout
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
        table = np.asarray([(b.rows, b.row_length, b.capacity) for b in batches], np.int32).reshape(-1, 3)
        header = distributed.allgather(np.asarray([len(batches), done], np.int32))
        tables = distributed.allgather_rows(table) if header[:, 0].max() > 0 else [table[:0]] * len(header)
        steps = plan_steps(tables, layout.process_share, layout.share_index, len(layout.local_shards))
        outputs = [scorer.dispatch_step([None if i is None else batches[i] for i in st.slots], st.rows,
                                        st.length, st.capacity) for st in steps]
        sums: list = [None] * len(batches)
        tops: list = [None] * len(batches)
        for st, (s_out, t_out) in zip(steps, outputs):
            s_blocks, t_blocks = layout.local_blocks(s_out), layout.local_blocks(t_out)
            for k, i in enumerate(st.slots):
                if i is not None:
                    shard = layout.local_shards[k]
                    sums[i], tops[i] = s_blocks[shard], t_blocks[shard]
        progress.computed_tokens += sum(b.computed_tokens for b in batches)
        results = _results(scored, batches, sums, tops) if scored else {}
        if chunk:
            yield from run_chunk(chunk, results)
        if header[:, 1].all():
            return
