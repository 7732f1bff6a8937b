"""Slot sampling on a shared trunk: k continuations of every human response slot, from the teacher-forced
history, for all slots of a packed row at once.

One prefill per packed batch: the ordinary forward (``Decoder.prefill``, the scoring forward's layers)
keeps every softmax-attention layer's keys and values after RoPE, [La, B, T, Hk, hd]. Then all branches of
a row (``slots.BranchPlan``: C per row, static) decode together, one token per step, through the same
layers (``Decoder.with_attention``): a branch's query attends to (a) its row's keys of its own participant
up to its prefix end p (``attention_at_lse``: the scoring masks, the sliding window ending at the
branch's true index p + 1 + step) and (b) its own generated keys (a small cache [B, C, M, Hk, hd] per
layer); the two softmaxes are merged through their log-sum-exps. No branch copies the prefix.

Sampling: temperature T (0: greedy), per participant if asked (``temperature_of``), optional top-k /
top-p (global), and an optional restriction of the first token to the study's options (per participant:
``options_of``; else ``SamplingConfig.options``); both travel in the plan as arrays ([B, C] and
[B, C, K]), so they cost no compilation. The random stream of a branch is folded from (seed, participant
hash, response, sample, step), so samples do not depend on packing, batch shapes, the mesh or which pass a
branch lands in. Each generated token's log-probability is recorded under the model itself (T = 1, no
restriction: the probability the scorer gives it). A branch stops when its generated suffix equals the
closing marker's token ids, at a stop token (EOS), or after ``max_new_tokens``; the returned response
excludes the marker or stop token.

On a mesh (``SlotSampler(mesh=)``) the parameters lie on their logical-axis shardings and both programs
run under ``jax.set_mesh`` with the rows and branches replicated.

Gated DeltaNet hybrids (Qwen3.5, Qwen3.5-MoE) take ``hybrid.py``'s path: each linear-attention layer's
recurrent state (and conv inputs) at every slot's prefix end, advanced one token per step; routed MLPs route
each decode token as scoring does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Hashable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from psych201_jax.model.attention import attention_at_lse
from psych201_jax.model.axes import ACT_BATCH
from psych201_jax.model.decoder import Decoder
from psych201_jax.model.layers import soft_cap
from psych201_jax.model.params import ATTENTION_INPUT
from psych201_jax.model.spec import ModelSpec
from psych201_jax.parallel import sharding
from psych201_jax.sampling import hybrid
from psych201_jax.sampling import slots as slots_lib
from psych201_jax.scoring import packing

STOP_MARKER, STOP_TOKEN, STOP_LENGTH = "marker", "token", "length"  # why a sample ended
_CODES = {0: STOP_LENGTH, 1: STOP_MARKER, 2: STOP_TOKEN}


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How branches are drawn and when they stop.

    samples: k branches per slot. max_new_tokens: M, the most tokens a branch generates (stop tokens
    included). temperature: T > 0, or 0 for greedy (participants without their own, see
    ``SlotSampler.sample_batch``). top_k: keep the k best tokens (0: off). top_p: keep the
    smallest set of best tokens with probability >= p (1: off). seed: of every branch's random stream.
    close_ids: the closing marker's token ids (``>>``): a branch ends when its generated suffix equals them.
    stop_ids: tokens that end a branch (EOS). options: if not empty, the first token is drawn among these
    ids only (the study's response options; participants without their own). branch_capacity: C, branches
    per row and decode pass.
    """

    samples: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    close_ids: tuple[int, ...] = ()
    stop_ids: tuple[int, ...] = ()
    options: tuple[int, ...] = ()
    branch_capacity: int = 64

    def __post_init__(self):
        if self.samples < 1 or self.max_new_tokens < 1 or self.branch_capacity < 1:
            raise ValueError("samples, max_new_tokens and branch_capacity must be positive")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or not 0 <= self.seed < 2**32:
            raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1, 0 <= seed < 2**32; got {self}")
        for name in ("close_ids", "stop_ids", "options"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))


@dataclasses.dataclass(frozen=True)
class Sample:
    """One branch's result: ``generated`` int32, every token it drew (a closing marker or stop token
    included); ``logprobs`` float32, the model's (T = 1) log-probability of each; ``length``: tokens of the
    response (``generated`` without the marker or stop token); ``stop``: STOP_MARKER, STOP_TOKEN or
    STOP_LENGTH (max_new_tokens reached)."""

    generated: np.ndarray
    logprobs: np.ndarray
    length: int
    stop: str

    @property
    def tokens(self) -> np.ndarray:
        return self.generated[: self.length]

    @property
    def logprob(self) -> float:
        """The model's log-probability of the whole sample, its closing marker or stop token included."""
        return float(np.sum(self.logprobs, dtype=np.float64))

    @property
    def stopped(self) -> bool:
        return self.stop != STOP_LENGTH


