"""Tiny random-initialised HF checkpoints (transformers + torch, no hub) for parity tests.

Vision-language families (``VL_FAMILIES``) are saved as the whole wrapper with a tiny vision tower, as
hub checkpoints are; the rescaling applies to their language model (the vision tower keeps its init).

The weights get a non-trivial scale (unit-variance activations through each projection, random norm
weights and biases, peaked output distributions), so that any mismatch between our model and the
PyTorch reference shows up in per-token log-probs instead of vanishing in near-uniform predictions.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any

from psych201_jax.model.spec import MOE_FAMILIES, SUPPORTED_MODEL_TYPES, VL_WRAPPERS

DECODER_FAMILIES = tuple(t for t in SUPPORTED_MODEL_TYPES if t not in VL_WRAPPERS)  # MoE families included
VL_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "mllama", "qwen3_5", "gemma3", "qwen3_5_moe")
# Families whose norms scale by 1 + weight (their norm weights are drawn around 0, not 1).
ZERO_CENTRED = ("qwen3_5_text", "qwen3_5", "gemma2", "gemma3_text", "gemma3", "qwen3_5_moe_text", "qwen3_5_moe")
# Families with routed experts (the VL wrapper's language model included).
MOE = (*MOE_FAMILIES, "qwen3_5_moe")
FAMILIES = DECODER_FAMILIES + VL_FAMILIES
# Weight layouts of a saved VL wrapper: "saved" = as transformers saves it (5.x still writes Qwen2.5-VL
# and Mllama in their pre-5 hub layouts), "module" = the transformers-5 module names (model.language_model.*,
# model.visual.* / model.vision_model.* / model.multi_modal_projector.*, lm_head.weight).
# MoE families: "saved" = one module per expert (as save_pretrained and hub checkpoints write them),
# "stacked" = transformers 5's stacked experts (mlp.experts.gate_up_proj / down_proj).
LAYOUTS = ("saved", "module", "stacked")

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
# Gemma: a 64-token window, query_pre_attn_scalar 24 != head_dim 32, hidden 80 (sqrt(80) is no bfloat16
# number, so the embedding scale's rounding shows), GeGLU, tied.
_GEMMA: dict[str, Any] = dict(
    hidden_size=80,
    head_dim=32,
    sliding_window=64,
    query_pre_attn_scalar=24,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
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
    # Mistral: every layer slides over a 64-token window (sliding_window=None: full attention, as v0.3/Nemo).
    "mistral": dict(sliding_window=64),
    # OLMo 2: OLMo 3's post-norm layer with full-width QK-norm, no windows.
    "olmo2": dict(num_hidden_layers=3),
    "olmo3": dict(num_hidden_layers=4, sliding_window=64),
    # Qwen3.5: 8 layers = two repeats of (3 Gated DeltaNet, 1 gated attention); value heads 2x key heads;
    # a quarter of each 32-wide head rotates.
    "qwen3_5_text": dict(
        num_hidden_layers=8,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        rope_parameters=dict(
            rope_type="default",
            rope_theta=10000.0,
            partial_rotary_factor=0.25,
            mrope_section=[2, 1, 1],
            mrope_interleaved=True,
        ),
    ),
    # Gemma 2: alternating window / full layers, caps small enough to bite (attention 5, final 3).
    "gemma2": dict(_GEMMA, num_hidden_layers=4, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    # Gemma 3: five window layers then a full one (sliding_window_pattern 6, 8 layers: a remainder group),
    # local RoPE 10K, global 1M with linear scaling 8, QK-norm.
    "gemma3_text": dict(
        _GEMMA,
        num_hidden_layers=8,
        rope_parameters=dict(
            full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1_000_000.0),
            sliding_attention=dict(rope_type="default", rope_theta=10_000.0),
        ),
    ),
    # Mixture of experts: 8 experts, top 2, on every layer; expert width 32 (Mixtral and OLMoE: their
    # intermediate_size); Qwen2-MoE adds a shared expert of width 48 behind its sigmoid gate.
    "qwen2_moe": dict(
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48
    ),
    "qwen3_moe": dict(head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, sliding_window=None),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32, norm_topk_prob=False, clip_qkv=None),
    # Text configs of the VL wrappers (nested under text_config).
    "qwen2_5_vl": dict(rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3])),
    "qwen3_vl": dict(
        head_dim=32,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[6, 5, 5], mrope_interleaved=True),
    ),
    "mllama": dict(
        num_hidden_layers=5,
        cross_attention_layers=[1, 3],
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=128,
        ),
    ),
}
_FAMILY_DEFAULTS["qwen3_5"] = _FAMILY_DEFAULTS["qwen3_5_text"]
# Qwen3.5-MoE: the Qwen3.5 hybrid with 8 experts, top 2 (always renormalised), and a shared expert of width 48.
_FAMILY_DEFAULTS["qwen3_5_moe_text"] = dict(
    _FAMILY_DEFAULTS["qwen3_5_text"],
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=48,
)
_FAMILY_DEFAULTS["qwen3_5_moe"] = _FAMILY_DEFAULTS["qwen3_5_moe_text"]
_FAMILY_DEFAULTS["gemma3"] = _FAMILY_DEFAULTS["gemma3_text"]
# Tiny vision towers (never run: the scorer reads text only; they make the checkpoint a real wrapper).
_VISION: dict[str, dict[str, Any]] = {
    "qwen2_5_vl": dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0]
    ),
    "qwen3_vl": dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        deepstack_visual_indexes=[0],
        num_position_embeddings=64,
    ),
    "qwen3_5": dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, num_position_embeddings=64
    ),
    "qwen3_5_moe": dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, num_position_embeddings=64
    ),
    "gemma3": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    ),
    "mllama": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_global_layers=1,
        attention_heads=2,
        intermediate_size=64,
        vision_output_dim=64,
        image_size=28,
        patch_size=14,
        intermediate_layers_indices=[0],
    ),
}
# HF config keys that belong to the wrapper (top level), not to its text_config.
_WRAPPER_KEYS = ("tie_word_embeddings",)


def make_tiny_hf_checkpoint(
    family: str,
    out_dir: str,
    tokenizer_dir: str,
    *,
    seed: int = 0,
    dtype: str = "float32",
    max_shard_size: str | None = None,
    logit_scale: float = 3.0,
    layout: str = "saved",
    **overrides,
) -> str:
    """Writes config.json, safetensors weights and the tokenizer files of a tiny ``family`` model to
    ``out_dir`` and returns it. ``overrides`` are HF config fields (e.g. num_key_value_heads, rope_scaling,
    tie_word_embeddings; for a VL family they go to its text_config, tie_word_embeddings to the wrapper);
    ``dtype`` is the stored weight dtype; ``max_shard_size`` (e.g. "100KB") writes sharded weights with a
    model.safetensors.index.json; ``layout`` (VL families) is one of ``LAYOUTS``.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    kwargs = {**_COMMON, "vocab_size": len(tokenizer), **_FAMILY_DEFAULTS[family], **overrides}
    torch.manual_seed(seed)
    if family in VL_FAMILIES:
        wrapper = {k: kwargs.pop(k) for k in _WRAPPER_KEYS if k in kwargs}
        if family == "mllama":  # its text config wants integer token ids
            kwargs.update(bos_token_id=tokenizer.bos_token_id or 0, eos_token_id=None, pad_token_id=None)
            wrapper.pop("tie_word_embeddings", None)  # Mllama never ties
        if family == "gemma3":  # 4 image tokens of a 28-pixel image (hub: 256)
            wrapper.update(mm_tokens_per_image=4)
        config = AutoConfig.for_model(family, text_config=kwargs, vision_config=_VISION[family], **wrapper)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        tied = bool(getattr(config, "tie_word_embeddings", False)) and family != "mllama"
        _rescale(
            model,
            config.text_config.hidden_size,
            tied,
            logit_scale,
            only="model.language_model.",
            zero_centred=family in ZERO_CENTRED,
        )
    else:
        config = AutoConfig.for_model(family, **kwargs)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _rescale(
            model, config.hidden_size, config.tie_word_embeddings, logit_scale, zero_centred=family in ZERO_CENTRED
        )
    model.to(getattr(torch, dtype))
    os.makedirs(out_dir, exist_ok=True)
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **save_kwargs)
    if layout == "module" and family in VL_FAMILIES:
        _rename_tensors(out_dir, _module_name)
    if layout == "stacked" and family in MOE:
        _save_module_layout(model, out_dir)
    for name in os.listdir(tokenizer_dir):
        shutil.copy2(os.path.join(tokenizer_dir, name), out_dir)
    return out_dir


