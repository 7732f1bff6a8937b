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

Response options (``Scorer(options=)``, from ``collect_options``): the head also takes the logits of the
batch's option ids only (``[C, K]``, K a power of two >= 32) and reports, per scored token, the argmax over
the options of the participant's study (``ParticipantResult.option_argmax``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
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
    option_argmax int32 [S] or None   the top token among the study's options at those positions (-1: the
                          study has none); None when the scorer has no options.
    """
    spans: ParticipantSpans
    nll: np.ndarray
    n_scored: np.ndarray
    argmax: np.ndarray
    target: np.ndarray
    option_argmax: np.ndarray | None = None

    @property
    def key(self):
        return self.spans.key

    @property
    def study(self) -> str:
        return self.spans.study


MAX_OPTIONS = 256  # option ids kept per study
MIN_OPTION_CAPACITY = 32  # smallest K of a batch's option ids


def collect_options(items: Iterable[ParticipantSpans | Rejected], max_options: int = MAX_OPTIONS
                    ) -> dict[str, np.ndarray]:
    """Response options per study: the distinct token ids of its single-token responses.

    A single-token response has exactly one scored token (position >= 1, as ``packing`` scores them).
    Returns study -> int32 [n] ascending ids (n = 0 when it has none) for every study with a participant
    in ``items`` (rejections are skipped). Above ``max_options`` ids a study keeps the most frequent
    (ties: the lowest ids), with a warning.
    """
    counts: dict[str, collections.Counter] = {}
    for p in items:
        if not isinstance(p, ParticipantSpans):
            continue
        study = counts.setdefault(p.study, collections.Counter())
        response = np.asarray(p.response_index)[1:]
        scored = response >= 0
        response, tokens = response[scored], np.asarray(p.token_ids)[1:][scored]
        single = np.bincount(response, minlength=p.n_responses)[response] == 1
        study.update(tokens[single].tolist())
    out = {}
    for name, study in sorted(counts.items()):
        ids = sorted(study, key=lambda t: (-study[t], t))
        if len(ids) > max_options:
            logging.warning("study %s has %d distinct single-token responses; its options are the %d most "
                            "frequent", name, len(ids), max_options)
            ids = ids[:max_options]
        out[name] = np.asarray(sorted(ids), np.int32)
    return out


def batch_options(batch: packing.PackedBatch, options: dict[str, np.ndarray]) -> np.ndarray:
    """int32 [n]: ascending union of the options of the studies the batch scores (a participant key is
    (study, experiment, participant), see ``ParticipantSpans.key``)."""
    studies = {key[0] for key, _ in batch.slot_keys}
    ids = [options[s] for s in studies if s in options]
    return np.unique(np.concatenate(ids)).astype(np.int32) if ids else np.zeros(0, np.int32)


def option_capacity(n: int) -> int:
    """Static K for n option ids: the next power of two, at least ``MIN_OPTION_CAPACITY``."""
    return max(MIN_OPTION_CAPACITY, 1 << max(0, n - 1).bit_length())


def option_plan(batch: packing.PackedBatch, options: dict[str, np.ndarray], k: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The batch's option ids int32 [K] (``batch_options``, padded with 0) and option_mask bool [C, K]: which
    of them are options of each entry's study (none for padding entries). K: ``k`` or the batch's own
    ``option_capacity``."""
    union = batch_options(batch, options)
    k = option_capacity(len(union)) if k is None else k
    if len(union) > k:
        raise ValueError(f"{len(union)} option ids do not fit an option capacity of {k}")
    ids = np.zeros(k, np.int32)
    ids[:len(union)] = union
    studies = sorted({key[0] for key, _ in batch.slot_keys})
    per_study = np.zeros((len(studies) + 1, k), bool)  # the last row: no options (padding entries)
    for i, study in enumerate(studies):
        per_study[i, :len(union)] = np.isin(union, options.get(study, ()))
    slot_study = np.asarray([studies.index(key[0]) for key, _ in batch.slot_keys], np.int64)
    entry_study = np.full(batch.capacity, len(studies))
    valid = batch.score_valid
    entry_study[valid] = slot_study[batch.score_slot[valid]]
    return ids, per_study[entry_study]


