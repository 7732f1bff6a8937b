"""The ``spec_check`` of each parity row (psych201_jax/testing/parity.py): what a converted spec of the family
must say, beyond parity itself (norm placement, QK-norm, windows, layer pattern, wrapper, tied head...)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from psych201_jax.model import spec as modelspec
from psych201_jax.model.decoder import layer_groups
from psych201_jax.model.params import param_shapes

if TYPE_CHECKING:
    from psych201_jax.testing.parity import Case

QWEN3_5_PATTERN = (modelspec.LINEAR_ATTENTION,) * 3 + (modelspec.FULL_ATTENTION,)


def qwen3_5(case: Case) -> None:
    """8 layers = two repeats of (3 Gated DeltaNet, 1 gated attention), scanned as one group."""
    spec, wrapped = case.spec, case.row.family == "qwen3_5"
    assert spec.model_type == "qwen3_5_text" and spec.wrapper == ("qwen3_5" if wrapped else "")
    assert spec.layer_types == QWEN3_5_PATTERN * 2
    assert layer_groups(spec.layer_types) == ((0, 2, QWEN3_5_PATTERN),)  # one scan over two repeats
    assert spec.rotary_dim == 8 and spec.head_dim == 32 and spec.norm_zero_centred and spec.attn_output_gate
    assert (spec.linear_num_key_heads, spec.linear_num_value_heads, spec.linear_conv_kernel) == (2, 4, 4)
    assert spec.tie_word_embeddings == wrapped
    shapes = param_shapes(spec)
    assert shapes["lin_wq"][0] == 6 and shapes["wq"][0] == 2 and shapes["w_up"][0] == 8
    assert shapes["wq"][-1] == 2 * spec.head_dim  # query and its output gate
    prov = case.provenance
    assert prov["model_type"] == "qwen3_5_text"
    assert prov["architectures"][0] == ("Qwen3_5ForConditionalGeneration" if wrapped else "Qwen3_5ForCausalLM")


def qwen3_5_moe(case: Case) -> None:
    """Qwen3.5's hybrid layer pattern with every MLP routed: 8 experts, top 2, always renormalised, weights
    cast to the activation dtype, a shared expert of width 48; the checkpoint in the row's expert layout."""
    from psych201_jax.model import hf_weights

    spec, wrapped = case.spec, case.row.family == "qwen3_5_moe"
    assert spec.model_type == "qwen3_5_moe_text" and spec.wrapper == ("qwen3_5_moe" if wrapped else "")
    assert spec.layer_types == QWEN3_5_PATTERN * 2 and layer_groups(spec.layer_types) == ((0, 2, QWEN3_5_PATTERN),)
    assert spec.rotary_dim == 8 and spec.norm_zero_centred and spec.attn_output_gate
    assert (spec.num_experts, spec.num_experts_per_tok, spec.moe_intermediate_size) == (8, 2, 32)
    assert spec.norm_topk_prob and not spec.moe_weights_fp32 and spec.intermediate_size == 48
    shapes = param_shapes(spec)
    assert shapes["e_gate"] == (8, 8, spec.hidden_size, 32) and shapes["router"] == (8, spec.hidden_size, 8)
    assert shapes["w_gate"] == (8, spec.hidden_size, 48) and shapes["shared_gate"] == (8, spec.hidden_size)
    assert shapes["lin_wq"][0] == 6 and shapes["wq"][0] == 2
    names = hf_weights.open_weights(case.hf_dir).names()
    prefix = "model.language_model." if wrapped else "model."
    stacked = case.row.kwargs.get("layout") == "stacked"
    assert (f"{prefix}layers.0.mlp.experts.gate_up_proj" in names) == stacked
    assert (f"{prefix}layers.0.mlp.experts.7.down_proj.weight" in names) != stacked
    prov = case.provenance
    assert prov["model_type"] == "qwen3_5_moe_text"
    assert prov["architectures"][0] == ("Qwen3_5MoeForConditionalGeneration" if wrapped else "Qwen3_5MoeForCausalLM")


