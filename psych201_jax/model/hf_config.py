"""HF ``config.json`` -> ``ModelSpec``: which fields each supported family reads, and what it refuses.

Specs are built from transformers' ``AutoConfig`` (never with remote code), so the RoPE parameters are the ones
transformers itself standardised (``rope_parameters``, possibly nested per ``layer_types`` entry; legacy
``rope_scaling``/``rope_theta`` keys are folded in by transformers on load).

Vision-language checkpoints (``VL_WRAPPERS``: Qwen2.5-VL, Qwen3-VL, Llama-3.2-Vision, Qwen3.5, Qwen3.5-MoE,
Gemma 3) are read as their language model on text-only input: the decoder fields come from the nested
``text_config``. Their M-RoPE reduces to 1-D RoPE when all position streams are equal (text only;
tests/test_parity.py checks it against HF), Qwen3-VL's deepstack adds nothing without images, and
Llama-3.2-Vision's cross-attention layers are skipped by HF without images.
"""

from __future__ import annotations

import json
import os
from typing import Any

from psych201_jax.model.spec import (
    FULL_ATTENTION,
    GEMMA_FAMILIES,
    HYBRID_FAMILIES,
    LINEAR_ATTENTION,
    MOE_FAMILIES,
    SLIDING_ATTENTION,
    SUPPORTED_MODEL_TYPES,
    SUPPORTED_ROPE_TYPES,
    VL_WRAPPERS,
    Activation,
    ModelSpec,
    NormPlacement,
    QkNorm,
    RopeSpec,
    UnsupportedModelError,
)


def _unsupported_type_error(model_type: Any) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"unsupported model_type {model_type!r}; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def read_raw_config(hf_dir: str) -> dict:
    """The checkpoint's config.json as a dict; refuses configs that would need remote code."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise UnsupportedModelError(f"no config.json in {hf_dir} (not an HF checkpoint directory)")
    try:
        with open(path) as fh:
            raw = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnsupportedModelError(f"{path}: unreadable config ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict):
        raise UnsupportedModelError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if "auto_map" in raw:
        raise UnsupportedModelError(f"{path} has an auto_map (custom remote code); refusing to load it")
    if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise _unsupported_type_error(raw.get("model_type"))
    return raw


def _rope_spec(params: dict, top_level: dict, *, partial_ok: bool = False) -> RopeSpec:
    """One layer type's ``rope_parameters`` dict -> RopeSpec, rejecting RoPE variants we do not implement.

    ``partial_ok``: the family rotates part of each head (Qwen3.5), read separately as the spec's rotary_dim.
    """
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported rope_type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0 and not partial_ok:
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")

    def opt(key, cast):
        return None if params.get(key) is None else cast(params[key])

    return RopeSpec(
        rope_type=rope_type,
        theta=float(params["rope_theta"]),
        factor=opt("factor", float),
        low_freq_factor=opt("low_freq_factor", float),
        high_freq_factor=opt("high_freq_factor", float),
        original_max_position_embeddings=opt("original_max_position_embeddings", int),
        attention_factor=opt("attention_factor", float),
        beta_fast=opt("beta_fast", float),
        beta_slow=opt("beta_slow", float),
        mscale=opt("mscale", float),
        mscale_all_dim=opt("mscale_all_dim", float),
        # transformers' _compute_yarn_parameters reads `truncate` from the top-level rope_parameters dict,
        # so for per-layer-type (nested) parameters it is always True; we reproduce that.
        truncate=bool(top_level.get("truncate", True)),
    )


def from_hf_config(config: Any) -> ModelSpec:
    """ModelSpec from a transformers config object (as returned by ``AutoConfig.from_pretrained``).

    A vision-language wrapper (``VL_WRAPPERS``) gives the spec of its language model on text-only input.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _unsupported_type_error(model_type)
    if model_type in VL_WRAPPERS:
        return _vl_spec(config, model_type)
    return _decoder_spec(config, model_type, tie_word_embeddings=bool(config.tie_word_embeddings))