@dataclasses.dataclass(frozen=True)
class SlotSamples:
    """The k samples of one (participant, response slot), and the human's own response tokens."""

    key: Hashable
    response: int
    human: np.ndarray
    samples: tuple[Sample, ...]

    @property
    def tokens(self) -> list[np.ndarray]:
        return [s.tokens for s in self.samples]

    @property
    def logprobs(self) -> np.ndarray:
        return np.asarray([s.logprob for s in self.samples])

    @property
    def stopped(self) -> np.ndarray:
        return np.asarray([s.stopped for s in self.samples])


def _activation_rules(rules: sharding.Rules) -> sharding.Rules:
    """``rules`` with the activation batch (rows) replicated: a batch's rows and branches stay whole on every
    device (few rows, not always a multiple of the row shards); parameters and heads stay split."""
    return tuple(r for r in rules if r[0] != ACT_BATCH)


@functools.lru_cache(maxsize=64)
def _programs(graphdef, key: tuple, mesh: jax.sharding.Mesh | None, rules: sharding.Rules | None):
    """The jitted (prefill, decode) of one model structure and one static config (``_static_key``), shared
    by every sampler with them: a new temperature, seed, option set or top-p compiles nothing."""
    static = dict(key)

    def scoped(fn):
        def run(state, *args):
            model = nnx.merge(graphdef, state)
            if rules is None:
                return fn(model, *args)
            with nnx.logical_axis_rules(rules):
                return fn(model, *args)

        return run

    def prefill(model, tokens, positions, segment_ids):
        if hybrid.is_hybrid(model.spec):
            return hybrid.prefill(model, tokens, positions, segment_ids)
        return (*model.prefill(tokens, positions, segment_ids), None)

    def decode(model, hidden, keys, values, linear_inputs, segment_ids, plan, knobs):
        args = (hidden, keys, values, linear_inputs, segment_ids, plan, knobs)
        return _decode_loop(model, model.spec, static, *args)

    return jax.jit(scoped(prefill)), jax.jit(scoped(decode))


def _static_key(config: SamplingConfig) -> tuple:
    """What the decode program is compiled for: everything else (temperature, seed, options, top-p's value)
    is an input."""
    return (
        ("max_new_tokens", config.max_new_tokens),
        ("filter", config.top_k > 0 or config.top_p < 1),
        ("close_ids", config.close_ids),
        ("stop_ids", config.stop_ids),
    )