class Scorer:
    """Runs packed batches through a model and the masked log-prob kernel.

    ``mesh=None``: the single-device path. With a mesh, the model's parameters are (re)placed on their
    shardings under ``rules`` (default ``sharding.rules_for(model.spec, mesh)``; restoring with
    ``checkpoint.load_model(mesh=, rules=)`` already puts them there) and batches run as SPMD steps.
    ``options`` (study -> option ids, see ``collect_options``): the head also returns option_argmax;
    None compiles the head without it.
    """

    def __init__(self, model: nnx.Module, *, vocab_chunk: int = 8192, mesh: jax.sharding.Mesh | None = None,
                 rules: sharding.Rules | None = None, options: dict[str, np.ndarray] | None = None):
        graphdef, state = nnx.split(model)
        self.state = state
        self.vocab_chunk = vocab_chunk
        self.mesh = mesh
        self.options = options
        self.layout: sharding.RowLayout | None = None
        if mesh is not None:
            self._init_mesh(graphdef, model.spec, rules)
            return

        def forward(state, tokens, positions, segment_ids):
            return nnx.merge(graphdef, state)(tokens, positions, segment_ids)

        def head(state, hidden, score_index, score_target, score_valid, score_slot, *options):
            # options: () or (option_ids [K], option_mask [C, K]).
            unembedding = nnx.merge(graphdef, state).unembedding()
            nll, top = logprobs.masked_logprobs(hidden, unembedding, score_index, score_target, score_valid,
                                                vocab_chunk=self.vocab_chunk)
            sums = logprobs.response_sums(nll, score_slot, score_valid, num_slots=score_index.shape[0])
            if not options:
                return sums, top
            return sums, top, logprobs.masked_option_argmax(hidden, unembedding, score_index, score_valid, *options)

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

        n_plan = 4 if self.options is None else 6  # + option_ids [shards * K], option_mask [shards * C, K]
        n_out = 2 if self.options is None else 3

        def head(state, hidden, *plan_arrays):
            unembedding = nnx.merge(graphdef, state).unembedding()
            local = functools.partial(_local_head, vocab_axes=vocab_axes, axis_sizes=dict(mesh.shape),
                                      vocab_chunk=self.vocab_chunk)
            # Each row shard scores its own plan on its own rows; the vocabulary stays split over vocab_axes.
            # check_vma=False: the outputs are combined over vocab_axes by hand (psum / pmax / pmin).
            sharded = jax.shard_map(
                local, mesh=mesh,
                in_specs=(jax.P(layout.axes or None, None, None), jax.P(vocab_axes or None, None))
                + (rows_spec,) * n_plan,
                out_specs=(rows_spec,) * n_out, check_vma=False)
            return sharded(hidden, unembedding, *plan_arrays)

        self._forward = jax.jit(forward, in_shardings=(state_shardings, rows, rows, rows),
                                out_shardings=layout.hidden_sharding)
        self._head = jax.jit(head, in_shardings=(state_shardings, layout.hidden_sharding) + (plan,) * n_plan,
                             out_shardings=(plan,) * n_out)

    def option_capacity(self, batch: packing.PackedBatch) -> int:
        """K of the batch's option ids (0 without options)."""
        return 0 if self.options is None else option_capacity(len(batch_options(batch, self.options)))

    def dispatch(self, batch: packing.PackedBatch) -> tuple[jax.Array, ...]:
        """Enqueues one batch (asynchronously); returns device (response sums [C], argmax [C]) and, with
        options, option_argmax [C].

        On a mesh this is a step of one sub-batch, so the mesh must not split rows (data = fsdp = 1) and
        run in one process: the single-device vs mesh comparison on one device.
        """
        if self.layout is not None:
            if self.layout.shards != 1 or distributed.is_multiprocess():
                raise ValueError("Scorer.dispatch runs one batch; use score_spans on a mesh that splits rows")
            return self.dispatch_step([batch], batch.rows, batch.row_length, batch.capacity,
                                      self.option_capacity(batch))
        hidden = self._forward(self.state, jnp.asarray(batch.tokens), jnp.asarray(batch.positions),
                               jnp.asarray(batch.segment_ids))
        plan = (batch.score_index, batch.score_target, batch.score_valid, batch.score_slot)
        if self.options is not None:
            plan += option_plan(batch, self.options)
        return self._head(self.state, hidden, *(jnp.asarray(x) for x in plan))

    def dispatch_step(self, batches: Sequence[packing.PackedBatch | None], rows: int, length: int,
                      capacity: int, options: int = 0) -> tuple[jax.Array, ...]:
        """Enqueues one SPMD step (mesh path; every process calls it with the same rows/length/capacity/options).

        ``batches[k]``: this process's sub-batch ``layout.local_shards[k]`` ([rows, length], plan capacity
        <= ``capacity``, option capacity <= ``options``), or None for an empty one. ``options``: the step's
        option capacity K (> 0 exactly when the scorer has options). Returns global (sums, argmax[,
        option_argmax]) [shards * capacity]; ``layout.local_blocks`` gives this process's blocks.
        """
        layout = self.layout
        if layout is None:
            raise ValueError("dispatch_step needs a Scorer with a mesh")
        if len(batches) != len(layout.local_shards):
            raise ValueError(f"{len(batches)} sub-batches for {len(layout.local_shards)} local row shards")
        if (options > 0) != (self.options is not None):
            raise ValueError(f"option capacity {options}: must be > 0 exactly when the scorer has options")
        n = len(batches)
        tokens, positions, segment_ids = (np.zeros((n * rows, length), np.int32) for _ in range(3))
        index, target, slot = (np.zeros(n * capacity, np.int32) for _ in range(3))
        valid = np.zeros(n * capacity, bool)
        option_ids = np.zeros(n * options, np.int32)
        option_mask = np.zeros((n * capacity, options), bool)
        for k, b in enumerate(batches):
            if b is None:
                continue
            if (b.rows, b.row_length) != (rows, length) or b.capacity > capacity:
                raise ValueError(f"sub-batch shape {(b.rows, b.row_length, b.capacity)} does not fit step "
                                 f"{(rows, length, capacity)}")
            r, c = slice(k * rows, (k + 1) * rows), slice(k * capacity, k * capacity + b.capacity)
            tokens[r], positions[r], segment_ids[r] = b.tokens, b.positions, b.segment_ids
            index[c], target[c], slot[c], valid[c] = b.score_index, b.score_target, b.score_slot, b.score_valid
            if self.options is not None:
                option_ids[k * options:(k + 1) * options], option_mask[c] = option_plan(b, self.options, options)
        plan_host = [index, target, valid, slot] + ([option_ids, option_mask] if self.options is not None else [])
        with jax.set_mesh(self.mesh):
            arrays = [layout.global_array(x, layout.rows_sharding) for x in (tokens, positions, segment_ids)]
            plan = [layout.global_array(x, layout.plan_sharding) for x in plan_host]
            hidden = self._forward(self.state, *arrays)
            return self._head(self.state, hidden, *plan)

    def compilations(self) -> dict[str, int]:
        """Distinct compiled programs so far (forward per (B, L); head per (B, L, C))."""
        return {"forward": self._forward._cache_size(), "head": self._head._cache_size()}


