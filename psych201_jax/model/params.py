"""The stacked layer parameters of a ``ModelSpec``: which layers hold each one, their logical axes and shapes.

Every layer parameter is stacked over layers ([L, ...]); a parameter that only one kind of layer has (Qwen3.5:
the Gated DeltaNet layers' ``lin_*``, the softmax-attention layers' projections) is stacked over the layers
that have it (``param_layers``), so its L is the number of such layers; likewise a mixture of experts' routed
parameters and its dense layers' MLP (``ModelSpec.dense_mlp_layers``: ``d_gate``, ``d_up``, ``d_down``).
Projections are [in, out] with heads split out, e.g. wq [L, D, Hq, hd]. The decoder, the converter and the
sampler read these tables.
"""

from __future__ import annotations

from psych201_jax.model.axes import (
    CONV,
    DENSE_MLP,
    EMBED,
    EXPERT,
    EXPERT_MLP,
    HEAD_DIM,
    KV_HEADS,
    LAYERS,
    LIN_K_DIM,
    LIN_K_HEADS,
    LIN_V_DIM,
    LIN_V_HEADS,
    MLP,
    NORM,
    Q_HEADS,
    QUERY_GATE,
    ROUTER,
    VOCAB,
)
from psych201_jax.model.spec import LINEAR_ATTENTION, LayerKind, ModelSpec, NormPlacement, QkNorm

BIASES = ("bq", "bk", "bv", "bo", "b_gate", "b_up", "b_down", "lin_dt_bias")
# Parameters only softmax-attention layers have, and only Gated DeltaNet layers have (the rest: every layer).
ATTENTION_PARAMS = ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "q_norm", "k_norm")
LINEAR_PARAMS = (
    "lin_wq",
    "lin_wk",
    "lin_wv",
    "lin_conv_q",
    "lin_conv_k",
    "lin_conv_v",
    "lin_wz",
    "lin_wb",
    "lin_wa",
    "lin_dt_bias",
    "lin_a_log",
    "lin_norm",
    "lin_wo",
)
# A mixture of experts' routed MLP (with its shared expert, w_*), and the MLP of its dense layers.
ROUTED_PARAMS = ("router", "e_gate", "e_up", "e_down", "shared_gate", "w_gate", "w_up", "w_down")
DENSE_MLP_PARAMS = ("d_gate", "d_up", "d_down")


# Prefix of the names of per-layer inputs stacked over the softmax-attention layers (``with_attention``).
ATTENTION_INPUT = "attend_"


def param_in_layer(name: str, kind: LayerKind) -> bool:
    """Whether a layer of ``kind`` has the stacked parameter ``name``."""
    if name in LINEAR_PARAMS:
        return kind.attention == LINEAR_ATTENTION
    if name in ATTENTION_PARAMS or name.startswith(ATTENTION_INPUT):
        return kind.attention != LINEAR_ATTENTION
    if name in ROUTED_PARAMS:
        return not kind.dense_mlp
    if name in DENSE_MLP_PARAMS:
        return kind.dense_mlp
    return True


def param_layers(spec: ModelSpec, name: str) -> tuple[int, ...]:
    """Indices (into spec.layer_types) of the layers whose ``name`` the stack holds, in stack order."""
    return tuple(i for i, kind in enumerate(spec.layer_kinds) if param_in_layer(name, kind))


