"""Qwen3.5's Gated DeltaNet token mixer: causal depthwise conv, the chunked gated delta rule, gated RMSNorm.

The recurrence per value head (state S [dk, dv], float32), for token t of one participant:
    S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t
with q, k L2-normalised and q scaled by dk**-0.5 (HF ``torch_recurrent_gated_delta_rule``). We compute it
in chunks of ``chunk`` tokens as HF's ``torch_chunk_gated_delta_rule`` does: inside a chunk in matrix form
(a unit lower-triangular solve by forward substitution, the "UT transform"), across chunks with
``lax.scan`` over a float32 state.
Static shapes throughout; never a loop over tokens, never a [T, T] mask.

Packing: a packed row holds several participants (``segment_ids``, contiguous, 0 = padding). The state is
reset at every segment start, as if the decay there were exactly 0, without putting -inf into the
cumulative sums: those sum each position's own segment only, intra-chunk pairwise decays are masked to
pairs of one segment, the state carried into a chunk is read and kept only by the chunk's prefix that
continues the previous chunk's last segment, and the state carried out sums only the chunk's last
segment. The conv never mixes tokens of two segments. Another participant's tokens change no bit of a
participant's result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

CHUNK = 64  # HF's chunk size; the result does not depend on it beyond float rounding


def causal_conv(
    x: Float[Array, "b t h d"], weight: Float[Array, "k h d"], segment_ids: Int[Array, "b t"]
) -> Float[Array, "b t h d"]:
    """Causal depthwise conv along time, float32, without SiLU: out[t] = sum_j w[j] x[t - (K-1) + j].

    Inputs of another segment (or before the row) count as zeros, so no participant sees another's tokens.
    """
    kernel = weight.shape[0]
    t = x.shape[1]
    xf, wf = x.astype(jnp.float32), weight.astype(jnp.float32)
    out = jnp.zeros(xf.shape, jnp.float32)
    for j in range(kernel):
        shift = kernel - 1 - j
        xs = jnp.pad(xf, ((0, 0), (shift, 0), (0, 0), (0, 0)))[:, :t]
        ss = jnp.pad(segment_ids, ((0, 0), (shift, 0)), constant_values=-1)[:, :t]
        out = out + jnp.where((ss == segment_ids)[..., None, None], xs, 0.0) * wf[j]
    return out


def l2_normalize(x: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """x * rsqrt(sum(x^2) + eps) over the last axis (HF/FLA ``l2norm``)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def chunk_gated_delta_rule(
    q: Float[Array, "b t hk dk"],
    k: Float[Array, "b t hk dk"],
    v: Float[Array, "b t hv dv"],
    g: Float[Array, "b t hv"],
    beta: Float[Array, "b t hv"],
    segment_ids: Int[Array, "b t"],
    *,
    chunk: int = CHUNK,
) -> Float[Array, "b t hv dv"]:
    """Gated delta rule over packed rows -> float32 [B, T, Hv, dv]; value head h reads key head h // (Hv/Hk).

    ``g`` is the log decay (<= 0), ``beta`` the write strength in (0, 1); q/k are L2-normalised here.
    """
    b, t, hk, dk = k.shape
    hv, dv = v.shape[2:]
    f32 = jnp.float32
    q = jnp.repeat(l2_normalize(q.astype(f32)), hv // hk, axis=2) * (dk**-0.5)
    k = jnp.repeat(l2_normalize(k.astype(f32)), hv // hk, axis=2)
    v, g, beta = v.astype(f32), g.astype(f32), beta.astype(f32)

    n = -(-t // chunk)
    pad = n * chunk - t

    def chunks(x):  # [B, T, H, ...] -> [B, H, N, C, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        x = x.reshape(b, n, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 3, 1)

    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))
    seg = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1).reshape(b, 1, n, chunk)

    same = seg[..., :, None] == seg[..., None, :]  # [B, 1, N, C, C]
    causal = jnp.tril(jnp.ones((chunk, chunk), bool))
    # Log decay from the chunk start (or the segment's start within the chunk) to each position, summed
    # over the position's own segment only, so no other participant's decays enter even its rounding.
    # HIGHEST: a float32 sum on every backend (TPU/GPU would otherwise use bf16/TF32 passes).
    own = (same & causal)[:, 0].astype(f32)  # [B, N, C, C]
    cum = jnp.einsum("bnij,bhnj->bhni", own, g, precision=jax.lax.Precision.HIGHEST)  # [B, H, N, C]
    diff = cum[..., :, None] - cum[..., None, :]
    decay = jnp.exp(jnp.where(same & causal, diff, -jnp.inf))  # [B, H, N, C, C], 0 across segments

    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    strictly_lower = jnp.tril(jnp.ones((chunk, chunk), bool), -1)
    ut = jnp.where(strictly_lower, jnp.einsum("...id,...jd->...ij", k_beta, k) * decay, 0.0)
    intra = jnp.einsum("...id,...jd->...ij", q, k) * decay

    # Which positions continue the segment of the previous chunk's last token (a prefix of the chunk).
    prev_last = jnp.concatenate([jnp.full_like(seg[..., :1, -1:], -2), seg[..., :-1, -1:]], axis=-2)
    carried = (seg == prev_last).astype(f32)  # [B, 1, N, C]
    in_last = seg == seg[..., -1:]  # positions in the chunk's last segment
    read = jnp.exp(cum) * carried  # decay of the carried-in state at each position (0 after a reset)

    solved = _unit_lower_solve(ut, jnp.concatenate([v_beta, k_beta * read[..., None]], axis=-1))
    new_values, k_cumdecay = solved[..., :dv], solved[..., dv:]
    q_read = q * read[..., None]
    # Masked before exp: another segment's sum can be far more negative than the last one's (exp overflow).
    k_write = k * jnp.exp(jnp.where(in_last, cum[..., -1:] - cum, -jnp.inf))[..., None]
    state_decay = jnp.exp(cum[..., -1]) * carried[..., -1]  # [B, H, N]

    def step(state, xs):
        nv, kc, qr, kw, att, sd = xs
        v_new = nv - kc @ state
        out = qr @ state + att @ v_new
        return state * sd[..., None, None] + jnp.swapaxes(kw, -1, -2) @ v_new, out

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (new_values, k_cumdecay, q_read, k_write, intra, state_decay))
    _, out = jax.lax.scan(step, jnp.zeros((b, hv, dk, dv), f32), xs)  # out [N, B, H, C, dv]
    out = jnp.transpose(out, (1, 0, 3, 2, 4)).reshape(b, n * chunk, hv, dv)
    return out[:, :t]


def _unit_lower_solve(lower: Float[Array, "... c c"], rhs: Float[Array, "... c d"]) -> Float[Array, "... c d"]:
    """x with (I + lower) x = rhs, ``lower`` strictly lower triangular: forward substitution, one row per step
    for every chunk and head at once (no LAPACK call, so it runs alike on every backend)."""

    def row(i, x):
        xi = rhs[..., i, :] - jnp.einsum("...j,...jd->...d", lower[..., i, :], x)
        return x.at[..., i, :].set(xi)

    return jax.lax.fori_loop(0, rhs.shape[-2], row, jnp.zeros_like(rhs))


def gated_rms_norm(
    x: Float[Array, "b t h d"], weight: Float[Array, " d"], gate: Float[Array, "b t h d"], eps: float
) -> Float[Array, "b t h d"]:
    """HF ``Qwen3_5RMSNormGated``: RMSNorm per head in float32, cast, times weight, times silu(gate) in float32."""
    dt = x.dtype
    xf = x.astype(jnp.float32)
    normed = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(dt)
    scaled = weight.astype(dt) * normed
    return (scaled.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))).astype(dt)
