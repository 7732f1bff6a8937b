"""The masked log-prob head: per-response NLL sums, per-token argmax and option argmax at scored positions.

Only the C scored hidden states are gathered, and the vocabulary is visited in chunks with an online
float32 logsumexp, so at most [C, vocab_chunk] logits exist at a time; the full [B * L, V] (or [C, V])
logits are never built. Response options need only [K, D] rows of the unembedding.

``score_head`` is the one head of every layout: it runs per row shard under ``shard_map`` (a single
device is a 1 x 1 x 1 mesh) on that shard's hidden states and plan, over the device's slice of the
vocabulary, and combines the statistics across the vocabulary axes (none on one device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int


def vocab_scan(
    h: Float[Array, "c d"], unembedding: Float[Array, "v d"], target: Int[Array, " c"], vocab_chunk: int
) -> tuple[Float[Array, " c"], Float[Array, " c"], Int[Array, " c"], Float[Array, " c"]]:
    """Online softmax statistics of ``h @ unembedding.T`` over vocabulary chunks.

    h [C, D]; unembedding [V, D] (possibly one shard of the vocabulary); target int [C] indexed into this
    unembedding (out-of-range ids never match). Returns float32 running max [C], sum of exp(logit - max)
    [C], int32 argmax [C] (lowest index among maximal logits) and the target logit [C] (0 if absent).
    At most [C, vocab_chunk] logits exist at a time.
    """
    v = unembedding.shape[0]
    chunk = min(vocab_chunk, v)
    n_chunks = -(-v // chunk)
    columns = jnp.arange(chunk)

    def step(carry, i):
        run_max, run_sum, run_arg, target_logit = carry
        # The last chunk is shifted left to stay in bounds (no padded copy of the unembedding);
        # its columns already seen in the previous chunk are masked to -inf.
        first = i * chunk
        start = jnp.minimum(first, v - chunk)
        w = lax.dynamic_slice_in_dim(unembedding, start, chunk, axis=0).astype(h.dtype)
        logits = jnp.einsum(
            "cd,vd->cv", h, w, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST
        )  # [C, chunk]
        logits = jnp.where(start + columns >= first, logits, -jnp.inf)
        chunk_max = logits.max(axis=1)
        new_max = jnp.maximum(run_max, chunk_max)
        run_sum = run_sum * jnp.exp(run_max - new_max) + jnp.exp(logits - new_max[:, None]).sum(axis=1)
        run_arg = jnp.where(chunk_max > run_max, start + jnp.argmax(logits, axis=1), run_arg)
        # A masked sum rather than a gather, so a vocabulary-sharded chunk needs no resharding.
        picked = jnp.where(start + columns == target[:, None], logits, 0.0).sum(axis=1)
        in_chunk = (target >= first) & (target < first + chunk)
        target_logit = jnp.where(in_chunk, picked, target_logit)
        return (new_max, run_sum, run_arg, target_logit), None

    c = h.shape[0]
    init = (
        jnp.full(c, -jnp.inf, jnp.float32),
        jnp.zeros(c, jnp.float32),
        jnp.zeros(c, jnp.int32),
        jnp.zeros(c, jnp.float32),
    )
    out, _ = lax.scan(step, init, jnp.arange(n_chunks))
    return out


def option_max(
    h: Float[Array, "c d"],
    unembedding: Float[Array, "v d"],
    option_ids: Int[Array, " k"],
    option_mask: Bool[Array, "c k"],
    offset: Int[Array, ""] | int = 0,
) -> tuple[Float[Array, " c"], Int[Array, " c"]]:
    """Best logit of each entry among its options that this unembedding holds.

    h [C, D]; unembedding [V, D] holding vocabulary ids offset .. offset + V - 1 (a vocabulary shard, or
    all of it); option_ids int32 [K], ascending over the ids any entry may choose; option_mask bool [C, K]:
    the options of each entry. Returns the max logit float32 [C] (-inf where the entry has no option
    here) and the lowest option id reaching it int32 [C] (-1 where none). Builds [K, D] and [C, K] only.
    """
    v = unembedding.shape[0]
    local = option_ids - offset
    mask = option_mask & ((local >= 0) & (local < v))[None, :]
    w = jnp.take(unembedding, jnp.clip(local, 0, v - 1), axis=0).astype(h.dtype)  # [K, D]
    logits = jnp.einsum(
        "cd,kd->ck", h, w, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST
    )  # [C, K]
    logits = jnp.where(mask, logits, -jnp.inf)
    k = jnp.argmax(logits, axis=1)  # first maximal column: the lowest id
    best_id = jnp.where(mask.any(axis=1), option_ids[k], -1).astype(jnp.int32)
    return logits.max(axis=1), best_id


def score_head(
    hidden: Float[Array, "b l d"],
    unembedding: Float[Array, "v d"],
    score_index: Int[Array, " c"],
    score_target: Int[Array, " c"],
    score_valid: Bool[Array, " c"],
    score_slot: Int[Array, " c"],
    *options: Array,
    vocab_axes: tuple[str, ...],
    axis_sizes: dict[str, int],
    vocab_chunk: int,
) -> tuple[Array, ...]:
    """Per-device body of the head on one row shard's hidden states and plan.

    Returns float32 response sums [C] (per slot), argmax int32 [C] (-1 for padding entries) and, with
    ``options`` = (option_ids [K], option_mask [C, K]), the option argmax int32 [C]. ``unembedding`` is this
    device's slice of the vocabulary; statistics are combined across ``vocab_axes`` (max, rescaled sum,
    target logit, lowest maximal index; the option argmax by pmax of the logit, pmin of the id).
    """
    d = hidden.shape[-1]
    v = unembedding.shape[0]
    offset: Array | int = 0
    for axis in vocab_axes:
        offset = offset * axis_sizes[axis] + lax.axis_index(axis)
    offset = offset * v
    h = hidden.reshape(-1, d).at[score_index].get(mode="clip")  # [C, D]
    target = score_target - offset
    run_max, run_sum, run_arg, target_logit = vocab_scan(h, unembedding, target, vocab_chunk)
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
    # options is (option_ids, option_mask): mypy cannot see that the splat fills exactly those two
    best, best_id = option_max(h, unembedding, *options, offset=offset)  # type: ignore[misc]
    if vocab_axes:
        none = jnp.iinfo(jnp.int32).max
        mine = jnp.where((best_id >= 0) & (best == lax.pmax(best, vocab_axes)), best_id, none)
        best_id = lax.pmin(mine, vocab_axes)
        best_id = jnp.where(best_id == none, -1, best_id)
    return sums, top, jnp.where(score_valid, best_id, -1)
