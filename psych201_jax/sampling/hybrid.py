"""Slot sampling for Gated DeltaNet hybrids (Qwen3.5, Qwen3.5-MoE): each linear-attention layer's recurrent
state at every slot's prefix end, and the recurrent decode step.

The prefill runs the model's own layers (``decoder_layer``, unrolled over layers) and also keeps each
linear-attention layer's input (the normed residual stream) [Ll, B, T, D]. Per decode pass, a scan over
the row's tokens runs the delta rule in its recurrent form (HF ``torch_recurrent_gated_delta_rule``: per
value head S <- exp(g) S; S <- S + k (beta (v - S^T k))^T; o = S^T q, reset at every segment start) and
keeps S after each branch's prefix end p, with the conv's last K - 1 inputs up to p (zeros across a segment
start). A decode step then advances each branch's own state by one token. O(T) sequential steps per pass
on top of the prefill (each writing one state per row): this path is slower than the softmax-attention
one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from psych201_jax.model import delta_rule
from psych201_jax.model.decoder import Decoder, decoder_layer, mlp
from psych201_jax.model.layers import rms_norm
from psych201_jax.model.params import param_layers
from psych201_jax.model.spec import LINEAR_ATTENTION, ModelSpec, NormPlacement

CONV = ("q", "k", "v")


def is_hybrid(spec: ModelSpec) -> bool:
    return LINEAR_ATTENTION in spec.layer_types


def layer_params(model: Decoder) -> list[dict[str, jnp.ndarray]]:
    """Each layer's own (unstacked) parameters, in layer order."""
    spec = model.spec
    out: list[dict[str, jnp.ndarray]] = [{} for _ in spec.layer_kinds]
    for name, x in model.layers.arrays().items():
        for j, layer in enumerate(param_layers(spec, name)):
            out[layer][name] = x[j]
    return out


def _norm(spec: ModelSpec, p, x, name):
    return rms_norm(
        x, p[name], spec.rms_norm_eps, weight_fp32=spec.norm_weight_fp32, zero_centred=spec.norm_zero_centred
    )


def _placement(spec: ModelSpec) -> tuple[bool, bool]:
    return spec.norm_placement != NormPlacement.POST, spec.norm_placement != NormPlacement.PRE


def prefill(model: Decoder, tokens, positions, segment_ids):
    """``Decoder.prefill`` for hybrids, plus each linear-attention layer's input: (hidden [B, T, D],
    (keys, values) [La, B, T, Hk, hd], inputs [Ll, B, T, D])."""
    spec = model.spec
    before, _ = _placement(spec)
    h = model._embed(tokens)
    tables = model._rope_tables(positions)
    keys, values, inputs = [], [], []
    for p, kind in zip(layer_params(model), spec.layer_kinds):
        if kind.attention == LINEAR_ATTENTION:
            inputs.append(_norm(spec, p, h, "attn_in_norm") if before else h)
        cos, sin = tables[kind.attention]
        h, aux = decoder_layer(
            p, h, cos, sin, segment_ids, spec=spec, kind=kind, backend=model.attention_backend, keep_kv=True
        )
        if kind.attention != LINEAR_ATTENTION:
            keys.append(aux[0])
            values.append(aux[1])
    return model._final_norm(h), (jnp.stack(keys), jnp.stack(values)), jnp.stack(inputs)


def _projections(p, x):
    """The conv inputs (q, k, v projections, activation dtype) and beta, g of x [..., D]."""
    dt = x.dtype
    ys = {n: jnp.einsum("...d,dhk->...hk", x, p["lin_w" + n].astype(dt)) for n in CONV}
    beta = jax.nn.sigmoid(jnp.einsum("...d,dh->...h", x, p["lin_wb"].astype(dt)))
    a = jnp.einsum("...d,dh->...h", x, p["lin_wa"].astype(dt)).astype(jnp.float32)
    g = -jnp.exp(p["lin_a_log"].astype(jnp.float32)) * jax.nn.softplus(a + p["lin_dt_bias"].astype(jnp.float32))
    return ys, beta, g