def _local_head(hidden, unembedding, score_index, score_target, score_valid, score_slot, *options,
                vocab_axes: tuple[str, ...], axis_sizes: dict, vocab_chunk: int):
    """Per-device body of the mesh head: ``logprobs.masked_logprobs`` + ``response_sums`` on this row
    shard's hidden states and plan, over this device's slice of the vocabulary, combined across
    ``vocab_axes`` (max, rescaled sum, target logit, lowest maximal index). ``options``: () or this row
    shard's (option_ids [K], option_mask [C, K]); each device takes the logits of the option ids it owns
    and the best is combined like the argmax (pmax of the logit, pmin of the id)."""
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
    if not options:
        return sums, top
    best, best_id = logprobs.option_max(h, unembedding, *options, offset=offset)
    if vocab_axes:
        none = jnp.iinfo(jnp.int32).max
        mine = jnp.where((best_id >= 0) & (best == lax.pmax(best, vocab_axes)), best_id, none)
        best_id = lax.pmin(mine, vocab_axes)
        best_id = jnp.where(best_id == none, -1, best_id)
    return sums, top, jnp.where(score_valid, best_id, -1)


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
                                f"context or the longest row); the reference protocol cuts by characters only "
                                f"(use --protocol=robust); a robust budget plus its free prefix (BOS, chat header, "
                                f"persona) must fit (lower --config.max_tokens or raise --config.persona_reserve)")
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