class SlotSampler:
    """Samples the slots of packed batches with one model and one ``SamplingConfig``.

    ``mesh``: place the parameters on their shardings under ``rules`` (default
    ``sharding.rules_for(model.spec, mesh)``) and run both programs on that mesh, rows and branches
    replicated; None: one device, as the model's arrays lie. The prefill compiles once per (B, T), the decode
    loop once per (B, T, C, K) and static config (``max_new_tokens``, top-k, top-p on or off, marker and stop
    ids); samplers of the same model structure share them.
    """

    def __init__(
        self,
        model: Decoder,
        config: SamplingConfig,
        *,
        mesh: jax.sharding.Mesh | None = None,
        rules: sharding.Rules | None = None,
    ):
        self.config = config
        self.spec = model.spec
        self.mesh = mesh
        graphdef, state = nnx.split(model)
        self.rules: sharding.Rules | None = None
        program_rules = None
        if mesh is None:
            self.state = state
        else:
            self.rules = tuple(rules) if rules is not None else sharding.rules_for(model.spec, mesh)
            self.state = jax.device_put(state, sharding.state_shardings(state, mesh, self.rules))
            self._replicated = jax.NamedSharding(mesh, jax.P())
            program_rules = _activation_rules(self.rules)
        self._prefill, self._decode = _programs(graphdef, _static_key(config), mesh, program_rules)

    def _place(self, x):
        return x if self.mesh is None else jax.device_put(x, self._replicated)

    def sample_batch(
        self,
        batch: packing.PackedBatch,
        slots_of: Mapping[Hashable, list[slots_lib.Slot]],
        *,
        temperature_of: Mapping[Hashable, float] | None = None,
        options_of: Mapping[Hashable, Sequence[int]] | None = None,
    ) -> list[SlotSamples]:
        """The ``SlotSamples`` of every slot of the batch's participants (``slots_of``: key -> slots), in
        packing order. ``temperature_of[key]``: that participant's temperature (0: greedy), default
        ``config.temperature``; ``options_of[key]``: the ids its first tokens are drawn among (missing or
        empty: ``config.options``; empty: any token)."""
        cfg = self.config
        bad = {k: o for k, o in (options_of or {}).items() if any(not 0 <= int(i) < self.spec.vocab_size for i in o)}
        if bad:
            raise ValueError(f"option ids outside the vocabulary of {self.spec.vocab_size}: {bad}")
        plans = slots_lib.plan_batch(
            batch,
            slots_of,
            cfg.samples,
            cfg.branch_capacity,
            temperature=cfg.temperature,
            temperature_of=temperature_of,
            options=cfg.options,
            options_of=options_of,
        )
        scope = contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)
        draws: dict[tuple[Hashable, int], dict[int, Sample]] = {}
        with scope:
            rows = [self._place(x) for x in (batch.tokens, batch.positions, batch.segment_ids)]
            hidden, (keys, values), linear_inputs = self._prefill(self.state, *rows)
            knobs = {"seed": np.uint32(cfg.seed), "top_k": np.int32(cfg.top_k), "top_p": np.float32(cfg.top_p)}
            knobs = {name: self._place(x) for name, x in knobs.items()}
            for plan in plans:
                arrays = {name: self._place(x) for name, x in plan.arrays().items()}
                out = self._decode(self.state, hidden, keys, values, linear_inputs, rows[2], arrays, knobs)
                tokens, logprobs, n_gen, codes = (
                    np.asarray(x).reshape(-1, *np.shape(x)[2:]) for x in jax.device_get(out)
                )
                for i, branch in enumerate(plan.branches):
                    if branch is None:
                        continue
                    key, response, k = branch
                    n, code = int(n_gen[i]), int(codes[i])
                    cut = len(cfg.close_ids) if code == 1 else 1 if code == 2 else 0
                    sample = Sample(
                        tokens[i, :n].astype(np.int32), logprobs[i, :n].astype(np.float32), n - cut, _CODES[code]
                    )
                    draws.setdefault((key, response), {})[k] = sample
        results = []
        for seg in batch.segments:
            for slot in slots_of.get(seg.key, []):
                got = draws[(seg.key, slot.response)]
                samples = tuple(got[k] for k in range(cfg.samples))
                results.append(SlotSamples(seg.key, slot.response, slot.human, samples))
        return results

    def compilations(self) -> dict[str, int]:
        """Distinct compiled programs so far of this sampler's (shared) programs: prefill per (B, T), decode
        per (B, T, C, K)."""
        programs = {"prefill": self._prefill, "decode": self._decode}
        return {name: fn._cache_size() for name, fn in programs.items()}  # type: ignore[attr-defined]


def sample_participants(
    model: Decoder,
    participants: Iterable,
    config: SamplingConfig,
    *,
    row_lengths: Sequence[int],
    tokens_per_batch: int = 65536,
    temperature_of: Mapping[Hashable, float] | None = None,
    options_of: Mapping[Hashable, Sequence[int]] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: sharding.Rules | None = None,
) -> dict[tuple[Hashable, int], SlotSamples]:
    """Packs ``participants`` (``key``, ``token_ids``, ``response_index``, ``n_responses``, as for
    ``packing.pack``) and samples every response slot: (key, response) -> ``SlotSamples``.
    ``temperature_of`` / ``options_of``: per participant, as ``SlotSampler.sample_batch``; ``mesh`` /
    ``rules``: as ``SlotSampler``."""
    participants = list(participants)
    slots_of = slots_lib.slots_by_key(participants)
    sampler = SlotSampler(model, config, mesh=mesh, rules=rules)
    batches = packing.pack(participants, row_lengths, tokens_per_batch=tokens_per_batch, min_capacity=1)
    out: dict[tuple[Hashable, int], SlotSamples] = {}
    for batch in batches:
        if batch.overflow_pass:  # the same rows again (scoring's plan overflow): already sampled
            continue
        got = sampler.sample_batch(batch, slots_of, temperature_of=temperature_of, options_of=options_of)
        out.update({(s.key, s.response): s for s in got})
    return out


