"""The masked log-prob head: per-response NLL sums, per-token argmax and option argmax at scored positions,
and the calibration statistics (NLL under a temperature grid, entropy, option mass) in the same pass,
returned by name as one ``HeadOutputs``.

It sees only the C scored hidden states (the last layer ran only there, see ``scorer``), and visits the
vocabulary in chunks with an online float32 logsumexp, so at most [C, vocab_chunk] logits exist at a
time; the full [B * L, V] (or [C, V]) logits are never built. The option ids (the union of the batch's
study option sets, see ``options.option_plan``) need only [K, D] rows of the unembedding.

``score_head`` is the one head of every layout: it runs per row shard under ``shard_map`` (a single
device is a 1 x 1 x 1 mesh) on that shard's hidden states and plan, over the device's slice of the
vocabulary, and combines the statistics across the vocabulary axes (none on one device).

Gemma 2's final-logit soft cap (``softcap``: cap * tanh(l / cap)) is applied to each chunk's logits as the
matmul produces them, before the max and the logsumexp, so the NLL, argmax, temperature grid, entropy,
option argmax and option mass all see the capped logits, as HF's do.

Temperatures: for each T of the grid the scan keeps sum_v exp((l_v - m) / T) beside the T = 1 sum, so
NLL_T = m / T + log(sum_T) - l_target / T needs no second pass; the entropy of the T = 1 distribution is
log Z - E_p[l], from the running sum of exp(l_v - m) * l_v.
"""

from __future__ import annotations

import dataclasses
import math
import typing

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from psych201_jax.model.layers import soft_cap

ARGMAX_BLOCK = 128  # columns per block of the two-level argmax (a TPU lane width)

A = typing.TypeVar("A")  # jax.Array on the device, np.ndarray once copied to the host

PER_SLOT = "slot"  # an output summed per response slot [C, ...] (``segment_sum`` over ``score_slot``)
PER_ENTRY = "entry"  # an output per plan entry [C] (-1 for padding entries)


def _output(per: str, *, optional: bool = True) -> typing.Any:
    """A ``HeadOutputs`` field, ``PER_SLOT`` or ``PER_ENTRY``; an optional one defaults to None."""
    metadata = {"per": per}
    return dataclasses.field(default=None, metadata=metadata) if optional else dataclasses.field(metadata=metadata)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadOutputs(typing.Generic[A]):
    """The head's outputs for one plan (capacity C), by name; an output the head does not compute is None.

    nll           float32 [C]      slot sums of the NLL (per response slot, see ``PackedBatch.score_slot``).
    argmax        int32 [C]        per entry: the top token (lowest id on ties; -1 for padding entries).
    option_argmax int32 [C] | None per entry: the top token among the entry's option ids (-1: none; with
                                   option inputs).
    nll_t         float32 [C, nT] | None  slot sums of the NLL under softmax(logits / T) per temperature T.
    entropy       float32 [C] | None      slot sums of the T = 1 entropy (with temperatures).
    option_mass   float32 [C] | None      slot sums of the T = 1 probability of the entry's option ids (with
                                          option inputs and temperatures).

    A JAX pytree (None fields have no leaves), so jitted and ``shard_map`` programs return it whole; the
    same class holds the host copies (``HeadOutputs[np.ndarray]``). ``packing.unpack`` turns a batch's
    outputs into per-participant arrays of the same names.
    """

    nll: A = _output(PER_SLOT, optional=False)
    argmax: A = _output(PER_ENTRY, optional=False)
    option_argmax: A | None = _output(PER_ENTRY)
    nll_t: A | None = _output(PER_SLOT)
    entropy: A | None = _output(PER_SLOT)
    option_mass: A | None = _output(PER_SLOT)

    def slot_sums(self) -> dict[str, A]:
        """name -> value of the computed (not None) outputs that are slot sums."""
        return self._computed(PER_SLOT)

    def entry_values(self) -> dict[str, A]:
        """name -> value of the computed (not None) outputs that are per plan entry."""
        return self._computed(PER_ENTRY)

    def _computed(self, per: str) -> dict[str, A]:
        fields = (f.name for f in dataclasses.fields(self) if f.metadata["per"] == per)
        return {name: value for name in fields if (value := getattr(self, name)) is not None}