def _vl_spec(config: Any, wrapper: str) -> ModelSpec:
    """The language model of a vision-language wrapper, exactly as HF runs it without images."""
    text = getattr(config, "text_config", None)
    if text is None:
        raise UnsupportedModelError(f"{wrapper} config has no text_config")
    family = VL_WRAPPERS[wrapper]
    # HF ties lm_head to the embedding by the wrapper's (top-level) tie_word_embeddings; Mllama's
    # conditional-generation model declares no tied weights at all (its lm_head has 8 rows fewer).
    tie = wrapper != "mllama" and bool(getattr(config, "tie_word_embeddings", False))
    num_heads = text.num_attention_heads
    rope_parameters = dict(text.rope_parameters)
    if wrapper == "qwen2_5_vl":
        # Qwen2.5-VL's attention takes head_dim = hidden_size // num_heads whatever the config says, and
        # splits the rotary half into mrope_section chunks (which must cover it exactly).
        head_dim = text.hidden_size // num_heads
        section = rope_parameters.get("mrope_section")
        if section is not None and sum(section) != head_dim // 2:
            raise UnsupportedModelError(f"mrope_section {list(section)} does not sum to head_dim / 2 = {head_dim // 2}")
        return _decoder_spec(text, family, tie_word_embeddings=tie, head_dim=head_dim, wrapper=wrapper)
    if wrapper in ("qwen3_5", "qwen3_5_moe", "gemma3"):
        # Gemma3ForConditionalGeneration applies no final-logit soft cap (only Gemma3ForCausalLM does).
        return _decoder_spec(text, family, tie_word_embeddings=tie, wrapper=wrapper)
    if wrapper == "qwen3_vl":
        # No sliding window and no layer types in Qwen3-VL's text model: every layer attends fully.
        return _decoder_spec(
            text, family, tie_word_embeddings=tie, wrapper=wrapper, layer_types=None, sliding_window=None
        )
    # mllama: cross-attention layers are skipped without images (MllamaTextModel.forward: a layer in
    # cross_attention_layers with no cross_attention_states and no cached ones is `continue`d).
    total = text.num_hidden_layers
    cross = tuple(sorted({int(i) for i in text.cross_attention_layers or ()}))
    if any(not 0 <= i < total for i in cross):
        raise UnsupportedModelError(f"cross_attention_layers {list(cross)} outside the {total} decoder layers")
    return _decoder_spec(
        text,
        family,
        tie_word_embeddings=False,
        head_dim=text.hidden_size // num_heads,
        wrapper=wrapper,
        num_layers=total - len(cross),
        layer_types=None,
        sliding_window=None,
        skipped_layers=cross,
        embed_vocab_size=text.vocab_size + 8,  # MllamaTextModel: nn.Embedding(vocab_size + 8, hidden_size)
    )


_FROM_CONFIG: Any = object()  # "read this field from the config"