def _results(participants: list[ParticipantSpans], batches, sums, tops, option_tops=None) -> dict:
    """Per-participant results from per-batch host outputs (``option_tops``: per-batch option_argmax [C])."""
    unpacked = packing.unpack(batches, sums, tops)
    # unpack places any per-entry values at their positions: reused for option_argmax ([T], -1 unscored).
    options = packing.unpack(batches, sums, option_tops) if option_tops is not None else None
    out = {}
    for p in participants:
        scores = unpacked[p.key]
        positions = np.flatnonzero(scores.argmax >= 0)
        option = options[p.key].argmax[positions] if options is not None else None
        out[p.key] = ParticipantResult(p, scores.nll, scores.n_scored, scores.argmax[positions],
                                       p.token_ids[positions], option)
    return out


def _score_chunk(participants: list[ParticipantSpans], scorer: Scorer, row_lengths, tokens_per_batch,
                 progress: Progress) -> dict:
    batches = packing.pack(participants, row_lengths, tokens_per_batch=tokens_per_batch)
    outputs = [scorer.dispatch(b) for b in batches]  # all enqueued before the first result is read
    columns = zip(*[[np.asarray(x) for x in out] for out in outputs])  # sums, tops[, option tops]
    progress.computed_tokens += sum(b.computed_tokens for b in batches)
    return _results(participants, batches, *columns)


@dataclasses.dataclass(frozen=True)
class Step:
    """One SPMD step of a round: sub-batch shape, plan capacity, per local slot the index of this
    process's packed batch that fills it (None: empty), and the option capacity K (0: no options)."""

    rows: int
    length: int
    capacity: int
    slots: tuple[int | None, ...]
    options: int = 0


def plan_steps(tables: Sequence[np.ndarray], process_share: Sequence[int], share: int, slots: int) -> list[Step]:
    """The common step schedule of one round, as seen by share ``share``.

    ``tables[p]``: int [n_p, 3] (rows, length, capacity) of process p's packed batches, or [n_p, 4] with
    their option capacities (processes of one share hold identical tables); ``process_share[p]``: p's
    share; ``slots``: sub-batches per share and step. For each sub-batch shape (sorted), each share's
    batches of that shape are ordered by decreasing capacity and dealt ``slots`` per step; the step count
    is the largest share's and a step's capacity (and option capacity) the largest among its sub-batches.
    Every process derives the same steps from the same tables.
    """
    firsts = {}
    for p, s in enumerate(process_share):
        firsts.setdefault(s, p)
    width = np.shape(tables[0])[-1]
    per_share = {s: np.asarray(tables[p]).reshape(-1, width) for s, p in firsts.items()}
    shapes = sorted({(int(r), int(l)) for t in per_share.values() for r, l in t[:, :2]})
    steps = []
    for rows, length in shapes:
        order = {}
        for s, t in per_share.items():
            mine = [i for i in range(len(t)) if (t[i, 0], t[i, 1]) == (rows, length)]
            order[s] = sorted(mine, key=lambda i: (-int(t[i, 2]), i))
        n_steps = max(-(-len(o) // slots) for o in order.values())
        for j in range(n_steps):
            members = [per_share[s][i] for s, o in order.items() for i in o[j * slots:(j + 1) * slots]]
            capacity = max(int(t[2]) for t in members)
            options = max(int(t[3]) if width > 3 else 0 for t in members)
            mine = order.get(share, [])[j * slots:(j + 1) * slots]
            steps.append(Step(rows, length, capacity, tuple(mine) + (None,) * (slots - len(mine)), options))
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
        width = 3 if scorer.options is None else 4  # + the option capacity
        table = np.asarray([(b.rows, b.row_length, b.capacity, scorer.option_capacity(b))[:width] for b in batches],
                           np.int32).reshape(-1, width)
        header = distributed.allgather(np.asarray([len(batches), done], np.int32))
        tables = distributed.allgather_rows(table) if header[:, 0].max() > 0 else [table[:0]] * len(header)
        steps = plan_steps(tables, layout.process_share, layout.share_index, len(layout.local_shards))
        outputs = [scorer.dispatch_step([None if i is None else batches[i] for i in st.slots], st.rows,
                                        st.length, st.capacity, st.options) for st in steps]
        host: list = [None] * len(batches)  # per batch: sums, tops[, option tops]
        for st, out in zip(steps, outputs):
            blocks = [layout.local_blocks(x) for x in out]
            for k, i in enumerate(st.slots):
                if i is not None:
                    host[i] = [b[layout.local_shards[k]] for b in blocks]
        progress.computed_tokens += sum(b.computed_tokens for b in batches)
        results = _results(scored, batches, *zip(*host)) if scored else {}
        if chunk:
            yield from run_chunk(chunk, results)
        if header[:, 1].all():
            return