def moe_dense_layers(case: Case) -> None:
    """Qwen2-MoE with layers 0 and 2 dense by config: their plain MLP (width intermediate_size, 128) beside the
    routed layers' experts and shared expert (48); layers 0 and 2 slide over 64 tokens; the four layers scan
    as one (sliding dense, full routed) pattern."""
    spec = case.spec
    assert spec.model_type == "qwen2_moe" and spec.dense_mlp_layers == (0, 2) and spec.dense_intermediate_size == 128
    sliding, full = modelspec.SLIDING_ATTENTION, modelspec.FULL_ATTENTION
    assert spec.layer_types == (sliding, full) * 2 and spec.sliding_window == 64
    dense, routed = modelspec.LayerKind(sliding, True), modelspec.LayerKind(full)
    assert layer_groups(spec.layer_kinds) == ((0, 2, (dense, routed)),)
    shapes = param_shapes(spec)
    assert shapes["d_gate"] == (2, spec.hidden_size, 128) and shapes["w_gate"] == (2, spec.hidden_size, 48)
    assert shapes["e_gate"] == (2, 8, spec.hidden_size, 32) and shapes["router"] == (2, spec.hidden_size, 8)
    assert shapes["wq"][0] == 4


def vl(case: Case) -> None:
    """The spec describes the wrapper's language model (Llama-3.2-Vision: cross-attention layers skipped)."""
    spec, family = case.spec, case.row.family
    assert spec.wrapper == family
    assert spec.model_type == modelspec.VL_WRAPPERS[family]
    if family == "mllama":
        assert spec.skipped_layers == (1, 3) and spec.num_layers == 3 and spec.hf_layer_indices() == (0, 2, 4)
        assert spec.embed_rows == spec.vocab_size + 8 and case.model32.embed[...].shape[0] == spec.vocab_size + 8
        assert case.model32.lm_head is not None and case.model32.lm_head[...].shape[0] == spec.vocab_size
    else:
        assert spec.skipped_layers == () and spec.embed_rows == spec.vocab_size
    assert spec.tie_word_embeddings == (family == "qwen3_vl")
    prov = case.provenance
    assert prov["wrapper"] == family
    assert prov["model_type"] == spec.model_type and prov["architectures"][0].endswith("ForConditionalGeneration")