def _decode_loop(
    model: Decoder, spec: ModelSpec, static: dict, hidden, keys, values, linear_inputs, segment_ids, plan, knobs
):
    """All branches of a plan, decoded together until each stopped or M steps: (tokens int32 [B, C, M],
    log-probs float32 [B, C, M], tokens generated int32 [B, C], stop code int32 [B, C]: 0 length, 1 marker,
    2 stop token). ``static``: ``_static_key``'s settings; ``knobs``: the scalars ``seed`` (uint32), ``top_k`` (int32, 0
    off) and ``top_p`` (float32)."""
    prefix_end, segment, position = plan["prefix_end"], plan["segment"], plan["position"]
    b, c = prefix_end.shape
    m = static["max_new_tokens"]
    close_ids, stop_ids = static["close_ids"], static["stop_ids"]
    valid = segment > 0
    h0 = jnp.take_along_axis(hidden, prefix_end[..., None], axis=1)  # [B, C, D]: predicts the first token
    la, _, _, hk, hd = keys.shape
    own = jnp.zeros((la, b, c, m, hk, hd), keys.dtype)
    base = jax.random.key(knobs["seed"])
    words = plan["seed_words"].reshape(-1, 3)

    def branch_key(w):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, w[0]), w[1]), w[2])

    branch_keys = jax.vmap(branch_key)(words)
    unembedding = model.unembedding()
    close = jnp.asarray(close_ids, jnp.int32)
    stops = jnp.asarray(stop_ids, jnp.int32)
    allowed = _option_mask(plan["option_ids"], spec.vocab_size)  # [B, C, V] or None (no branch restricted)

    def body(carry):
        j, h, own_k, own_v, out_tok, out_lp, done, code, n_gen, linear = carry
        logits = soft_cap(
            jnp.einsum(
                "bcd,vd->bcv",
                h,
                unembedding.astype(h.dtype),
                preferred_element_type=jnp.float32,
                precision=jax.lax.Precision.HIGHEST,  # as the scorer's head: float32 logits on every backend
            ),
            spec.final_logit_softcap,
        )
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, j))(branch_keys).reshape(b, c)
        token = _choose(logits, step_keys, j, plan["temperature"], allowed, knobs if static["filter"] else None)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[..., None], axis=-1)[..., 0]
        active = valid & ~done
        out_tok = out_tok.at[:, :, j].set(jnp.where(active, token, -1))
        out_lp = out_lp.at[:, :, j].set(jnp.where(active, lp, 0.0))
        marker = jnp.zeros_like(done)
        if len(close_ids):
            tail = jax.lax.dynamic_slice_in_dim(out_tok, jnp.maximum(j + 1 - len(close_ids), 0), len(close_ids), 2)
            marker = (j + 1 >= len(close_ids)) & (tail == close).all(axis=-1)
        stop = (token[..., None] == stops).any(axis=-1) if len(stop_ids) else jnp.zeros_like(done)
        code = jnp.where(active & marker, 1, jnp.where(active & stop, 2, code))
        done = done | (active & (marker | stop))
        n_gen = jnp.where(active, j + 1, n_gen)

        def attend(q, k, v, p, window):
            return _branch_attention(q, k, v, p, window, j, prefix_end, segment, segment_ids, spec)

        inputs = {ATTENTION_INPUT + "k": keys, ATTENTION_INPUT + "v": values}
        inputs |= {ATTENTION_INPUT + "own_k": own_k, ATTENTION_INPUT + "own_v": own_v}
        if linear_inputs is None:
            h, (new_k, new_v) = model.with_attention(token, position + j, segment, attend, inputs)
        else:
            h, (new_k, new_v), linear = hybrid.decode_step(model, token, position + j, segment, attend, inputs, linear)
        own_k = own_k.at[:, :, :, j].set(new_k)
        own_v = own_v.at[:, :, :, j].set(new_v)
        return j + 1, h, own_k, own_v, out_tok, out_lp, done, code, n_gen, linear

    def cond(carry):
        j, done = carry[0], carry[6]
        return (j < m) & (valid & ~done).any()

    init = (
        jnp.int32(0),
        h0,
        own,
        own,
        jnp.full((b, c, m), -1, jnp.int32),
        jnp.zeros((b, c, m), jnp.float32),
        jnp.zeros((b, c), bool),
        jnp.zeros((b, c), jnp.int32),
        jnp.zeros((b, c), jnp.int32),
        () if linear_inputs is None else hybrid.slot_states(model, linear_inputs, segment_ids, prefix_end, segment),
    )
    out = jax.lax.while_loop(cond, body, init)
    return out[4], out[5], out[8], out[7]


