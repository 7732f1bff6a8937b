"""Tiny random-initialised HF checkpoints (transformers + torch, no hub) for parity tests.

The weights get a non-trivial scale (unit-variance activations through each projection, random norm
weights and biases, peaked output distributions), so that any mismatch between our model and the
PyTorch reference shows up in per-token log-probs instead of vanishing in near-uniform predictions.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "olmo3")

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=128,
        )
    ),
    "qwen2": dict(),
    "qwen3": dict(head_dim=32),
    "olmo3": dict(num_hidden_layers=4, sliding_window=64),
}


def make_tiny_hf_checkpoint(
    family: str,
    out_dir: str,
    tokenizer_dir: str,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    logit_scale: float = 3.0,
    **overrides,
) -> str:
    """Writes config.json, safetensors weights and the tokenizer files of a tiny ``family`` model to
    ``out_dir`` and returns it. ``overrides`` are HF config fields (e.g. num_key_value_heads, rope_scaling,
    tie_word_embeddings); ``dtype`` is the stored weight dtype; ``max_shard_size`` (e.g. "100KB") writes
    sharded weights with a model.safetensors.index.json.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    vocab_size = len(PreTrainedTokenizerFast.from_pretrained(tokenizer_dir))
    kwargs = {**_COMMON, "vocab_size": vocab_size, **_FAMILY_DEFAULTS[family], **overrides}
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _rescale(model, config, logit_scale)
    model.to(getattr(torch, dtype))
    os.makedirs(out_dir, exist_ok=True)
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **save_kwargs)
    for name in os.listdir(tokenizer_dir):
        shutil.copy2(os.path.join(tokenizer_dir, name), out_dir)
    return out_dir


def _rescale(model, config, logit_scale: float) -> None:
    """Unit-gain projections, norms ~ U(0.5, 1.5), biases ~ N(0, 0.5), N(0, 1) input embeddings, and an
    output head (the embedding, when tied) giving logits of standard deviation ``logit_scale``."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif name.startswith("lm_head") or ("embed_tokens" in name and config.tie_word_embeddings):
                p.normal_(0.0, logit_scale / math.sqrt(config.hidden_size))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
