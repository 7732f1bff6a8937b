"""Plain-path oracles of the head (tests only): whole-batch NLL / argmax, option argmax and response sums,
written without shard_map so the production head (``scoring.head.score_head``) can be checked against them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from psych201_jax.scoring.head import option_logits, option_max, vocab_scan


@functools.partial(jax.jit, static_argnames=("vocab_chunk",))
def masked_logprobs(
    hidden: jax.Array,
    unembedding: jax.Array,
    score_index: jax.Array,
    score_target: jax.Array,
    score_valid: jax.Array,
    *,
    vocab_chunk: int = 8192,
) -> tuple[jax.Array, jax.Array]:
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
    if replicated is not None:  # the scan gathers along the vocabulary: one whole copy (the head runs per shard)
        unembedding = jax.sharding.reshard(unembedding, P())
    stats = vocab_scan(h, unembedding, score_target, vocab_chunk)
    nll = jnp.where(score_valid, jnp.log(stats.sum) + stats.max - stats.target_logit, 0.0)
    return nll, jnp.where(score_valid, stats.arg, -1).astype(jnp.int32)


@jax.jit
def masked_option_argmax(
    hidden: jax.Array,
    unembedding: jax.Array,
    score_index: jax.Array,
    score_valid: jax.Array,
    option_ids: jax.Array,
    option_mask: jax.Array,
) -> jax.Array:
    """int32 [C]: argmax of the logits restricted to each scored entry's option ids (those ``option_mask``
    marks; lowest id on ties); -1 for invalid entries and entries without option ids.

    hidden [B, L, D]; unembedding [V, D]; score_index int [C]; score_valid bool [C]; option_ids int32 [K]
    and option_mask bool [C, K] as in ``option_max``.
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d).at[score_index].get(mode="clip")  # [C, D]
    _, best_id = option_max(option_logits(h, unembedding, option_ids, option_mask), option_ids)
    return jnp.where(score_valid, best_id, -1)


@functools.partial(jax.jit, static_argnames=("num_slots",))
def response_sums(nll: jax.Array, score_slot: jax.Array, score_valid: jax.Array, num_slots: int) -> jax.Array:
    """float32 [num_slots]: sum of the valid entries' NLL per response slot (segment_sum in float32).

    Pass ``num_slots`` = the plan capacity C to keep one compiled shape per capacity.
    """
    values = jnp.where(score_valid, nll.astype(jnp.float32), 0.0)
    return jax.ops.segment_sum(values, score_slot, num_segments=num_slots)
