"""Flax NNX decoder for the Llama, Mistral, Qwen2, Qwen3, OLMo 2/3, Qwen3.5 and Gemma 2/3 families and the
mixture-of-experts Qwen2-MoE, Qwen3-MoE, Qwen3.5-MoE, Mixtral and OLMoE, with stacked, scanned layers (the
per-position norms and MLP are in model/layers.py, the routed MLP in model/moe.py).

Every layer parameter is stored stacked over layers ([L, ...]) and the forward scans over them, so compile
time does not grow with depth. Layers whose attention differs (OLMo 3: three sliding-window layers, then a
full one; a mixture of experts' dense layers) are scanned in groups of the repeating pattern of
``spec.layer_kinds``, so each window and MLP kind stays static.
Parameters carry logical axis names (``out_sharding`` metadata, never applied eagerly) and activations
pass through ``constrain``, a no-op without a mesh; the names are in model/axes.py, and parallel/sharding.py
maps them to mesh axes.
The parameter tables (which layers hold each stacked parameter, axes, shapes) are in model/params.py.
Qwen3.5 mixes Gated DeltaNet layers ("linear_attention") with gated softmax-attention layers: a parameter
that only one kind of layer has is stacked over the layers that have it; the scan groups slice each stack
accordingly.
``__call__`` is the plain full forward (what the tests compare with HF); scoring runs ``trunk`` (every layer
but the last) and ``last_layer_at`` (the last layer only at the scored positions), which equal it there.
The slot sampler (sampling/sampler.py) runs the same layers twice more: ``prefill`` is ``__call__`` that also
keeps each softmax-attention layer's keys and values, and ``with_attention`` replaces each such layer's
attention by a callable (its decode step, attending to those caches).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from psych201_jax.model import delta_rule
from psych201_jax.model import rope as rope_lib
from psych201_jax.model.attention import attention, attention_at
from psych201_jax.model.axes import (
    ACT_BATCH,
    ACT_EMBED,
    ACT_HEAD_DIM,
    ACT_KV_HEADS,
    ACT_LENGTH,
    ACT_LIN_K_HEADS,
    ACT_LIN_V_HEADS,
    ACT_Q_HEADS,
    EMBED,
    EMBED_VOCAB,
    NORM,
    VOCAB,
    constrain,
)
from psych201_jax.model.layers import mlp_block, rms_norm
from psych201_jax.model.moe import moe_block
from psych201_jax.model.params import (
    ATTENTION_INPUT,
    BIASES,
    layer_param_axes,
    param_in_layer,
    param_shapes,
)
from psych201_jax.model.spec import LINEAR_ATTENTION, LayerKind, ModelSpec, NormPlacement, QkNorm

K = typing.TypeVar("K")  # a per-layer kind (``layer_groups``)

# A softmax-attention layer's attention, replaced: (q, k, v [B, T, H, hd] after RoPE, the layer's parameters
# and ``with_attention`` inputs, its window) -> (output [B, T, Hq, hd], what the layer hands out). The sampler's
# decode step attends to caches with it (sampling/sampler.py).
Attend = Callable[
    [jnp.ndarray, jnp.ndarray, jnp.ndarray, dict[str, jnp.ndarray], int | None], tuple[jnp.ndarray, typing.Any]
]


def embed_row_axis(spec: ModelSpec) -> str:
    """Logical name of the input embedding's row axis: VOCAB, or EMBED_VOCAB when it has extra rows."""
    return VOCAB if spec.embed_rows == spec.vocab_size else EMBED_VOCAB