def default_vocab_chunk(platform: str) -> int:
    """Vocabulary columns per step of the scan on ``platform`` (a jax platform name).

    CPU: 1,024, so the passes over each [C, chunk] block of logits stay in cache (measured at C = 5,120,
    D = 256, V = 151,936, 2 cores: 1.7 s, or 4.5 s with the default temperature grid, against 1.8 s / 4.9 s
    at 2,048 and 1.8 s / 6.2 s at 4,096); accelerators: 8,192, fewer and larger matmuls.
    """
    return 1024 if platform == "cpu" else 8192


class VocabStats(typing.NamedTuple):
    """Online softmax statistics of one entry set over (a shard of) the vocabulary, all float32 [C] unless
    noted: running max, sum of exp(l - max), int32 argmax (lowest index), target logit (0 if absent), the
    sum of exp((l - max) / T) per temperature [C, nT], and the sum of exp(l - max) * l (entropy). Read its
    fields by name."""

    max: Array
    sum: Array
    arg: Array
    target_logit: Array
    sum_t: Array
    weighted: Array


def vocab_scan(
    h: Float[Array, "c d"],
    unembedding: Float[Array, "v d"],
    target: Int[Array, " c"],
    vocab_chunk: int,
    temperatures: tuple[float, ...] = (),
    softcap: float | None = None,
) -> VocabStats:
    """Online softmax statistics of ``h @ unembedding.T`` (through the soft cap ``softcap``, if any) over
    vocabulary chunks.

    h [C, D]; unembedding [V, D] (possibly one shard of the vocabulary); target int [C] indexed into this
    unembedding (out-of-range ids never match). ``temperatures`` adds the per-temperature sums and the
    entropy sum (empty: they stay zero and cost nothing). At most [C, vocab_chunk] logits exist at a time.

    Each chunk is one matmul and a few passes over its logits: the max (by blocks, for the argmax), the
    exp-sum, and one per temperature. The argmax and the target logit are gathered from the very logits the
    max and the sum saw, so they carry no rounding of their own. A vocabulary that is not a multiple of the
    chunk ends with one smaller step, so no column is masked or padded.
    """
    v = unembedding.shape[0]
    chunk = min(vocab_chunk, v)
    n_full, rest = divmod(v, chunk)
    calibrate = bool(temperatures)

    def step(carry: VocabStats, start, w: Float[Array, "n d"]) -> VocabStats:
        n = w.shape[0]
        logits = jnp.einsum(
            "cd,vd->cv", h, w.astype(h.dtype), preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST
        )  # [C, n]
        logits = soft_cap(logits, softcap)
        chunk_max, chunk_arg = _max_argmax(logits)
        new_max = jnp.maximum(carry.max, chunk_max)
        shifted = logits - new_max[:, None]
        decay = jnp.exp(carry.max - new_max)
        p = jnp.exp(shifted)
        run_sum = carry.sum * decay + p.sum(axis=1)
        run_arg = jnp.where(chunk_max > carry.max, start + chunk_arg, carry.arg)
        local = target - start
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, n - 1)[:, None], axis=1)[:, 0]
        target_logit = jnp.where((local >= 0) & (local < n), picked, carry.target_logit)
        sum_t, weighted = carry.sum_t, carry.weighted
        if calibrate:
            sums = [
                carry.sum_t[:, k] * jnp.exp((carry.max - new_max) / t) + jnp.exp(shifted / t).sum(axis=1)
                for k, t in enumerate(temperatures)
            ]
            sum_t = jnp.stack(sums, axis=1)
            weighted = carry.weighted * decay + (p * logits).sum(axis=1)
        return VocabStats(new_max, run_sum, run_arg, target_logit, sum_t, weighted)

    def body(carry: VocabStats, i):
        start = i * chunk
        return step(carry, start, lax.dynamic_slice_in_dim(unembedding, start, chunk, axis=0)), None

    c = h.shape[0]
    init = VocabStats(
        jnp.full(c, -jnp.inf, jnp.float32),
        jnp.zeros(c, jnp.float32),
        jnp.zeros(c, jnp.int32),
        jnp.zeros(c, jnp.float32),
        jnp.zeros((c, len(temperatures)), jnp.float32),
        jnp.zeros(c, jnp.float32),
    )
    out, _ = lax.scan(body, init, jnp.arange(n_full))
    if rest:
        out = step(out, n_full * chunk, unembedding[n_full * chunk :])
    return out


