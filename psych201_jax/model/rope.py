"""Rotary position embeddings as in transformers' ``modeling_rope_utils`` (HF "rotate_half" layout).

Inverse frequencies are computed once on the host in float32 with the same operation order as the
PyTorch reference (default, linear, llama3 and YaRN); cos/sin are computed in float32 from the
per-token positions (which restart at 0 in every packed segment) and scaled by ``attention_scaling``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from psych201_jax.model.spec import RopeSpec, RopeType, UnsupportedModelError


def _theta_powers(theta: float, head_dim: int) -> np.ndarray:
    """theta^(2i/d) as float32[head_dim // 2]: float32 exponents, the power correctly rounded (as torch's)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float64(theta) ** exponent.astype(np.float64)).astype(np.float32)


def _base_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """1 / theta^(2i/d) in float32, i = 0..d/2-1: [head_dim // 2]."""
    return np.float32(1.0) / _theta_powers(theta, head_dim)


def _llama3_inv_freq(rope: RopeSpec, head_dim: int) -> np.ndarray:
    """Llama 3.1 frequency scaling: long wavelengths divided by ``factor``, a smooth band in between."""
    inv_freq = _base_inv_freq(rope.theta, head_dim)
    factor, low, high = np.float32(rope.factor), rope.low_freq_factor, rope.high_freq_factor
    old_context_len = rope.original_max_position_embeddings
    # required llama3 fields (transformers reads them with [] too)
    assert low is not None and high is not None and old_context_len is not None
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((np.float32(old_context_len) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
    smoothed = (np.float32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(rope: RopeSpec, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """YaRN: ramp between interpolated and extrapolated frequencies; cos/sin scaled by the attention factor."""
    base, dim = rope.theta, head_dim
    original = rope.original_max_position_embeddings
    assert original is not None  # required for YaRN (transformers reads it with [] too)
    factor = rope.factor if rope.factor is not None else max_position_embeddings / original

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rope.beta_fast or 32
    beta_slow = rope.beta_slow or 1

    def correction_dim(num_rotations):
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as in transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = (np.float32(1) - ramp).astype(np.float32)

    pos_freqs = _theta_powers(base, dim)
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = interpolation * (np.float32(1) - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def inv_freq_and_scaling(rope: RopeSpec, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies float32[head_dim // 2] and the cos/sin ``attention_scaling`` of one RoPE config."""
    if rope.rope_type == RopeType.DEFAULT:
        return _base_inv_freq(rope.theta, head_dim), 1.0
    if rope.rope_type == RopeType.LINEAR:
        return _base_inv_freq(rope.theta, head_dim) / np.float32(rope.factor), 1.0
    if rope.rope_type == RopeType.LLAMA3:
        return _llama3_inv_freq(rope, head_dim), 1.0
    if rope.rope_type == RopeType.YARN:
        return _yarn_inv_freq(rope, head_dim, max_position_embeddings)
    raise UnsupportedModelError(f"unsupported rope_type {rope.rope_type!r}")


def cos_sin(
    positions: Int[Array, "b t"], inv_freq: Float[np.ndarray, " half"], attention_scaling: float
) -> tuple[Float[Array, "b t d"], Float[Array, "b t d"]]:
    """positions int32[B, T] -> (cos, sin) float32[B, T, head_dim], both halves repeated (HF layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * attention_scaling, jnp.sin(emb) * attention_scaling


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    """[..., d] -> [..., d]: (x1, x2) -> (-x2, x1) over the two halves of the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(
    x: Float[Array, "b t h d"], cos: Float[Array, "b t d"], sin: Float[Array, "b t d"], *, in_fp32: bool
) -> Float[Array, "b t h d"]:
    """x [B, T, H, hd], cos/sin float32[B, T, rd] (rd <= hd) -> x with its first rd dims rotated, in x.dtype.

    ``in_fp32=False`` casts cos/sin to x.dtype first (Llama/Qwen); ``True`` rotates in float32 and casts the
    result (OLMo 3), matching each family's HF code bit for bit in bfloat16.
    """
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:  # partial rotary (Qwen3.5): the first dims rotate, the rest pass through
        return jnp.concatenate([apply_rope(x[..., :rotary], cos, sin, in_fp32=in_fp32), x[..., rotary:]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    if in_fp32:
        xf = x.astype(jnp.float32)
        return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)
    return x * cos.astype(x.dtype) + rotate_half(x) * sin.astype(x.dtype)