def _decoder_spec(
    config: Any,
    family: str,
    *,
    tie_word_embeddings: bool,
    head_dim: int | None = None,
    wrapper: str = "",
    num_layers: int | None = None,
    layer_types: Any = _FROM_CONFIG,
    sliding_window: Any = _FROM_CONFIG,
    skipped_layers: tuple[int, ...] = (),
    embed_vocab_size: int | None = None,
) -> ModelSpec:
    """ModelSpec of one decoder of ``family`` from its (text) config; keyword fields override the config."""
    if family in GEMMA_FAMILIES:
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
        if act != Activation.GELU_TANH:
            raise UnsupportedModelError(f"{family} hidden_activation {act!r} is not supported (only gelu_pytorch_tanh)")
        if getattr(config, "use_bidirectional_attention", False):
            raise UnsupportedModelError(f"{family} with use_bidirectional_attention (an encoder) is not supported")
    elif getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
    num_heads = config.num_attention_heads
    head_dim = head_dim or getattr(config, "head_dim", None) or config.hidden_size // num_heads
    num_layers = config.num_hidden_layers if num_layers is None else num_layers
    if layer_types is _FROM_CONFIG:
        layer_types = getattr(config, "layer_types", None)
    layer_types = tuple(layer_types or (FULL_ATTENTION,) * num_layers)
    if sliding_window is _FROM_CONFIG:
        sliding_window = getattr(config, "sliding_window", None)
    if family == "olmo2":
        # Olmo2Model builds one full causal mask for every layer, whatever the config says about windows.
        layer_types, sliding_window = (FULL_ATTENTION,) * num_layers, None
    elif family == "mistral":
        # MistralModel ignores layer_types: with a sliding_window every layer slides, without one all are full.
        layer_types = (SLIDING_ATTENTION if sliding_window else FULL_ATTENTION,) * num_layers
        sliding_window = sliding_window or None

    hybrid = family in HYBRID_FAMILIES
    rope_parameters = dict(config.rope_parameters)
    if set(rope_parameters) <= {FULL_ATTENTION, SLIDING_ATTENTION}:  # nested per layer type
        rope = tuple(
            (t, _rope_spec(rope_parameters[t], rope_parameters))
            for t in sorted(rope_parameters)
            if rope_parameters[t] is not None
        )
    else:
        shared = _rope_spec(rope_parameters, rope_parameters, partial_ok=hybrid)
        rope = tuple((t, shared) for t in sorted(set(layer_types) - {LINEAR_ATTENTION}))

    attention_bias = bool(getattr(config, "attention_bias", False))
    extra: dict[str, Any] = {}
    if hybrid:
        # Qwen3.5: gated attention with partial rotary and zero-centred norms, plus Gated DeltaNet layers.
        if attention_bias:
            raise UnsupportedModelError("qwen3_5 with attention_bias=True is not supported")
        if SLIDING_ATTENTION in layer_types:  # its model builds masks for full and linear attention only
            raise UnsupportedModelError(f"{family} layer_types with sliding_attention are not supported")
        extra = dict(
            rotary_dim=int(head_dim * float(rope_parameters.get("partial_rotary_factor", 1.0))),
            norm_zero_centred=True,
            attn_output_gate=True,
            linear_num_key_heads=int(config.linear_num_key_heads),
            linear_num_value_heads=int(config.linear_num_value_heads),
            linear_key_head_dim=int(config.linear_key_head_dim),
            linear_value_head_dim=int(config.linear_value_head_dim),
            linear_conv_kernel=int(config.linear_conv_kernel_dim),
        )
    if family in GEMMA_FAMILIES:
        # Gemma: (1 + w) norms in float32 before and after both sublayers, GeGLU, embeddings scaled by
        # sqrt(hidden), scores scaled by query_pre_attn_scalar**-0.5. Gemma 2 caps the attention scores;
        # Gemma3Attention never passes its config's attn_logit_softcapping on, so Gemma 3 has no such cap.
        # The final cap is the causal LM's (Gemma3ForConditionalGeneration has none: the wrapper's call).
        final = getattr(config, "final_logit_softcapping", None)
        attn_cap = getattr(config, "attn_logit_softcapping", None) if family == "gemma2" else None
        extra = dict(
            norm_zero_centred=True,
            activation=Activation.GELU_TANH,
            embed_scale=True,
            query_pre_attn_scalar=float(config.query_pre_attn_scalar),
            attn_logit_softcap=None if attn_cap is None else float(attn_cap),
            final_logit_softcap=None if final is None or wrapper else float(final),
        )
    if family in MOE_FAMILIES:
        moe, layer_types, sliding_window = _moe_fields(config, family, num_layers, layer_types, sliding_window)
        extra.update(moe)
    table: dict[str, dict[str, Any]] = dict(
        llama=dict(
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=QkNorm.NONE,
            norm_placement=NormPlacement.PRE,
            norm_weight_fp32=False,
            rope_fp32=False,
        ),
        qwen2=dict(
            qkv_bias=True,
            o_bias=False,
            mlp_bias=False,
            qk_norm=QkNorm.NONE,
            norm_placement=NormPlacement.PRE,
            norm_weight_fp32=False,
            rope_fp32=False,
        ),
        qwen3=dict(
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=False,
            qk_norm=QkNorm.HEAD,
            norm_placement=NormPlacement.PRE,
            norm_weight_fp32=False,
            rope_fp32=False,
        ),
        olmo3=dict(
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=False,
            qk_norm=QkNorm.FULL,
            norm_placement=NormPlacement.POST,
            norm_weight_fp32=True,
            rope_fp32=True,
        ),
        qwen3_5_text=dict(
            qkv_bias=False,
            o_bias=False,
            mlp_bias=False,
            qk_norm=QkNorm.HEAD,
            norm_placement=NormPlacement.PRE,
            norm_weight_fp32=True,  # (x_fp32 * (1 + w_fp32)).to(dtype)
            rope_fp32=False,
        ),
    )
    # Mistral: Llama's layer with no biases at all (MistralAttention/MistralMLP take no bias flags).
    table["mistral"] = dict(table["llama"], qkv_bias=False, o_bias=False, mlp_bias=False)
    # OLMo 2: OLMo 3's layer (post-norm, full-width QK-norm, fp32 norm weight and RoPE); windows set above.
    table["olmo2"] = table["olmo3"]
    # Gemma 2: sandwich norms (the (1 + w) offset, GeGLU and the scales are in ``extra``); Gemma 3 adds a
    # per-head QK-norm, itself a (1 + w) norm.
    table["gemma2"] = dict(table["llama"], o_bias=attention_bias, mlp_bias=False, norm_placement=NormPlacement.SANDWICH)
    table["gemma3_text"] = dict(table["gemma2"], qk_norm=QkNorm.HEAD)
    # MoE families: their dense relatives' attention (OLMoE: OLMo 2's full-width QK-norm in a pre-norm layer
    # with Llama's norm and RoPE casts; Qwen2-MoE's q/k/v bias is its config's qkv_bias).
    table["qwen2_moe"] = dict(table["qwen2"], qkv_bias=bool(getattr(config, "qkv_bias", True)))
    table["qwen3_moe"] = table["qwen3"]
    table["mixtral"] = table["mistral"]
    table["olmoe"] = dict(table["llama"], mlp_bias=False, qk_norm=QkNorm.FULL)
    table["qwen3_5_moe_text"] = table["qwen3_5_text"]
    flags = table[family]
    return ModelSpec(
        model_type=family,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=extra.pop("intermediate_size") if "intermediate_size" in extra else config.intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=config.num_key_value_heads or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.rms_norm_eps),
        tie_word_embeddings=tie_word_embeddings,
        layer_types=layer_types,
        sliding_window=sliding_window,
        rope=rope,
        max_position_embeddings=config.max_position_embeddings,
        wrapper=wrapper,
        skipped_layers=skipped_layers,
        embed_vocab_size=embed_vocab_size,
        **flags,
        **extra,
    )