def _save_module_layout(model, out_dir: str) -> None:
    """Rewrites the weights as one file of the model's own module names (stacked experts), no index."""
    from safetensors.torch import save_file

    for name in os.listdir(out_dir):
        if name.endswith(".safetensors") or name.endswith(".index.json"):
            os.remove(os.path.join(out_dir, name))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})


def add_mtp_head(hf_dir: str) -> None:
    """Adds a multi-token-prediction head (mtp.*) to a single-file checkpoint, as hub Qwen3.5 checkpoints
    carry; HF skips it on load."""
    import torch
    from safetensors.torch import load_file, save_file

    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    tensors["mtp.fc.weight"] = torch.zeros(8, 8)
    tensors["mtp.layers.0.input_layernorm.weight"] = torch.zeros(8)
    save_file(tensors, path, metadata={"format": "pt"})


def _module_name(key: str) -> str:
    """A pre-transformers-5 VL tensor name -> its transformers-5 module name (others unchanged)."""
    renames = (
        ("language_model.lm_head.", "lm_head."),
        ("language_model.model.", "model.language_model."),
        ("vision_model.", "model.vision_model."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("visual.", "model.visual."),
    )
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old) :]
    if key.startswith("model.") and not key.startswith(
        ("model.language_model.", "model.visual.", "model.vision_", "model.multi_modal")
    ):
        return "model.language_model." + key[len("model.") :]
    return key