def mistral(case: Case) -> None:
    """Every layer slides when the config has a window (MistralModel ignores layer_types), none otherwise;
    head_dim is the config's, not hidden / heads (Mistral-Nemo)."""
    spec, kwargs = case.spec, case.row.kwargs
    window = kwargs.get("sliding_window", 64)
    assert spec.model_type == "mistral" and spec.norm_placement == modelspec.NormPlacement.PRE
    assert spec.qk_norm == modelspec.QkNorm.NONE and not (spec.qkv_bias or spec.o_bias or spec.mlp_bias)
    layer = modelspec.SLIDING_ATTENTION if window else modelspec.FULL_ATTENTION
    assert spec.layer_types == (layer,) * spec.num_layers and spec.sliding_window == window
    assert spec.head_dim == kwargs.get("head_dim", spec.hidden_size // spec.num_heads)
    assert param_shapes(spec)["wq"][-2:] == (spec.num_heads, spec.head_dim)


def olmo2(case: Case) -> None:
    """OLMo 3's layer (post-norm, QK-norm over the whole projection, fp32 norm weight and RoPE), no window."""
    spec = case.spec
    assert spec.model_type == "olmo2" and spec.norm_placement == modelspec.NormPlacement.POST
    assert spec.qk_norm == modelspec.QkNorm.FULL and spec.norm_weight_fp32 and spec.rope_fp32
    assert spec.layer_types == (modelspec.FULL_ATTENTION,) * spec.num_layers and spec.sliding_window is None
    assert spec.qkv_bias == spec.o_bias == bool(case.row.kwargs.get("attention_bias", False))
    shapes = param_shapes(spec)
    assert "attn_out_norm" in shapes and "mlp_out_norm" in shapes and "attn_in_norm" not in shapes
    assert shapes["q_norm"][1:] == (spec.num_heads, spec.head_dim)  # one norm over all heads' width


def gemma(case: Case) -> None:
    """Gemma: sandwich (1 + w) norms, GeGLU, scaled embeddings, query_pre_attn_scalar, tied embeddings; Gemma
    2 alternates window and full layers and caps attention and final logits; Gemma 3 has five window layers
    per full one, a per-head QK-norm, RoPE per layer type and no caps (its wrapper: no final cap either)."""
    spec, family = case.spec, case.row.family
    gemma2 = family == "gemma2"
    assert spec.model_type == ("gemma2" if gemma2 else "gemma3_text")
    assert spec.wrapper == ("gemma3" if family == "gemma3" else "")
    assert spec.norm_placement == modelspec.NormPlacement.SANDWICH and spec.norm_zero_centred
    assert spec.activation == modelspec.Activation.GELU_TANH and spec.embed_scale and spec.tie_word_embeddings
    assert spec.query_pre_attn_scalar == 24 and spec.attention_scale == 24**-0.5
    shapes = param_shapes(spec)
    assert {"attn_in_norm", "attn_out_norm", "mlp_in_norm", "mlp_out_norm"} <= set(shapes) and "lm_head" not in shapes
    sliding, full = modelspec.SLIDING_ATTENTION, modelspec.FULL_ATTENTION
    if gemma2:
        assert spec.layer_types == (sliding, full) * 2 and spec.qk_norm == modelspec.QkNorm.NONE
        assert (spec.attn_logit_softcap, spec.final_logit_softcap) == (5.0, 3.0)
        assert layer_groups(spec.layer_types) == ((0, 2, (sliding, full)),)
    else:
        assert spec.layer_types == (sliding,) * 5 + (full,) + (sliding,) * 2 and spec.qk_norm == modelspec.QkNorm.HEAD
        assert spec.attn_logit_softcap is None and spec.final_logit_softcap is None
        local, glob = spec.rope_for(sliding), spec.rope_for(full)
        assert (local.rope_type, local.theta) == (modelspec.RopeType.DEFAULT, 10_000.0)
        assert (glob.rope_type, glob.theta, glob.factor) == (modelspec.RopeType.LINEAR, 1_000_000.0, 8.0)
    assert (
        case.provenance["architectures"][0]
        == {
            "gemma2": "Gemma2ForCausalLM",
            "gemma3_text": "Gemma3ForCausalLM",
            "gemma3": "Gemma3ForConditionalGeneration",
        }[family]
    )


def moe(case: Case) -> None:
    """Every layer routed over 8 experts, top 2, with the family's renormalisation, weight dtype, shared expert
    and attention; the checkpoint in the row's layout (stacked experts or one tensor per expert)."""
    from psych201_jax.model import hf_weights

    spec, family = case.spec, case.row.family
    assert spec.model_type == family and (spec.num_experts, spec.num_experts_per_tok) == (8, 2)
    assert spec.norm_topk_prob == (family in ("qwen3_moe", "mixtral")) and spec.moe_weights_fp32 == (
        family == "mixtral"
    )
    assert spec.moe_intermediate_size == 32 and spec.intermediate_size == (48 if family == "qwen2_moe" else 0)
    assert spec.qk_norm == {"qwen3_moe": modelspec.QkNorm.HEAD, "olmoe": modelspec.QkNorm.FULL}.get(
        family, modelspec.QkNorm.NONE
    )
    assert spec.qkv_bias == (family == "qwen2_moe") and spec.layer_types == (modelspec.FULL_ATTENTION,) * 2
    shapes = param_shapes(spec)
    assert shapes["e_gate"] == (2, 8, spec.hidden_size, 32) and shapes["e_down"] == (2, 8, 32, spec.hidden_size)
    assert shapes["router"] == (2, spec.hidden_size, 8)
    assert ("shared_gate" in shapes) == ("w_gate" in shapes) == (family == "qwen2_moe")
    names = hf_weights.open_weights(case.hf_dir).names()
    module = "block_sparse_moe." if family == "mixtral" else "mlp."
    stacked = case.row.kwargs.get("layout") == "stacked"
    assert ("model.layers.0.mlp.experts.gate_up_proj" in names) == stacked
    assert (
        f"model.layers.0.{module}experts.7.{'w2' if family == 'mixtral' else 'down_proj'}.weight" in names
    ) != stacked