def _moe_fields(config: Any, family: str, num_layers: int, layer_types: tuple, sliding_window: Any):
    """(ModelSpec fields, layer_types, sliding_window) of a mixture-of-experts config, as HF builds it.

    Layers made dense by ``mlp_only_layers`` / ``decoder_sparse_step`` (Qwen2-MoE, Qwen3-MoE; no hub model of
    these families has any) run a plain gated MLP of width ``intermediate_size``. Windows: Mixtral and
    Qwen3-MoE slide every layer when the config has a window (Qwen3-MoE only with use_sliding_window), as
    their models build one mask; Qwen2-MoE slides on its config's ``sliding_attention`` layers (with
    use_sliding_window: the even layers below max_window_layers); OLMoE never slides. Qwen3.5-MoE keeps its hybrid
    ``layer_types`` (it has no windows), always renormalises its top-k weights (its router takes no
    ``norm_topk_prob``) and always has a shared expert.
    """
    experts = int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0)
    if experts <= 0:
        raise UnsupportedModelError(f"{family} config without experts (num_experts={experts})")
    dense: list[int] = []
    if family in ("qwen2_moe", "qwen3_moe"):  # Qwen2MoeDecoderLayer: routed unless listed or off the step
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        only = {int(i) for i in getattr(config, "mlp_only_layers", None) or ()}
        dense = sorted(i for i in range(num_layers) if i in only or (i + 1) % step)
        if len(dense) == num_layers:
            raise UnsupportedModelError(f"{family} config without a routed layer (every MLP layer is dense)")
    if family == "qwen3_5_moe_text":
        sliding_window = None  # Qwen3_5MoeTextModel builds one causal mask; its layer_types are kept
    elif family in ("mixtral", "qwen3_moe") and sliding_window:
        layer_types = (SLIDING_ATTENTION,) * num_layers
    elif family == "qwen2_moe" and sliding_window and SLIDING_ATTENTION in layer_types:
        pass  # Qwen2MoeAttention slides on the config's sliding_attention layers (max_window_layers)
    else:  # no window (OlmoeModel builds one full causal mask whatever its config says)
        layer_types, sliding_window = (FULL_ATTENTION,) * num_layers, None
    # OlmoeAttention's clamp (the other families' attention has none, whatever their config says)
    clip = getattr(config, "clip_qkv", None) if family == "olmoe" else None
    shared = 0
    if family in ("qwen2_moe", "qwen3_5_moe_text"):
        shared = int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
    if family == "qwen3_5_moe_text" and shared <= 0:
        raise UnsupportedModelError(f"qwen3_5_moe without a shared expert (shared_expert_intermediate_size={shared})")
    fields = dict(
        num_experts=experts,
        num_experts_per_tok=int(config.num_experts_per_tok),
        # Mixtral: intermediate_size is each expert's width; the others have moe_intermediate_size
        # (OLMoE: intermediate_size too).
        moe_intermediate_size=int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size),
        norm_topk_prob=family in ("mixtral", "qwen3_5_moe_text") or bool(getattr(config, "norm_topk_prob", False)),
        moe_weights_fp32=family == "mixtral",  # MixtralTopKRouter keeps its top-k weights in float32
        intermediate_size=shared,
        clip_qkv=None if clip is None else float(clip),
        dense_mlp_layers=tuple(dense),
        dense_intermediate_size=int(config.intermediate_size) if dense else 0,
    )
    return fields, layer_types, sliding_window


def from_hf_dir(hf_dir: str) -> ModelSpec:
    """ModelSpec of a local HF checkpoint directory (config.json read via AutoConfig, no remote code)."""
    from transformers import AutoConfig

    read_raw_config(hf_dir)
    return from_hf_config(AutoConfig.from_pretrained(hf_dir, trust_remote_code=False))
