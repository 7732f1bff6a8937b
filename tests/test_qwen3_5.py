"""Qwen3.5 (Gated DeltaNet hybrid) tests that are not HF parity (those are rows of tests/test_parity.py):
the chunked delta rule and causal conv at segment boundaries, which weights the converter reads, and real
hub configs' full-size parameter counts against HF's meta-device model.
"""

import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from psych201_jax.model import checkpoint, delta_rule, hf_config
from psych201_jax.model import hf_weights as weights
from psych201_jax.model.decoder import layer_groups
from psych201_jax.model.params import param_shapes
from psych201_jax.testing.parity import QWEN3_5_PATTERN as PATTERN
from psych201_jax.testing.tiny_models import add_mtp_head, make_tiny_hf_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_CONFIGS = os.path.join(REPO, "tests", "data", "hub_configs")


def test_delta_rule_reset_and_conv_mask_are_each_needed():
    """Unit level: a row of two segments equals each segment alone; dropping the segment ids (no reset, no
    conv mask) changes the second segment's output."""
    rng = np.random.default_rng(0)
    b, t, hk, hv, dk, dv = 1, 200, 2, 4, 16, 8
    q, k = (jnp.asarray(rng.normal(size=(b, t, hk, dk)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(b, t, hv, dv)), jnp.float32)
    g = jnp.asarray(-0.05 * rng.uniform(size=(b, t, hv)), jnp.float32)
    beta = jnp.asarray(rng.uniform(size=(b, t, hv)), jnp.float32)
    seg = jnp.asarray(np.r_[np.ones(90), 2 * np.ones(110)][None], jnp.int32)
    packed = delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, seg, chunk=64)
    alone = delta_rule.chunk_gated_delta_rule(
        q[:, 90:], k[:, 90:], v[:, 90:], g[:, 90:], beta[:, 90:], jnp.ones((1, 110), jnp.int32), chunk=64
    )
    np.testing.assert_allclose(np.asarray(packed[:, 90:]), np.asarray(alone), atol=2e-6)
    merged = delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, jnp.ones_like(seg), chunk=64)
    assert float(jnp.abs(merged[:, 90:] - alone).max()) > 1e-2

    w = jnp.asarray(rng.normal(size=(4, hv, dv)), jnp.float32)
    conv = delta_rule.causal_conv(v, w, seg)
    conv_alone = delta_rule.causal_conv(v[:, 90:], w, jnp.ones((1, 110), jnp.int32))
    np.testing.assert_allclose(np.asarray(conv[:, 90:]), np.asarray(conv_alone), atol=1e-6)
    assert float(jnp.abs(delta_rule.causal_conv(v, w, jnp.ones_like(seg))[:, 90:93] - conv_alone[:, :3]).max()) > 1e-2


def test_strong_decays_across_segments_stay_finite_and_isolated():
    """Decays of -40 per token (HF's init reaches that): a segment's log-decay sums fall to -1e3 within a
    chunk, so nothing may exponentiate one segment's sum against another's."""
    rng = np.random.default_rng(2)
    q, k = (jnp.asarray(rng.normal(size=(1, 192, 2, 16)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(1, 192, 2, 16)), jnp.float32)
    g = jnp.asarray(-40.0 * rng.uniform(0.5, 1.0, size=(1, 192, 2)), jnp.float32)
    beta = jnp.asarray(rng.uniform(size=(1, 192, 2)), jnp.float32)
    seg = jnp.asarray(np.r_[np.ones(40), 2 * np.ones(100), 3 * np.ones(52)][None], jnp.int32)
    out = delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, seg, chunk=64)
    assert bool(jnp.isfinite(out).all())
    alone = delta_rule.chunk_gated_delta_rule(
        q[:, 40:140], k[:, 40:140], v[:, 40:140], g[:, 40:140], beta[:, 40:140], jnp.ones((1, 100), jnp.int32)
    )
    np.testing.assert_allclose(np.asarray(out[:, 40:140]), np.asarray(alone), atol=1e-5)


def test_chunk_size_does_not_change_the_result():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(2, 300, 2, 16)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.normal(size=(2, 300, 2, 16)), jnp.float32)
    g = jnp.asarray(-rng.uniform(size=(2, 300, 2)), jnp.float32)
    beta = jnp.asarray(rng.uniform(size=(2, 300, 2)), jnp.float32)
    seg = jnp.asarray(np.r_[np.ones(130), 2 * np.ones(150), np.zeros(20)][None].repeat(2, 0), jnp.int32)
    outs = [delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, seg, chunk=c) for c in (16, 64, 128)]
    for out in outs[1:]:
        np.testing.assert_allclose(np.asarray(out[:, :280]), np.asarray(outs[0][:, :280]), atol=2e-5)


def test_mtp_and_vision_weights_are_never_read(tmp_path, qwen_tokenizer_dir, monkeypatch):
    hf_dir = make_tiny_hf_checkpoint("qwen3_5", str(tmp_path / "hf"), qwen_tokenizer_dir, seed=3)
    add_mtp_head(hf_dir)
    reads: list[str] = []
    original = weights.SafetensorsReader.read

    def recording_read(self, name):
        reads.append(name)
        return original(self, name)

    monkeypatch.setattr(weights.SafetensorsReader, "read", recording_read)
    names = weights.SafetensorsReader(hf_dir).names()
    skipped = {n for n in names if n.startswith(("mtp.", *weights.VISION_PREFIXES))}
    assert any(n.startswith("mtp.") for n in skipped) and any(n.startswith("model.visual.") for n in skipped)
    checkpoint.convert(hf_dir, str(tmp_path / "out"), "float32")
    assert set(reads) == names - skipped


# --- real hub configs ------------------------------------------------------------------------------------

# file -> (our layers, hidden, tied, linear value heads)
REAL_CONFIGS = {
    "Qwen3.5-0.8B.json": (24, 1024, True, 16),
    "Qwen3.5-4B.json": (32, 2560, True, 32),
    "Qwen3.5-27B.json": (64, 5120, False, 48),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_hub_config_parses_to_the_language_models_full_size(name, tmp_path):
    """Sources: tests/data/hub_configs/SOURCES.md. Our parameter count equals HF's language model (+ head)."""
    layers, hidden, tied, value_heads = REAL_CONFIGS[name]
    with open(os.path.join(HUB_CONFIGS, name)) as fh:
        (tmp_path / "config.json").write_text(fh.read())
    spec = hf_config.from_hf_dir(str(tmp_path))
    config = AutoConfig.from_pretrained(str(tmp_path))
    assert (spec.wrapper, spec.num_layers, spec.hidden_size, spec.tie_word_embeddings) == (
        "qwen3_5",
        layers,
        hidden,
        tied,
    )
    assert spec.linear_num_value_heads == value_heads and spec.rotary_dim == 64 and spec.vocab_size == 248320
    assert layer_groups(spec.layer_types) == ((0, layers // 4, PATTERN),)
    ours = sum(math.prod(s) for s in param_shapes(spec).values())
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    hf_total = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(("model.language_model.", "lm_head."))
    )
    print(f"{name}: ours {ours:,}, HF language model {hf_total:,}")
    assert ours == hf_total