def layer_param_axes(spec: ModelSpec) -> dict[str, tuple[str, ...]]:
    """Logical axes of every stacked layer parameter this family has (name -> axes, first axis LAYERS)."""
    axes = {
        "wq": (LAYERS, EMBED, Q_HEADS, QUERY_GATE if spec.attn_output_gate else HEAD_DIM),
        "wk": (LAYERS, EMBED, KV_HEADS, HEAD_DIM),
        "wv": (LAYERS, EMBED, KV_HEADS, HEAD_DIM),
        "wo": (LAYERS, Q_HEADS, HEAD_DIM, EMBED),
        "w_gate": (LAYERS, EMBED, MLP),
        "w_up": (LAYERS, EMBED, MLP),
        "w_down": (LAYERS, MLP, EMBED),
    }
    if spec.num_experts:  # routed MLPs; w_* are then the shared expert's (routed layers), d_* the dense layers' MLP
        axes.update(
            router=(LAYERS, EMBED, ROUTER),
            e_gate=(LAYERS, EXPERT, EMBED, EXPERT_MLP),
            e_up=(LAYERS, EXPERT, EMBED, EXPERT_MLP),
            e_down=(LAYERS, EXPERT, EXPERT_MLP, EMBED),
        )
        if spec.intermediate_size:
            axes.update(shared_gate=(LAYERS, EMBED))
        else:
            for name in ("w_gate", "w_up", "w_down"):
                del axes[name]
        if spec.dense_mlp_layers:
            axes.update(
                d_gate=(LAYERS, EMBED, DENSE_MLP), d_up=(LAYERS, EMBED, DENSE_MLP), d_down=(LAYERS, DENSE_MLP, EMBED)
            )
    if spec.norm_placement != NormPlacement.POST:
        axes.update(attn_in_norm=(LAYERS, NORM), mlp_in_norm=(LAYERS, NORM))
    if spec.norm_placement != NormPlacement.PRE:
        axes.update(attn_out_norm=(LAYERS, NORM), mlp_out_norm=(LAYERS, NORM))
    if spec.qkv_bias:
        axes.update(bq=(LAYERS, Q_HEADS, HEAD_DIM), bk=(LAYERS, KV_HEADS, HEAD_DIM), bv=(LAYERS, KV_HEADS, HEAD_DIM))
    if spec.o_bias:
        axes.update(bo=(LAYERS, EMBED))
    if spec.mlp_bias:
        axes.update(b_gate=(LAYERS, MLP), b_up=(LAYERS, MLP), b_down=(LAYERS, EMBED))
    if spec.qk_norm == QkNorm.HEAD:
        axes.update(q_norm=(LAYERS, HEAD_DIM), k_norm=(LAYERS, HEAD_DIM))
    elif spec.qk_norm == QkNorm.FULL:
        axes.update(q_norm=(LAYERS, Q_HEADS, HEAD_DIM), k_norm=(LAYERS, KV_HEADS, HEAD_DIM))
    if LINEAR_ATTENTION in spec.layer_types:
        axes.update(
            lin_wq=(LAYERS, EMBED, LIN_K_HEADS, LIN_K_DIM),
            lin_wk=(LAYERS, EMBED, LIN_K_HEADS, LIN_K_DIM),
            lin_wv=(LAYERS, EMBED, LIN_V_HEADS, LIN_V_DIM),
            lin_conv_q=(LAYERS, CONV, LIN_K_HEADS, LIN_K_DIM),
            lin_conv_k=(LAYERS, CONV, LIN_K_HEADS, LIN_K_DIM),
            lin_conv_v=(LAYERS, CONV, LIN_V_HEADS, LIN_V_DIM),
            lin_wz=(LAYERS, EMBED, LIN_V_HEADS, LIN_V_DIM),
            lin_wb=(LAYERS, EMBED, LIN_V_HEADS),
            lin_wa=(LAYERS, EMBED, LIN_V_HEADS),
            lin_dt_bias=(LAYERS, LIN_V_HEADS),
            lin_a_log=(LAYERS, LIN_V_HEADS),
            lin_norm=(LAYERS, LIN_V_DIM),
            lin_wo=(LAYERS, LIN_V_HEADS, LIN_V_DIM, EMBED),
        )
    if not any(t != LINEAR_ATTENTION for t in spec.layer_types):
        axes = {name: a for name, a in axes.items() if name not in ATTENTION_PARAMS}
    return axes


def param_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter, keyed like ``layer_param_axes`` plus embed/lm_head/final_norm."""
    sizes = {
        EMBED: spec.hidden_size,
        Q_HEADS: spec.num_heads,
        KV_HEADS: spec.num_kv_heads,
        HEAD_DIM: spec.head_dim,
        MLP: spec.intermediate_size,
        DENSE_MLP: spec.dense_intermediate_size,
        NORM: spec.hidden_size,
        VOCAB: spec.vocab_size,
        QUERY_GATE: 2 * spec.head_dim,
        LIN_K_HEADS: spec.linear_num_key_heads,
        LIN_V_HEADS: spec.linear_num_value_heads,
        LIN_K_DIM: spec.linear_key_head_dim,
        LIN_V_DIM: spec.linear_value_head_dim,
        CONV: spec.linear_conv_kernel,
        EXPERT: spec.num_experts,
        EXPERT_MLP: spec.moe_intermediate_size,
        ROUTER: spec.num_experts,
    }
    shapes = {
        name: (len(param_layers(spec, name)), *(sizes[a] for a in axes[1:]))
        for name, axes in layer_param_axes(spec).items()
    }
    shapes["embed"] = (spec.embed_rows, spec.hidden_size)
    shapes["final_norm"] = (spec.hidden_size,)
    if not spec.tie_word_embeddings:
        shapes["lm_head"] = (spec.vocab_size, spec.hidden_size)
    return shapes