def _unit(k, hv):
    """L2-normalised float32 keys/queries repeated to the value heads (``chunk_gated_delta_rule``'s)."""
    return jnp.repeat(delta_rule.l2_normalize(k.astype(jnp.float32)), hv // k.shape[-2], axis=-2)


def _update(state, k, v, g, beta):
    """One recurrent step of every head: state [..., Hv, dk, dv] float32, k [..., Hv, dk] (normalised)."""
    state = state * jnp.exp(g)[..., None, None]
    delta = (v.astype(jnp.float32) - jnp.einsum("...kv,...k->...v", state, k)) * beta.astype(jnp.float32)[..., None]
    return state + k[..., :, None] * delta[..., None, :]


def slot_states(model: Decoder, inputs, segment_ids, prefix_end, segment):
    """Per linear-attention layer, each branch's (state [B, C, Hv, dk, dv] float32, conv inputs
    {q, k, v: [B, C, K - 1, H, d]}) after its prefix end ``prefix_end`` [B, C] (row index)."""
    spec = model.spec
    params = [p for p, t in zip(layer_params(model), spec.layer_types) if t == LINEAR_ATTENTION]
    b, t = segment_ids.shape
    start = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    # Each row's distinct prefix ends, ascending (padded with T, never reached), and each branch's rank
    # among them: the scan keeps one state per distinct end, so a step writes one state, not C.
    c = prefix_end.shape[1]
    ends = jax.vmap(lambda e: jnp.unique(e, size=c, fill_value=t))(prefix_end)
    rank = jax.vmap(jnp.searchsorted)(ends, prefix_end).astype(jnp.int32)
    out = []
    for p, x in zip(params, inputs):
        dt = x.dtype
        ys, beta, g = _projections(p, x)
        convs = {
            n: jax.nn.silu(delta_rule.causal_conv(ys[n], p["lin_conv_" + n], segment_ids).astype(dt)).astype(dt)
            for n in ("k", "v")
        }
        hv, dk, dv = convs["v"].shape[2], convs["k"].shape[-1], convs["v"].shape[-1]
        k = _unit(convs["k"], hv)

        def step(carry, i, k_all=k, v_all=convs["v"], g_all=g, beta_all=beta):
            state, kept, next_ = carry
            state = jnp.where(start[:, i, None, None, None], 0.0, state)
            state = _update(state, k_all[:, i], v_all[:, i], g_all[:, i], beta_all[:, i])
            at = jnp.minimum(next_, c - 1)
            hit = (jnp.take_along_axis(ends, at[:, None], 1)[:, 0] == i) & (next_ < c)  # the row's next end
            kept = jax.vmap(lambda kb, sb, nb, hb: kb.at[nb].set(jnp.where(hb, sb, kb[nb])))(kept, state, at, hit)
            return (state, kept, next_ + hit), None

        zero = jnp.zeros((b, hv, dk, dv), jnp.float32)
        init = (zero, jnp.zeros((b, c, hv, dk, dv), jnp.float32), jnp.zeros(b, jnp.int32))
        (_, kept, _), _ = jax.lax.scan(step, init, jnp.arange(t))
        kept = jnp.take_along_axis(kept, rank[..., None, None, None], 1)  # [B, C, ...]: each branch's end
        width = p["lin_conv_q"].shape[0] - 1
        index = prefix_end[..., None] - (width - 1) + jnp.arange(width)  # [B, C, K - 1]
        safe = jnp.clip(index, 0, t - 1)
        seen = (index >= 0) & (
            jnp.take_along_axis(segment_ids, safe.reshape(b, -1), 1).reshape(safe.shape) == segment[..., None]
        )
        buffers = {
            n: jnp.where(
                seen[..., None, None],
                jnp.take_along_axis(ys[n], safe.reshape(b, -1)[..., None, None], 1).reshape(
                    *safe.shape, *ys[n].shape[2:]
                ),
                0,
            ).astype(dt)
            for n in CONV
        }
        out.append((kept, buffers))
    return out


def _linear_step(spec: ModelSpec, p, x, state, buffers):
    """Gated DeltaNet on one token per branch, x [B, C, D]: (output [B, C, D], (state, buffers) after it)."""
    dt = x.dtype
    ys, beta, g = _projections(p, x)
    conv, new_buffers = {}, {}
    for n in CONV:
        window = jnp.concatenate([buffers[n], ys[n][:, :, None]], axis=2)  # [B, C, K, H, d]: oldest first
        w = p["lin_conv_" + n].astype(jnp.float32)
        acc = jnp.zeros(ys[n].shape, jnp.float32)
        for j in range(window.shape[2]):  # causal_conv's order of terms
            acc = acc + window[:, :, j].astype(jnp.float32) * w[j]
        conv[n] = jax.nn.silu(acc.astype(dt)).astype(dt)
        new_buffers[n] = window[:, :, 1:]
    hv, dk = conv["v"].shape[2], conv["k"].shape[-1]
    q, k = _unit(conv["q"], hv) * (dk**-0.5), _unit(conv["k"], hv)
    state = _update(state, k, conv["v"], g, beta)
    o = jnp.einsum("...kv,...k->...v", state, q).astype(dt)
    z = jnp.einsum("...d,dhk->...hk", x, p["lin_wz"].astype(dt))
    o = delta_rule.gated_rms_norm(o, p["lin_norm"], z, spec.rms_norm_eps)
    return jnp.einsum("bchk,hkd->bcd", o, p["lin_wo"].astype(dt)), (state, new_buffers)


def decode_step(model: Decoder, tokens, positions, segment, attend, inputs, linear):
    """``Decoder.with_attention`` for hybrids: one token per branch [B, C] through every layer, the softmax
    ones attending through ``attend`` with ``inputs`` (name -> [La, ...]), the linear ones advancing
    ``linear`` (``slot_states``' structure): (hidden [B, C, D], (new keys, new values) [La, ...], linear)."""
    spec = model.spec
    before, after = _placement(spec)
    h = model._embed(tokens)
    tables = model._rope_tables(positions)
    new_k, new_v, new_linear = [], [], []
    la = ll = 0
    for p, kind in zip(layer_params(model), spec.layer_kinds):
        if kind.attention == LINEAR_ATTENTION:
            x = _norm(spec, p, h, "attn_in_norm") if before else h
            attn, carry = _linear_step(spec, p, x, *linear[ll])
            new_linear.append(carry)
            ll += 1
            h = h + (_norm(spec, p, attn, "attn_out_norm") if after else attn)
            x = _norm(spec, p, h, "mlp_in_norm") if before else h
            out = mlp(p, x, segment > 0, spec=spec, dense_mlp=kind.dense_mlp)  # absent branches: routed nowhere
            h = h + (_norm(spec, p, out, "mlp_out_norm") if after else out)
            continue
        layer_inputs = {name: x[la] for name, x in inputs.items()}
        cos, sin = tables[kind.attention]
        h, (k, v) = decoder_layer(
            p | layer_inputs, h, cos, sin, segment, spec=spec, kind=kind, backend=model.attention_backend, attend=attend
        )
        new_k.append(k)
        new_v.append(v)
        la += 1
    return model._final_norm(h), (jnp.stack(new_k), jnp.stack(new_v)), new_linear