def _max_argmax(logits: Float[Array, "c n"]) -> tuple[Float[Array, " c"], Int[Array, " c"]]:
    """Row max [C] and the lowest column reaching it int32 [C] (jnp.argmax's ties), in two levels: the max
    of each ``ARGMAX_BLOCK`` columns (the one full pass), then the first block reaching the row max and
    the first column of that block. XLA's CPU argmax is a scalar loop, and a compare-select-min over all
    [C, n] logits is two more full passes (measured at C = 5,120, D = 256, V = 151,936: 2.9 s per scan
    with those, 1.7 s with this)."""
    c, n = logits.shape
    g = math.gcd(n, ARGMAX_BLOCK)  # a vocabulary shard's last chunk may not be a multiple of the block
    blocks = logits.reshape(c, n // g, g)
    block_max = blocks.max(axis=2)  # [C, n / g]
    row_max = block_max.max(axis=1)

    def first(x, m):
        return jnp.min(jnp.where(x == m[:, None], jnp.arange(x.shape[1]), x.shape[1]), axis=1)

    block = first(block_max, row_max)
    within = jnp.take_along_axis(blocks, jnp.clip(block, 0, n // g - 1)[:, None, None], axis=1)[:, 0]  # [C, g]
    return row_max, (block * g + first(within, row_max)).astype(jnp.int32)


def option_logits(
    h: Float[Array, "c d"],
    unembedding: Float[Array, "v d"],
    option_ids: Int[Array, " k"],
    option_mask: Bool[Array, "c k"],
    offset: Int[Array, ""] | int = 0,
    softcap: float | None = None,
) -> Float[Array, "c k"]:
    """float32 [C, K] logits of the option ids (through the soft cap ``softcap``, if any), -inf where an id
    is not one of the entry's options or not in this unembedding.

    unembedding [V, D] holds vocabulary ids offset .. offset + V - 1 (a vocabulary shard, or all of it);
    option_ids int32 [K], ascending over the ids any entry may choose; option_mask bool [C, K]: which of
    them are the entry's options (its study's option set). Builds [K, D] and [C, K] only.
    """
    v = unembedding.shape[0]
    local = option_ids - offset
    mask = option_mask & ((local >= 0) & (local < v))[None, :]
    w = jnp.take(unembedding, jnp.clip(local, 0, v - 1), axis=0).astype(h.dtype)  # [K, D]
    logits = jnp.einsum("cd,kd->ck", h, w, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
    return jnp.where(mask, soft_cap(logits, softcap), -jnp.inf)


def option_max(
    logits: Float[Array, "c k"], option_ids: Int[Array, " k"]
) -> tuple[Float[Array, " c"], Int[Array, " c"]]:
    """Best option logit [C] (-inf where an entry has no option) and the lowest option id reaching it
    int32 [C] (-1 where none), from ``option_logits``."""
    k = jnp.argmax(logits, axis=1)  # first maximal column: the lowest id
    best_id = jnp.where(jnp.isfinite(logits).any(axis=1), option_ids[k], -1).astype(jnp.int32)
    return logits.max(axis=1), best_id


def score_head(
    h: Float[Array, "c d"],
    unembedding: Float[Array, "v d"],
    score_target: Int[Array, " c"],
    score_valid: Bool[Array, " c"],
    score_slot: Int[Array, " c"],
    option_ids: Int[Array, " k"] | None = None,
    option_mask: Bool[Array, "c k"] | None = None,
    *,
    vocab_axes: tuple[str, ...],
    axis_sizes: dict[str, int],
    vocab_chunk: int,
    temperatures: tuple[float, ...] = (),
    softcap: float | None = None,
) -> HeadOutputs[Array]:
    """Per-device body of the head on one row shard's hidden states at its plan entries (h [C, D]) and plan.

    Returns the ``HeadOutputs``: always ``nll`` and ``argmax``; with the option inputs (``option_ids`` [K]
    and ``option_mask`` [C, K], see ``options.option_plan``) ``option_argmax``; with ``temperatures``
    ``nll_t`` and ``entropy``, and with both ``option_mass``; all of them over the logits through the
    final-logit soft cap ``softcap`` (Gemma 2; None: none).
    ``unembedding`` is this device's slice of the vocabulary; statistics are combined across
    ``vocab_axes`` (max, rescaled sums, target logit, lowest maximal index; the option argmax by pmax of
    the logit, pmin of the id; option mass by psum).
    """
    if (option_ids is None) != (option_mask is None):
        raise ValueError("option_ids and option_mask come together")
    v = unembedding.shape[0]
    offset: Array | int = 0
    for axis in vocab_axes:
        offset = offset * axis_sizes[axis] + lax.axis_index(axis)
    offset = offset * v
    target = score_target - offset
    stats = vocab_scan(h, unembedding, target, vocab_chunk, temperatures, softcap)
    run_max, run_sum, run_arg, target_logit = stats.max, stats.sum, stats.arg, stats.target_logit
    sum_t, weighted = stats.sum_t, stats.weighted
    c = h.shape[0]
    if vocab_axes:
        global_max = lax.pmax(run_max, vocab_axes)
        run_sum = lax.psum(run_sum * jnp.exp(run_max - global_max), vocab_axes)
        if temperatures:
            t = jnp.asarray(temperatures, jnp.float32)
            sum_t = lax.psum(sum_t * jnp.exp((run_max - global_max)[:, None] / t), vocab_axes)
            weighted = lax.psum(weighted * jnp.exp(run_max - global_max), vocab_axes)
        owns = (target >= 0) & (target < v)
        target_logit = lax.psum(jnp.where(owns, target_logit, 0.0), vocab_axes)
        top = jnp.where(run_max == global_max, offset + run_arg, jnp.iinfo(jnp.int32).max)
        run_arg = lax.pmin(top.astype(jnp.int32), vocab_axes)
        run_max = global_max
    lse = jnp.log(run_sum) + run_max

    def slot_sums(x):
        return jax.ops.segment_sum(
            jnp.where(score_valid.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0), score_slot, num_segments=c
        )

    nll = slot_sums(lse - target_logit)
    argmax = jnp.where(score_valid, run_arg, -1).astype(jnp.int32)
    option_argmax = nll_t = entropy = option_mass = None
    logits = None
    if option_ids is not None and option_mask is not None:
        logits = option_logits(h, unembedding, option_ids, option_mask, offset=offset, softcap=softcap)
        best, best_id = option_max(logits, option_ids)
        if vocab_axes:
            none = jnp.iinfo(jnp.int32).max
            mine = jnp.where((best_id >= 0) & (best == lax.pmax(best, vocab_axes)), best_id, none)
            best_id = lax.pmin(mine, vocab_axes)
            best_id = jnp.where(best_id == none, -1, best_id)
        option_argmax = jnp.where(score_valid, best_id, -1)
    if temperatures:
        t = jnp.asarray(temperatures, jnp.float32)
        nll_t = slot_sums(run_max[:, None] / t + jnp.log(sum_t) - target_logit[:, None] / t)
        entropy = slot_sums(lse - weighted / run_sum)
        if logits is not None:
            mass = jnp.exp(logits - lse[:, None]).sum(axis=1)
            if vocab_axes:
                mass = lax.psum(mass, vocab_axes)
            option_mass = slot_sums(mass)
    return HeadOutputs(
        nll=nll, argmax=argmax, option_argmax=option_argmax, nll_t=nll_t, entropy=entropy, option_mass=option_mass
    )
