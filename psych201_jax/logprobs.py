"""Masked log-prob kernel: per-token NLL and argmax at scored positions only, and per-response sums.

Only the C scored hidden states are gathered, and the vocabulary is visited in chunks with an online
float32 logsumexp, so at most [C, vocab_chunk] logits exist at a time; the full [B * L, V] (or [C, V])
logits are never built. Response options (``option_max``) need only [K, D] rows of the unembedding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def vocab_scan(h: jax.Array, unembedding: jax.Array, target: jax.Array, vocab_chunk: int
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
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
        logits = jnp.einsum("cd,vd->cv", h, w, preferred_element_type=jnp.float32,
                            precision=lax.Precision.HIGHEST)  # [C, chunk]
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
    init = (jnp.full(c, -jnp.inf, jnp.float32), jnp.zeros(c, jnp.float32), jnp.zeros(c, jnp.int32),
            jnp.zeros(c, jnp.float32))
    out, _ = lax.scan(step, init, jnp.arange(n_chunks))
    return out


@functools.partial(jax.jit, static_argnames=("vocab_chunk",))
def masked_logprobs(hidden: jax.Array, unembedding: jax.Array, score_index: jax.Array,
                    score_target: jax.Array, score_valid: jax.Array, *,
                    vocab_chunk: int = 8192) -> tuple[jax.Array, jax.Array]:
    """NLL and argmax of the next-token distribution at the scored entries.

    hidden [B, L, D] final hidden states; unembedding [V, D]; score_index int [C] flat index into
    B * L; score_target int [C] in [0, V); score_valid bool [C].
    Returns nll float32 [C] (-log softmax(logits)[target], 0 for invalid entries) and argmax int32 [C]
    (lowest index among maximal logits, like jnp.argmax; -1 for invalid entries).
    Logits are computed in the hidden dtype with float32 accumulation.
    """
    d = hidden.shape[-1]
    flat = hidden.reshape(-1, d)
    # Under an explicit-sharding mesh the gathered [C, D] rows are replicated (C is small).
    mesh = jax.typeof(flat).sharding.mesh
    replicated = None if mesh.empty else NamedSharding(mesh, P())
    h = flat.at[score_index].get(mode="clip", out_sharding=replicated)  # [C, D]
    run_max, run_sum, run_arg, target_logit = vocab_scan(h, unembedding, score_target, vocab_chunk)
    nll = jnp.where(score_valid, jnp.log(run_sum) + run_max - target_logit, 0.0)
    return nll, jnp.where(score_valid, run_arg, -1).astype(jnp.int32)


def option_max(h: jax.Array, unembedding: jax.Array, option_ids: jax.Array, option_mask: jax.Array,
               offset: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
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
    logits = jnp.einsum("cd,kd->ck", h, w, preferred_element_type=jnp.float32,
                        precision=lax.Precision.HIGHEST)  # [C, K]
    logits = jnp.where(mask, logits, -jnp.inf)
    k = jnp.argmax(logits, axis=1)  # first maximal column: the lowest id
    best_id = jnp.where(mask.any(axis=1), option_ids[k], -1).astype(jnp.int32)
    return logits.max(axis=1), best_id


@jax.jit
def masked_option_argmax(hidden: jax.Array, unembedding: jax.Array, score_index: jax.Array,
                         score_valid: jax.Array, option_ids: jax.Array, option_mask: jax.Array) -> jax.Array:
    """int32 [C]: argmax of the logits restricted to each scored entry's options (lowest id on ties); -1 for
    invalid entries and entries without options.

    hidden [B, L, D]; unembedding [V, D]; score_index int [C]; score_valid bool [C]; option_ids int32 [K]
    and option_mask bool [C, K] as in ``option_max``.
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d).at[score_index].get(mode="clip")  # [C, D]
    _, best_id = option_max(h, unembedding, option_ids, option_mask)
    return jnp.where(score_valid, best_id, -1)


@functools.partial(jax.jit, static_argnames=("num_slots",))
def response_sums(nll: jax.Array, score_slot: jax.Array, score_valid: jax.Array,
                  num_slots: int) -> jax.Array:
    """float32 [num_slots]: sum of the valid entries' NLL per response slot (segment_sum in float32).

    Pass ``num_slots`` = the plan capacity C to keep one compiled shape per capacity.
    """
    values = jnp.where(score_valid, nll.astype(jnp.float32), 0.0)
    return jax.ops.segment_sum(values, score_slot, num_segments=num_slots)
