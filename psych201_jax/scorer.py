"""Stages 4–6 wired together: token spans → packed batches → model → masked log-probs → per participant.

``Scorer`` owns two jitted steps: the model forward per (rows, row length) and the log-prob head per
plan capacity, so changing the capacity never recompiles the forward. ``score_spans`` streams
participants through chunks: pack a chunk, dispatch all its batches, then unpack in input order.
Results do not depend on how participants are grouped (segment-isolated attention, per-segment
positions), which the invariance tests check.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psych201_jax import logprobs, packing
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
    """Runs packed batches through a model and the masked log-prob kernel."""

    def __init__(self, model: nnx.Module, *, vocab_chunk: int = 8192):
        graphdef, state = nnx.split(model)
        self.state = state
        self.vocab_chunk = vocab_chunk

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

    def dispatch(self, batch: packing.PackedBatch) -> tuple[jax.Array, jax.Array]:
        """Enqueues one batch (asynchronously); returns device (response sums [C], argmax [C])."""
        hidden = self._forward(self.state, jnp.asarray(batch.tokens), jnp.asarray(batch.positions),
                               jnp.asarray(batch.segment_ids))
        return self._head(self.state, hidden, jnp.asarray(batch.score_index), jnp.asarray(batch.score_target),
                          jnp.asarray(batch.score_valid), jnp.asarray(batch.score_slot))

    def compilations(self) -> dict[str, int]:
        """Distinct compiled programs so far (forward per (B, L); head per (B, L, C))."""
        return {"forward": self._forward._cache_size(), "head": self._head._cache_size()}


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
                tokens_per_batch: int = 65536, chunk_tokens: int = 1 << 20,
                progress: Progress | None = None,
                on_chunk: Callable[[Progress], None] | None = None) -> Iterator[ParticipantResult | Rejected]:
    """Scores a stream of participants; rejections pass through, in input order within each chunk.

    A participant longer than the longest row is rejected (the model context bounds a row).
    """
    progress = progress or Progress()
    max_row = max(row_lengths)
    chunk: list[ParticipantSpans | Rejected] = []
    chunk_len = 0

    def run_chunk():
        scored = [p for p in chunk if isinstance(p, ParticipantSpans)]
        results = _score_chunk(scored, scorer, row_lengths, tokens_per_batch, progress) if scored else {}
        for item in chunk:
            yield results[item.key] if isinstance(item, ParticipantSpans) else item
        progress.participants += len(chunk)
        progress.tokens += sum(len(p.token_ids) for p in scored)
        if on_chunk is not None:
            on_chunk(progress)
        chunk.clear()

    for item in items:
        if isinstance(item, ParticipantSpans) and len(item.token_ids) > max_row:
            item = Rejected(item.study, item.experiment, item.participant, item.source, item.line,
                            f"{len(item.token_ids)} tokens exceed the longest row ({max_row} tokens, the "
                            f"model context); use --protocol=robust to cut by a token budget")
        chunk.append(item)
        chunk_len += len(item.token_ids) if isinstance(item, ParticipantSpans) else 0
        if chunk_len >= chunk_tokens:
            yield from run_chunk()
            chunk_len = 0
    if chunk:
        yield from run_chunk()


def _score_chunk(participants: list[ParticipantSpans], scorer: Scorer, row_lengths, tokens_per_batch,
                 progress: Progress) -> dict:
    batches = packing.pack(participants, row_lengths, tokens_per_batch=tokens_per_batch)
    outputs = [scorer.dispatch(b) for b in batches]  # all enqueued before the first result is read
    sums, tops = zip(*[(np.asarray(s), np.asarray(t)) for s, t in outputs])
    progress.computed_tokens += sum(b.computed_tokens for b in batches)
    unpacked = packing.unpack(batches, sums, tops)
    out = {}
    for p in participants:
        scores = unpacked[p.key]
        positions = np.flatnonzero(scores.argmax >= 0)
        out[p.key] = ParticipantResult(p, scores.nll, scores.n_scored, scores.argmax[positions],
                                       p.token_ids[positions])
    return out
