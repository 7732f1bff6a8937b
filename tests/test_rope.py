"""RoPE tables and rotation against the pinned transformers PyTorch code."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import AutoConfig
from transformers.models.llama import modeling_llama
from transformers.models.olmo3 import modeling_olmo3
from transformers.models.qwen2 import modeling_qwen2

from psych201_jax.model import hf_config, rope
from psych201_jax.model import spec as modelspec

pytestmark = pytest.mark.quick

BASE = dict(
    hidden_size=256,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=64,
    num_hidden_layers=4,
    vocab_size=32,
)
POSITIONS = np.array([[0, 1, 2, 63, 64, 127, 128, 500, 4095, 8191, 8192, 30000, 65535]], np.int32)

FLAT_CASES = {
    "llama_default": ("llama", dict(rope_theta=500000.0)),
    "llama3_real": (
        "llama",
        dict(
            rope_theta=500000.0,
            max_position_embeddings=131072,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
    ),
    "llama3_tiny": (
        "llama",
        dict(
            head_dim=16,
            rope_scaling=dict(
                rope_type="llama3",
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=128,
            ),
        ),
    ),
    "linear": ("llama", dict(rope_scaling=dict(rope_type="linear", factor=4.0))),
    "qwen2_yarn_untruncated": (
        "qwen2",
        dict(
            rope_theta=1e6,
            max_position_embeddings=131072,
            rope_scaling=dict(rope_type="yarn", factor=4.0, truncate=False, original_max_position_embeddings=32768),
        ),
    ),
    "yarn_mscale": (
        "llama",
        dict(
            rope_scaling=dict(
                rope_type="yarn",
                factor=40.0,
                mscale=1.0,
                mscale_all_dim=0.707,
                beta_fast=16,
                beta_slow=2,
                original_max_position_embeddings=4096,
            )
        ),
    ),
    "yarn_attention_factor": (
        "qwen2",
        dict(
            rope_scaling=dict(rope_type="yarn", factor=8.0, attention_factor=1.3, original_max_position_embeddings=64)
        ),
    ),
}
ROTARY = {"llama": modeling_llama.LlamaRotaryEmbedding, "qwen2": modeling_qwen2.Qwen2RotaryEmbedding}


def _ours(spec, layer_type, positions=POSITIONS):
    inv_freq, scaling = rope.inv_freq_and_scaling(
        spec.rope_for(layer_type), spec.head_dim, spec.max_position_embeddings
    )
    cos, sin = rope.cos_sin(jnp.asarray(positions), inv_freq, scaling)
    return inv_freq, scaling, np.asarray(cos), np.asarray(sin)


@pytest.mark.parametrize("case", sorted(FLAT_CASES))
def test_flat_rope_matches_transformers(case):
    model_type, kwargs = FLAT_CASES[case]
    config = AutoConfig.for_model(model_type, **BASE, **kwargs)
    spec = hf_config.from_hf_config(config)
    hf = ROTARY[model_type](config)
    x = torch.zeros(1, dtype=torch.float32)
    hf_cos, hf_sin = hf(x, torch.tensor(POSITIONS, dtype=torch.long))
    inv_freq, scaling, cos, sin = _ours(spec, modelspec.FULL_ATTENTION)
    # torch's float32 pow is not always correctly rounded (1 ulp apart in rare entries)
    np.testing.assert_allclose(inv_freq, hf.inv_freq.numpy(), rtol=2.5e-7, atol=0)
    assert scaling == pytest.approx(hf.attention_scaling, rel=1e-12)
    np.testing.assert_allclose(cos, hf_cos.numpy(), atol=2e-6)
    np.testing.assert_allclose(sin, hf_sin.numpy(), atol=2e-6)


@pytest.mark.parametrize("truncate", [True, False])
def test_olmo3_per_layer_type_rope_matches_transformers(truncate):
    """OLMo 3 Instruct-style YaRN: pinned transformers applies YaRN to full layers only (default RoPE on
    sliding layers) and reads `truncate` from the top-level dict, i.e. always truncates for nested params."""
    config = AutoConfig.for_model(
        "olmo3",
        **BASE,
        max_position_embeddings=65536,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="yarn",
            factor=8.0,
            beta_fast=32,
            beta_slow=1,
            original_max_position_embeddings=8192,
            truncate=truncate,
        ),
    )
    spec = hf_config.from_hf_config(config)
    hf = modeling_olmo3.Olmo3RotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    tables = {}
    for layer_type in (modelspec.SLIDING_ATTENTION, modelspec.FULL_ATTENTION):
        hf_cos, hf_sin = hf(x, torch.tensor(POSITIONS, dtype=torch.long), layer_type)
        inv_freq, scaling, cos, sin = _ours(spec, layer_type)
        np.testing.assert_allclose(inv_freq, getattr(hf, f"{layer_type}_inv_freq").numpy(), rtol=2.5e-7, atol=0)
        np.testing.assert_allclose(cos, hf_cos.numpy(), atol=2e-6)
        np.testing.assert_allclose(sin, hf_sin.numpy(), atol=2e-6)
        tables[layer_type] = (inv_freq, scaling)
    assert spec.rope_for(modelspec.FULL_ATTENTION).rope_type == "yarn"
    assert spec.rope_for(modelspec.SLIDING_ATTENTION).rope_type == "default"
    assert tables[modelspec.FULL_ATTENTION][1] > 1.0 == tables[modelspec.SLIDING_ATTENTION][1]


def test_rotate_half():
    x = jnp.arange(8.0).reshape(1, 1, 1, 8)
    np.testing.assert_array_equal(np.asarray(rope.rotate_half(x))[0, 0, 0], [-4, -5, -6, -7, 0, 1, 2, 3])


@pytest.mark.parametrize("family,in_fp32", [("llama", False), ("olmo3", True)])
def test_apply_rope_is_bit_exact_in_bfloat16(family, in_fp32):
    """Llama casts cos/sin to bf16 before rotating; OLMo 3 rotates in fp32 and casts after."""
    rng = np.random.default_rng(0)
    b, t, h, hd = 1, 300, 2, 32
    q = rng.normal(size=(b, t, h, hd)).astype(np.float32).astype(ml_dtypes.bfloat16)
    positions = np.arange(t, dtype=np.int32)[None] * 37
    inv_freq, _ = rope.inv_freq_and_scaling(modelspec.RopeSpec(theta=10000.0), hd, 4096)
    cos, sin = rope.cos_sin(jnp.asarray(positions), inv_freq, 1.0)

    q_t = torch.from_numpy(q.astype(np.float32)).to(torch.bfloat16).transpose(1, 2)  # [B, H, T, hd]
    cos_t, sin_t = torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin))
    if not in_fp32:  # LlamaRotaryEmbedding returns cos/sin already cast to the activation dtype
        cos_t, sin_t = cos_t.to(torch.bfloat16), sin_t.to(torch.bfloat16)
    module = modeling_llama if family == "llama" else modeling_olmo3
    ref, _ = module.apply_rotary_pos_emb(q_t, q_t, cos_t, sin_t)
    ref = ref.transpose(1, 2).float().numpy()

    ours = np.asarray(rope.apply_rope(jnp.asarray(q), cos, sin, in_fp32=in_fp32), np.float32)
    other = np.asarray(rope.apply_rope(jnp.asarray(q), cos, sin, in_fp32=not in_fp32), np.float32)
    np.testing.assert_array_equal(ours, ref)
    assert not np.array_equal(other, ref)  # the cast order is observable, so this test can fail