class Gather(typing.NamedTuple):
    """Positions to compute a layer's output at: ``indices`` int32 [G, C], flat (row * T + t) into the rows of
    each of G equal row groups of the [B, T] batch (a group: one row shard's sub-batch); ``valid`` bool
    [G, C] marks real entries (padding entries attend to nothing, so they widen no query block's keys)."""

    indices: jnp.ndarray
    valid: jnp.ndarray

    def flat(self, x: jnp.ndarray) -> jnp.ndarray:
        """[B, T, ...] -> [G, B / G * T, ...]."""
        g = self.indices.shape[0]
        return x.reshape(g, x.shape[0] // g * x.shape[1], *x.shape[2:])

    def take(self, x: jnp.ndarray) -> jnp.ndarray:
        """[B, T, ...] -> [G, C, ...] at the positions."""
        flat = self.flat(x)
        index = self.indices.reshape(self.indices.shape + (1,) * (flat.ndim - 2))
        return jnp.take_along_axis(flat, index, axis=1, mode="clip")

    def row_segments(self, segment_ids: jnp.ndarray) -> jnp.ndarray:
        """Segment ids [B, T] made distinct across the rows of a group (0 stays padding), so that flattened
        rows never see each other's segments."""
        b, t = segment_ids.shape
        row = jnp.arange(b, dtype=segment_ids.dtype)[:, None] % (b // self.indices.shape[0])
        return jnp.where(segment_ids > 0, segment_ids + row * t, 0)


def _attention_block(
    p: dict[str, jnp.ndarray],
    x: jnp.ndarray,
    cos: jnp.ndarray,
    sin: jnp.ndarray,
    segment_ids: jnp.ndarray,
    *,
    spec: ModelSpec,
    window: int | None,
    backend: str,
    at: Gather | None = None,
    keep_kv: bool = False,
    attend: Attend | None = None,
) -> tuple[jnp.ndarray, typing.Any]:
    """x [B, T, D] -> (self-attention output [B, T, D] (before any post-norm / residual), what the layer hands
    out); with ``at``, only the queries at its positions: [G, C, D]. It hands out its keys and values after
    RoPE [B, T, Hk, hd] with ``keep_kv``, what ``attend`` returns with it (which then replaces the
    attention), else None."""
    dt = x.dtype
    xq, cos_q, sin_q = (x, cos, sin) if at is None else (at.take(x), at.take(cos), at.take(sin))
    q = jnp.einsum("btd,dhk->bthk", xq, p["wq"].astype(dt))
    if spec.attn_output_gate:  # [.., 2 * hd] per head: query, then its output gate (HF torch.chunk order)
        q, gate = jnp.split(q, 2, axis=-1)
    k = jnp.einsum("btd,dhk->bthk", x, p["wk"].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x, p["wv"].astype(dt))
    if spec.qkv_bias:
        q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
    if spec.qk_norm != QkNorm.NONE:
        axes = (-1,) if spec.qk_norm == QkNorm.HEAD else (-2, -1)
        fp32, centred = spec.norm_weight_fp32, spec.norm_zero_centred
        q = rms_norm(q, p["q_norm"], spec.rms_norm_eps, weight_fp32=fp32, axes=axes, zero_centred=centred)
        k = rms_norm(k, p["k_norm"], spec.rms_norm_eps, weight_fp32=fp32, axes=axes, zero_centred=centred)
    if spec.clip_qkv is not None:  # OLMoE: clamped after the norm (HF clamp_ in place, before the head split)
        q, k, v = (jnp.clip(t, -spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
    q = rope_lib.apply_rope(q, cos_q, sin_q, in_fp32=spec.rope_fp32)
    k = rope_lib.apply_rope(k, cos, sin, in_fp32=spec.rope_fp32)
    q = constrain(q, (ACT_BATCH, ACT_LENGTH, ACT_Q_HEADS, ACT_HEAD_DIM))
    k = constrain(k, (ACT_BATCH, ACT_LENGTH, ACT_KV_HEADS, ACT_HEAD_DIM))
    v = constrain(v, (ACT_BATCH, ACT_LENGTH, ACT_KV_HEADS, ACT_HEAD_DIM))
    scale, softcap = spec.attention_scale, spec.attn_logit_softcap
    aux: typing.Any = (k, v) if keep_kv else None
    if attend is not None:
        o, aux = attend(q, k, v, p, window)
    elif at is None:
        o = attention(q, k, v, segment_ids, sliding_window=window, backend=backend, scale=scale, softcap=softcap)
    else:  # the gathered queries against every key of their group's rows, flattened
        k_seg = at.flat(at.row_segments(segment_ids))
        q_seg = jnp.where(at.valid, jnp.take_along_axis(k_seg, at.indices, axis=1, mode="clip"), 0)
        kv = (at.flat(k), at.flat(v), k_seg)
        o = attention_at(
            q, at.indices, q_seg, *kv, sliding_window=window, backend=backend, scale=scale, softcap=softcap
        )
    if spec.attn_output_gate:
        o = o * jax.nn.sigmoid(gate)
    out = jnp.einsum("bthk,hkd->btd", o, p["wo"].astype(dt))
    if spec.o_bias:
        out = out + p["bo"].astype(dt)
    return out, aux


def _linear_attention_block(
    p: dict[str, jnp.ndarray], x: jnp.ndarray, segment_ids: jnp.ndarray, *, spec: ModelSpec
) -> jnp.ndarray:
    """Gated DeltaNet (HF ``Qwen3_5GatedDeltaNet``), x [B, T, D] -> [B, T, D]; no state crosses segments."""
    dt = x.dtype
    k_axes = (ACT_BATCH, ACT_LENGTH, ACT_LIN_K_HEADS, None)
    v_axes = (ACT_BATCH, ACT_LENGTH, ACT_LIN_V_HEADS, None)

    def conv_silu(name, axes):
        y = constrain(jnp.einsum("btd,dhk->bthk", x, p["lin_w" + name].astype(dt)), axes)
        # HF: conv in the weight dtype (rounded to it), SiLU, back to the activation dtype.
        return jax.nn.silu(delta_rule.causal_conv(y, p["lin_conv_" + name], segment_ids).astype(dt)).astype(dt)

    q, k, v = conv_silu("q", k_axes), conv_silu("k", k_axes), conv_silu("v", v_axes)
    z = jnp.einsum("btd,dhk->bthk", x, p["lin_wz"].astype(dt))
    beta = jax.nn.sigmoid(jnp.einsum("btd,dh->bth", x, p["lin_wb"].astype(dt)))
    a = jnp.einsum("btd,dh->bth", x, p["lin_wa"].astype(dt)).astype(jnp.float32)
    g = -jnp.exp(p["lin_a_log"].astype(jnp.float32)) * jax.nn.softplus(a + p["lin_dt_bias"].astype(jnp.float32))
    o = delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, segment_ids).astype(dt)
    o = constrain(delta_rule.gated_rms_norm(o, p["lin_norm"], z, spec.rms_norm_eps), v_axes)
    return jnp.einsum("bthk,hkd->btd", o, p["lin_wo"].astype(dt))


def decoder_layer(
    p: dict[str, jnp.ndarray],
    h: jnp.ndarray,
    cos: jnp.ndarray,
    sin: jnp.ndarray,
    segment_ids: jnp.ndarray,
    *,
    spec: ModelSpec,
    kind: LayerKind,
    backend: str,
    at: Gather | None = None,
    keep_kv: bool = False,
    attend: Attend | None = None,
) -> tuple[jnp.ndarray, typing.Any]:
    """One decoder layer on h [B, T, D] with this layer's (unstacked) parameters ``p``: (h, what its attention
    hands out: see ``_attention_block``'s ``keep_kv`` and ``attend``; None for Gated DeltaNet layers).

    ``kind``: a LINEAR_ATTENTION layer mixes tokens with Gated DeltaNet (``cos``/``sin`` unused), any other
    with softmax attention (windowed as the spec says for its type); its MLP is ``mlp``'s for the kind.
    ``at``: the layer's output only at those positions, [G, C, D] (keys, values and Gated DeltaNet still see
    every position; queries, the residual and the MLP only those).
    """
    layer_type = kind.attention
    take = (lambda x: x) if at is None else at.take

    def norm(x, name):
        return rms_norm(
            x, p[name], spec.rms_norm_eps, weight_fp32=spec.norm_weight_fp32, zero_centred=spec.norm_zero_centred
        )

    # PRE: norms before the sublayers; POST: after them (before the residual add); SANDWICH: both.
    before, after = spec.norm_placement != NormPlacement.POST, spec.norm_placement != NormPlacement.PRE
    x = norm(h, "attn_in_norm") if before else h
    aux = None
    if layer_type == LINEAR_ATTENTION:
        attn = take(_linear_attention_block(p, x, segment_ids, spec=spec))
    else:
        attn, aux = _attention_block(
            p,
            x,
            cos,
            sin,
            segment_ids,
            spec=spec,
            window=spec.window_for(layer_type),
            backend=backend,
            at=at,
            keep_kv=keep_kv,
            attend=attend,
        )
    h = take(h) + (norm(attn, "attn_out_norm") if after else attn)
    x = norm(h, "mlp_in_norm") if before else h
    # padding (segment 0, or an invalid gathered entry) is routed to no expert
    mlp_out = mlp(p, x, segment_ids > 0 if at is None else at.valid, spec=spec, dense_mlp=kind.dense_mlp)
    h = h + (norm(mlp_out, "mlp_out_norm") if after else mlp_out)
    return constrain(h, (ACT_BATCH, ACT_LENGTH, ACT_EMBED)), aux


def mlp(p: dict[str, jnp.ndarray], x: jnp.ndarray, valid: jnp.ndarray, *, spec: ModelSpec, dense_mlp: bool):
    """A layer's MLP on x [B, T, D]: the gated MLP, a mixture of experts' routed one (``valid`` bool [B, T]:
    False routes nowhere), or, in a dense layer of a mixture of experts (``dense_mlp``), its own gated MLP."""
    if dense_mlp:
        return mlp_block({"w_gate": p["d_gate"], "w_up": p["d_up"], "w_down": p["d_down"]}, x, spec=spec)
    if spec.num_experts:
        return moe_block(p, x, valid, spec=spec)
    return mlp_block(p, x, spec=spec)


def layer_groups(layer_types: Sequence[K]) -> tuple[tuple[int, int, tuple[K, ...]], ...]:
    """Splits the layer list (``spec.layer_kinds``, or any per-layer kinds) into scan groups (start, repeats,
    pattern) with static per-layer kinds.

    The shortest period p of ``layer_types`` gives one group scanned L // p times over a p-layer body
    (plus a remainder group run once); lists without a period <= L / 2 fall back to runs of equal types.
    """
    n = len(layer_types)
    period = next(p for p in range(1, n + 1) if all(layer_types[i] == layer_types[i % p] for i in range(n)))
    if period <= n // 2 or period == n == 1:
        repeats = n // period
        groups = [(0, repeats, tuple(layer_types[:period]))]
        if repeats * period < n:
            groups.append((repeats * period, 1, tuple(layer_types[repeats * period :])))
        return tuple(groups)
    groups, start = [], 0
    for i in range(1, n + 1):
        if i == n or layer_types[i] != layer_types[start]:
            groups.append((start, i - start, (layer_types[start],)))
            start = i
    return tuple(groups)


def trunk_groups(layer_types: Sequence[K]) -> tuple[tuple[int, int, tuple[K, ...]], ...]:
    """``layer_groups`` without the last layer: the last group scans one repeat fewer and its final repeat
    runs once without its last layer, so the program stays the same size at any depth."""
    *groups, (start, repeats, pattern) = layer_groups(layer_types)
    if repeats > 1:
        groups.append((start, repeats - 1, pattern))
    if len(pattern) > 1:
        groups.append((start + (repeats - 1) * len(pattern), 1, pattern[:-1]))
    return tuple(groups)


def _group_params(
    spec: ModelSpec, params: dict[str, jnp.ndarray], start: int, repeats: int, pattern: tuple[LayerKind, ...]
) -> tuple[dict[str, jnp.ndarray], dict[str, tuple[int | None, ...]]]:
    """One scan group's slice of every stack, as [repeats, per-repeat layers, ...], and for each name the
    index into that second axis of each pattern position (None: that layer kind lacks the parameter)."""
    group, slots = {}, {}
    for name, x in params.items():
        members = [param_in_layer(name, t) for t in spec.layer_kinds]
        per = sum(param_in_layer(name, t) for t in pattern)
        if not per:
            continue
        offset = sum(members[:start])
        group[name] = x[offset : offset + repeats * per].reshape(repeats, per, *x.shape[1:])
        index = iter(range(per))
        slots[name] = tuple(next(index) if param_in_layer(name, t) else None for t in pattern)
    return group, slots


class LayerStack(nnx.Module):
    """All decoder layers' parameters, each stacked over layers: name -> nnx.Param [L, ...]."""

    def __init__(self, spec: ModelSpec, *, param_dtype, rngs: nnx.Rngs):
        shapes = param_shapes(spec)
        self.names = tuple(sorted(layer_param_axes(spec)))
        for name, axes in layer_param_axes(spec).items():
            setattr(self, name, _new_param(name, shapes[name], axes, param_dtype, rngs))

    def arrays(self) -> dict[str, jnp.ndarray]:
        return {name: getattr(self, name)[...] for name in self.names}


def _new_param(name: str, shape: tuple[int, ...], axes: tuple[str, ...], param_dtype, rngs: nnx.Rngs) -> nnx.Param:
    """Norm weights start at 1, biases at 0, matrices ~ N(0, 0.02); logical axes kept as metadata."""
    if name.endswith("norm"):
        value = jnp.ones(shape, param_dtype)
    elif name in BIASES:
        value = jnp.zeros(shape, param_dtype)
    else:
        value = 0.02 * jax.random.normal(rngs.params(), shape, param_dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Decoder(nnx.Module):
    """Decoder-only transformer of one supported family; returns final (normed) hidden states."""

    def __init__(self, spec: ModelSpec, *, dtype, param_dtype, rngs: nnx.Rngs, attention_backend: str = "auto"):
        self.spec = spec
        self.dtype = jnp.dtype(dtype)
        self.attention_backend = attention_backend
        shapes = param_shapes(spec)
        self.embed = _new_param("embed", shapes["embed"], (embed_row_axis(spec), EMBED), param_dtype, rngs)
        self.lm_head = (
            None
            if spec.tie_word_embeddings
            else _new_param("lm_head", shapes["lm_head"], (VOCAB, EMBED), param_dtype, rngs)
        )
        self.final_norm = _new_param("final_norm", shapes["final_norm"], (NORM,), param_dtype, rngs)
        self.layers = LayerStack(spec, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"], segment_ids: Int[Array, "b t"]
    ) -> Float[Array, "b t d"]:
        """tokens/positions/segment_ids int32[B, T] -> hidden [B, T, D] after the final norm.

        ``positions`` restart at 0 in each packed segment and drive RoPE; tokens attend only within their
        nonzero segment (0 = padding).
        """
        groups = layer_groups(self.spec.layer_kinds)
        h, _ = self._layers(self._embed(tokens), self._rope_tables(positions), segment_ids, groups)
        return self._final_norm(h)

    def prefill(
        self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"], segment_ids: Int[Array, "b t"]
    ) -> tuple[Float[Array, "b t d"], tuple[Float[Array, "la b t hk hd"], Float[Array, "la b t hk hd"]]]:
        """``__call__`` (the same layers) that also keeps every softmax-attention layer's keys and values after
        RoPE, stacked in layer order: (hidden [B, T, D], (keys, values) [La, B, T, Hk, hd]). The sampler's
        decode steps attend to them (sampling/sampler.py)."""
        groups = layer_groups(self.spec.layer_kinds)
        h, kv = self._layers(self._embed(tokens), self._rope_tables(positions), segment_ids, groups, keep_kv=True)
        return self._final_norm(h), kv

    def with_attention(
        self,
        tokens: Int[Array, "b t"],
        positions: Int[Array, "b t"],
        segment_ids: Int[Array, "b t"],
        attend: Attend,
        inputs: dict[str, jnp.ndarray],
    ) -> tuple[Float[Array, "b t d"], typing.Any]:
        """``__call__`` with every softmax-attention layer's attention replaced by ``attend``, which also gets
        ``inputs`` (name -> [La, ...], each name starting with ``ATTENTION_INPUT``) at that layer's index among
        them in its parameters: (hidden [B, T, D] after the final norm, what ``attend`` hands out, stacked
        [La, ...]). The sampler's decode step: one token per branch attending to cached keys."""
        if any(not name.startswith(ATTENTION_INPUT) for name in inputs):
            raise ValueError(f"attention inputs must be named {ATTENTION_INPUT}*, got {sorted(inputs)}")
        groups = layer_groups(self.spec.layer_kinds)
        tables = self._rope_tables(positions)
        h, out = self._layers(self._embed(tokens), tables, segment_ids, groups, attend=attend, inputs=inputs)
        return self._final_norm(h), out

    def trunk(
        self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"], segment_ids: Int[Array, "b t"]
    ) -> Float[Array, "b t d"]:
        """The residual stream [B, T, D] after every layer but the last (inputs as ``__call__``): scoring needs
        the last layer only where a response is scored (``last_layer_at``)."""
        groups = trunk_groups(self.spec.layer_kinds)
        return self._layers(self._embed(tokens), self._rope_tables(positions), segment_ids, groups)[0]

    def last_layer_at(
        self,
        h: Float[Array, "b t d"],
        positions: Int[Array, "b t"],
        segment_ids: Int[Array, "b t"],
        index: Int[Array, "g c"],
        valid: Bool[Array, "g c"],
    ) -> Float[Array, "g c d"]:
        """The last layer and the final norm on ``trunk``'s output, only at ``index`` (flat row * T + t into
        each of G equal row groups; see ``Gather``): ``__call__``'s hidden states there where ``valid``, for
        about 1 / L of the body's work."""
        spec = self.spec
        kind = spec.layer_kinds[-1]
        params = {
            name: x[-1] for name, x in self.layers.arrays().items() if param_in_layer(name, kind)
        }  # the last layer is the last of every stack it has a parameter in
        cos, sin = self._rope_tables(positions)[kind.attention]
        out, _ = decoder_layer(
            params,
            h,
            cos,
            sin,
            segment_ids,
            spec=spec,
            kind=kind,
            backend=self.attention_backend,
            at=Gather(index, valid),
        )
        return self._final_norm(out)

    def _embed(self, tokens: jnp.ndarray) -> jnp.ndarray:
        spec = self.spec
        # Gather from a table sharded only over the vocabulary, so the lookup output needs no re-split.
        h = jnp.take(constrain(self.embed[...], (embed_row_axis(spec), None)), tokens, axis=0).astype(self.dtype)
        if spec.embed_scale:  # Gemma: sqrt(hidden), rounded to the activation dtype before the product (HF)
            h = h * jnp.asarray(spec.hidden_size**0.5, self.dtype)
        return constrain(h, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))

    def _rope_tables(self, positions: jnp.ndarray) -> dict[str, tuple]:
        """Layer type -> (cos, sin) [B, T, rope_dim] (None for Gated DeltaNet layers)."""
        spec = self.spec
        tables: dict[str, tuple] = {LINEAR_ATTENTION: (None, None)}
        for layer_type in spec.attention_layer_types():
            inv_freq, scaling = rope_lib.inv_freq_and_scaling(
                spec.rope_for(layer_type), spec.rope_dim, spec.max_position_embeddings
            )
            tables[layer_type] = rope_lib.cos_sin(positions, inv_freq, scaling)
        return tables

    def _layers(
        self,
        h: jnp.ndarray,
        tables: dict[str, tuple],
        segment_ids: jnp.ndarray,
        groups,
        *,
        keep_kv: bool = False,
        attend: Attend | None = None,
        inputs: dict[str, jnp.ndarray] | None = None,
    ) -> tuple[jnp.ndarray, typing.Any]:
        """The layers of ``groups`` ((start, repeats, pattern), see ``layer_groups``) on h [B, T, D], each
        group scanned over its repeats: (h, what the softmax-attention layers hand out, stacked [La, ...] in
        layer order; None unless ``keep_kv`` or ``attend``, see ``_attention_block``). ``inputs``: per
        softmax-attention layer inputs of ``attend`` (see ``with_attention``)."""
        spec = self.spec
        params = {**self.layers.arrays(), **(inputs or {})}
        outs = []
        for start, repeats, pattern in groups:
            group, slots = _group_params(spec, params, start, repeats, pattern)

            def body(h, p, pattern=pattern, slots=slots):
                aux = []
                for j, kind in enumerate(pattern):
                    h, out = decoder_layer(
                        {name: x[slots[name][j]] for name, x in p.items() if slots[name][j] is not None},
                        h,
                        *tables[kind.attention],
                        segment_ids,
                        spec=spec,
                        kind=kind,
                        backend=self.attention_backend,
                        keep_kv=keep_kv,
                        attend=attend,
                    )
                    if kind.attention != LINEAR_ATTENTION:
                        aux.append(out)
                return h, aux

            h, aux = jax.lax.scan(body, h, group)  # aux: per attention layer of the pattern, [repeats, ...]
            if aux and (keep_kv or attend is not None):  # repeat-major, as the layers stand: [repeats * m, ...]
                outs.append(jax.tree.map(lambda *xs: jnp.stack(xs, 1).reshape(-1, *xs[0].shape[1:]), *aux))
        if not outs:
            return h, None
        return h, jax.tree.map(lambda *xs: jnp.concatenate(xs, 0), *outs)

    def _final_norm(self, h: jnp.ndarray) -> jnp.ndarray:
        spec = self.spec
        return rms_norm(
            h,
            self.final_norm[...],
            spec.rms_norm_eps,
            weight_fp32=spec.norm_weight_fp32,
            zero_centred=spec.norm_zero_centred,
        )

    def unembedding(self) -> jnp.ndarray:
        """Output projection [V, D] (HF orientation): lm_head, or the input embedding when tied."""
        return (self.embed if self.lm_head is None else self.lm_head)[...]