def _rename_tensors(out_dir: str, rename) -> None:
    """Renames every tensor of the safetensors files in ``out_dir`` (and the index) with ``rename``."""
    import json

    from safetensors.torch import load_file, save_file

    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".safetensors"):
            path = os.path.join(out_dir, name)
            tensors = load_file(path)
            save_file({rename(k): v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
    index = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            data = json.load(fh)
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        with open(index, "w") as fh:
            json.dump(data, fh, indent=2)


def _rescale(
    model, hidden_size: int, tied: bool, logit_scale: float, only: str = "", zero_centred: bool = False
) -> None:
    """Unit-gain projections and convs, norms ~ U(0.5, 1.5), biases ~ N(0, 0.5), N(0, 1) input embeddings,
    and an output head (the embedding, when tied) giving logits of standard deviation ``logit_scale``.

    ``only``: rescale just the parameters under this prefix (and lm_head); 1-D parameters other than norms
    and biases (Mllama's cross-attention gates) keep their init. ``zero_centred``: norms
    that scale by 1 + weight (Qwen3.5's, all but the gated DeltaNet norm) get weights ~ U(-0.5, 0.5)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if only and not name.startswith((only, "lm_head")):
                continue
            if name.endswith("A_log"):
                # Qwen3.5 decay rates A = exp(A_log) in [0.01, 0.5] (HF's init draws up to 16): weak decays keep
                # the recurrent state alive across chunks, so a wrong carry between chunks or segments shows,
                # and keep the layer well conditioned enough for a 1e-4 float32 comparison.
                p.copy_(torch.log(torch.linspace(0.01, 0.5, p.numel(), dtype=torch.float64)).to(p.dtype))
            elif "norm" in name and zero_centred and "linear_attn.norm" not in name:
                p.uniform_(-0.5, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif name.startswith("lm_head") or ("embed_tokens" in name and tied):
                p.normal_(0.0, logit_scale / math.sqrt(hidden_size))
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # stacked [E, out, in]
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]))
            elif p.ndim >= 2:  # fan-in: [out, in] linear, [channels, 1, kernel] depthwise conv
                # Qwen3.5's DeltaNet output is RMS-normalised per head before out_proj, so at unit gain its
                # float rounding is amplified ~100x per layer and the random model turns chaotic (HF's own
                # float32 vs float64 error ~1e-2); gain 0.3 brings that to ~3e-5, below the 1e-4 bound.
                gain = 0.3 if name.endswith("linear_attn.out_proj.weight") else 1.0
                p.normal_(0.0, gain / math.sqrt(math.prod(p.shape[1:])))
