"""The decoder's per-position blocks: RMSNorm (every family's variant) and the gated MLP (SwiGLU / GeGLU).

Each follows one HF implementation to the rounding: where the float32 computation is cast back to the
activation dtype decides bfloat16 parity (tests/test_model_layers.py checks the norms bit for bit).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from psych201_jax.model.axes import ACT_BATCH, ACT_LENGTH, ACT_MLP, constrain
from psych201_jax.model.spec import Activation, ModelSpec


def rms_norm(
    x: jnp.ndarray,
    weight: jnp.ndarray,
    eps: float,
    *,
    weight_fp32: bool,
    axes: tuple[int, ...] = (-1,),
    zero_centred: bool = False,
) -> jnp.ndarray:
    """RMSNorm over ``axes`` in fp32. weight_fp32: weight * x in fp32 then cast (OLMo, Qwen3.5); else cast
    then multiply in x.dtype (Llama/Qwen). zero_centred: the scale is 1 + weight, in fp32, then cast
    (Qwen3.5, Gemma). Returns x.dtype."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=axes, keepdims=True) + eps)
    if zero_centred:
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    if weight_fp32:
        return (weight.astype(jnp.float32) * normed).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def soft_cap(x: jnp.ndarray, cap: float | None) -> jnp.ndarray:
    """Gemma 2's soft cap ``cap * tanh(x / cap)`` in HF's order (divide, tanh, multiply); None: x as it is."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def activate(gate: jnp.ndarray, activation: Activation) -> jnp.ndarray:
    """The gate's activation in its dtype: SiLU as jax computes it, or tanh-approximated GELU in float32 then
    cast (torch's GELU computes reduced-precision inputs in float32 and rounds once)."""
    if activation == Activation.GELU_TANH:
        return jax.nn.gelu(gate.astype(jnp.float32), approximate=True).astype(gate.dtype)
    return jax.nn.silu(gate)


def mlp_block(p: dict[str, jnp.ndarray], x: jnp.ndarray, *, spec: ModelSpec) -> jnp.ndarray:
    """Gated MLP: down(act(gate(x)) * up(x)), x [B, T, D] -> [B, T, D]; act is ``spec.activation``."""
    dt = x.dtype
    gate = jnp.einsum("btd,df->btf", x, p["w_gate"].astype(dt))
    up = jnp.einsum("btd,df->btf", x, p["w_up"].astype(dt))
    if spec.mlp_bias:
        gate, up = gate + p["b_gate"].astype(dt), up + p["b_up"].astype(dt)
    h = constrain(activate(gate, spec.activation) * up, (ACT_BATCH, ACT_LENGTH, ACT_MLP))
    out = jnp.einsum("btf,fd->btd", h, p["w_down"].astype(dt))
    if spec.mlp_bias:
        out = out + p["b_down"].astype(dt)
    return out