def _option_mask(option_ids, vocab_size: int):
    """bool [B, C, V]: the tokens a branch's first token may be (every token where its ids are all -1)."""
    b, c, k = option_ids.shape
    ids = option_ids.reshape(b * c, k)
    rows = jnp.broadcast_to(jnp.arange(b * c)[:, None], ids.shape)
    mask = jnp.zeros((b * c, vocab_size), bool).at[rows, jnp.maximum(ids, 0)].max(ids >= 0)
    free = (ids < 0).all(axis=-1, keepdims=True)
    return (mask | free).reshape(b, c, vocab_size)


def _choose(logits, keys, step, temperature, allowed, knobs):
    """The next token int32 [B, C] from float32 logits [B, C, V]: the first step restricted to each
    branch's options (``allowed``), then greedy where its temperature is 0, else temperature, top-k and
    top-p (``knobs``; None: both off) and a draw with each branch's step key."""
    x = jnp.where((step > 0) | allowed, logits, -jnp.inf)
    greedy = jnp.argmax(x, axis=-1).astype(jnp.int32)
    x = x / jnp.where(temperature > 0, temperature, 1.0)[..., None]
    if knobs is not None:  # one sort serves both: the k-th best value, and the best tokens until mass p
        v = x.shape[-1]
        ordered = -jnp.sort(-x, axis=-1)
        k = jnp.where(knobs["top_k"] > 0, jnp.minimum(knobs["top_k"], v), v)
        kth = jax.lax.dynamic_index_in_dim(ordered, k - 1, axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < knobs["top_p"]
        threshold = jnp.maximum(kth, jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True))
        x = jnp.where(x < threshold, -jnp.inf, x)
    draw = jax.vmap(jax.random.categorical)(keys.reshape(-1), x.reshape(-1, x.shape[-1]))
    return jnp.where(temperature > 0, draw.reshape(keys.shape).astype(jnp.int32), greedy)


def _branch_attention(q, k, v, p, window, step, prefix_end, segment, segment_ids, spec: ModelSpec):
    """One decode step's attention of branch queries q [B, C, Hq, hd] (new keys/values k, v [B, C, Hk, hd]):
    the row's prefix keys (``attend_k``/``attend_v`` [B, T, Hk, hd]) of the branch's segment up to its
    prefix end, merged with its own generated keys (``attend_own_k``/``_v`` [B, C, M, Hk, hd], this step's
    written at ``step``) through the two log-sum-exps. Returns (output [B, C, Hq, hd], (k, v))."""
    scale = spec.attention_scale if spec.attention_scale is not None else q.shape[-1] ** -0.5
    softcap = spec.attn_logit_softcap
    o_prefix, lse_prefix = attention_at_lse(
        q,
        (prefix_end, segment, prefix_end + 1 + step),
        (p[ATTENTION_INPUT + "k"], p[ATTENTION_INPUT + "v"], segment_ids),
        sliding_window=window,
        scale=scale,
        softcap=softcap,
    )
    own_k = p[ATTENTION_INPUT + "own_k"].at[:, :, step].set(k)  # [B, C, M, Hk, hd]
    own_v = p[ATTENTION_INPUT + "own_v"].at[:, :, step].set(v)
    b, c, hq, hd = q.shape
    hk = k.shape[2]
    qg = q.reshape(b, c, hk, hq // hk, hd)
    s = soft_cap(jnp.einsum("bchgd,bcmhd->bchgm", qg, own_k, preferred_element_type=jnp.float32) * scale, softcap)
    index = jnp.arange(own_k.shape[2])
    visible = index <= step
    if window is not None:  # own token i stands at p + 1 + i: within the window of p + 1 + step
        visible &= index > step - window
    s = jnp.where(visible, s, -jnp.inf)
    lse_own = jax.nn.logsumexp(s, axis=-1)  # [B, C, Hk, G]: finite (the query sees its own key)
    o_own = jnp.einsum("bchgm,bcmhd->bchgd", jnp.exp(s - lse_own[..., None]), own_v.astype(jnp.float32))
    lse_own, o_own = lse_own.reshape(b, c, hq), o_own.reshape(b, c, hq, hd)
    top = jnp.maximum(lse_prefix, lse_own)
    w_prefix, w_own = jnp.exp(lse_prefix - top)[..., None], jnp.exp(lse_own - top)[..., None]
    o = (o_prefix.astype(jnp.float32) * w_prefix + o_own * w_own) / (w_prefix + w_own)
    return o.astype(q.dtype), (k, v)
