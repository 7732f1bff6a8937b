"""Architecture description of a supported decoder checkpoint (``ModelSpec``) and the families it covers.

``ModelSpec`` is the single source of truth for the Flax model, the converter and the RoPE tables; it is built
from an HF config by model/hf_config.py. It is frozen and hashable, so it can live as a static attribute of an
NNX module, and round-trips through JSON.

Vision-language checkpoints (``VL_WRAPPERS``) are described as their language model on text-only input, with
the wrapper recorded; Llama-3.2-Vision's cross-attention layers, skipped by HF without images, are listed in
``skipped_layers`` and our layer stack holds only the self-attention layers.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import NamedTuple

from psych201_jax.errors import UserError

# Vision-language wrappers whose language model we score on text: model_type -> the text family it runs.
# Qwen3.5 ("qwen3_5", "qwen3_5_moe") is a wrapper too: its hub checkpoints are *ForConditionalGeneration.
# Gemma 3 4B/12B/27B ("gemma3") are Gemma3ForConditionalGeneration; 270M and 1B are text-only ("gemma3_text").
VL_WRAPPERS = {
    "qwen2_5_vl": "qwen2",
    "qwen3_vl": "qwen3",
    "mllama": "llama",
    "qwen3_5": "qwen3_5_text",
    "qwen3_5_moe": "qwen3_5_moe_text",
    "gemma3": "gemma3_text",
}
SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "olmo2",
    "olmo3",
    "qwen3_5_text",
    "gemma2",
    "gemma3_text",
    *VL_WRAPPERS,
    "qwen2_moe",
    "qwen3_moe",
    "mixtral",
    "olmoe",
    "qwen3_5_moe_text",
)
GEMMA_FAMILIES = ("gemma2", "gemma3_text")
# Mixture-of-experts families (routed MLP layers, model/moe.py; Qwen2-MoE / Qwen3-MoE may make some dense).
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "qwen3_5_moe_text")
# Qwen3.5's Gated DeltaNet hybrids (dense and mixture of experts): gated attention, (1 + w) norms, an mtp head.
HYBRID_FAMILIES = ("qwen3_5_text", "qwen3_5_moe_text")


class RopeType(enum.StrEnum):
    """RoPE frequency variants (transformers' ``rope_type``) that model/rope.py implements."""

    DEFAULT = "default"
    LINEAR = "linear"
    LLAMA3 = "llama3"
    YARN = "yarn"


class LayerType(enum.StrEnum):
    """Entries of ``layer_types`` (transformers' names)."""

    FULL = "full_attention"
    SLIDING = "sliding_attention"
    LINEAR = "linear_attention"  # Qwen3.5's Gated DeltaNet layers (model/delta_rule.py)


class QkNorm(enum.StrEnum):
    """RMSNorm of queries and keys before RoPE."""

    NONE = "none"
    HEAD = "head"  # Qwen3: over head_dim, per head
    FULL = "full"  # OLMo 2 and 3: over the whole projection width


class NormPlacement(enum.StrEnum):
    """Where a layer's RMSNorms sit."""

    PRE = "pre"  # Llama/Qwen: input and post-attention norms feed the sublayers
    POST = "post"  # OLMo 2 and 3: norms applied to sublayer outputs before the residual add, no input norm
    SANDWICH = "sandwich"  # Gemma 2 and 3: both, a norm before and after each of attention and the MLP


class Activation(enum.StrEnum):
    """The gated MLP's activation: act(gate(x)) * up(x)."""

    SILU = "silu"  # SwiGLU (Llama, Qwen, OLMo, Mistral)
    GELU_TANH = "gelu_pytorch_tanh"  # GeGLU with tanh-approximated GELU (Gemma), computed in float32


SUPPORTED_ROPE_TYPES = tuple(t.value for t in RopeType)
FULL_ATTENTION = LayerType.FULL
SLIDING_ATTENTION = LayerType.SLIDING
LINEAR_ATTENTION = LayerType.LINEAR
ATTENTION_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)


class LayerKind(NamedTuple):
    """What sets a layer's parameters and forward: its attention type, and whether its MLP is a plain dense one
    in a mixture-of-experts model (``ModelSpec.dense_mlp_layers``). Layers scan together by kind."""

    attention: LayerType
    dense_mlp: bool = False


class UnsupportedModelError(UserError, ValueError):
    """The checkpoint's architecture is outside what this package implements."""


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """RoPE frequencies of one layer type (fields as in transformers' ``rope_parameters``)."""

    rope_type: RopeType = RopeType.DEFAULT
    theta: float = 10000.0
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        try:
            object.__setattr__(self, "rope_type", RopeType(self.rope_type))
        except ValueError:
            raise UnsupportedModelError(
                f"unsupported rope_type {self.rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
            ) from None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the Flax decoder needs to reproduce one HF checkpoint's forward pass.

    ``norm_placement``: ``NormPlacement`` (PRE: Llama/Qwen; POST: OLMo 3). ``qk_norm``: ``QkNorm`` (NONE,
    HEAD: Qwen3, FULL: OLMo 3). The mode fields (these two, ``layer_types``, ``RopeSpec.rope_type``) are
    StrEnums: they serialise as their strings, and strings given for them are parsed into the enums.
    ``norm_weight_fp32``: multiply the norm weight in fp32 before the cast (OLMo) instead of casting first
    (Llama/Qwen). ``rope_fp32``: apply RoPE in fp32 and cast after (OLMo 3 keeps
    cos/sin in fp32; Llama/Qwen cast cos/sin to the activation dtype first).
    ``rope`` maps each layer type to its RoPE parameters; ``sliding_window`` applies to
    "sliding_attention" layers only (None: those layers attend fully).
    ``model_type`` is the text family whose decoder this is. Vision-language checkpoints: ``wrapper`` is the
    checkpoint's own model_type (e.g. "qwen2_5_vl"; "" for a plain decoder), ``skipped_layers`` the HF
    decoder-layer indices HF skips without images (Llama-3.2-Vision's cross-attention layers), which are
    not in our stack (our layer i is the i-th HF layer not skipped), and ``embed_vocab_size`` the rows of
    the input embedding when they differ from the output vocabulary (Llama-3.2-Vision: vocab_size + 8).

    Qwen3.5 (``qwen3_5_text``, ``qwen3_5_moe_text``): ``rotary_dim`` rotates only the first dims of each head
    (None: all of head_dim); ``norm_zero_centred`` norms scale by 1 + weight (in float32, then cast: Qwen3.5
    and Gemma);
    ``attn_output_gate`` makes q_proj emit a sigmoid gate per head next to the query; ``linear_*`` describe
    the Gated DeltaNet layers ("linear_attention" in ``layer_types``): key/value heads and widths and the
    causal conv kernel size.

    Gemma 2 and 3 (every default below is the other families' behaviour): ``activation`` of the gated MLP
    (``Activation``); ``embed_scale`` multiplies the embeddings by sqrt(hidden_size), cast to the activation
    dtype first as HF does; ``query_pre_attn_scalar`` sets the attention scale to its -1/2 power (None:
    head_dim**-0.5); ``attn_logit_softcap`` bounds the scaled attention scores by cap * tanh(s / cap) before
    masking (Gemma 2) and ``final_logit_softcap`` the output logits likewise, before any softmax (Gemma 2).

    Mixture of experts (``num_experts`` > 0: Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, Qwen3.5-MoE; model/moe.py):
    the MLP of each layer not in ``dense_mlp_layers`` is routed: a softmax router picks ``num_experts_per_tok``
    of ``num_experts`` gated MLPs of width ``moe_intermediate_size``, weighted by their router probabilities
    (renormalised over the chosen ones with ``norm_topk_prob``; ``moe_weights_fp32``: the weights stay float32
    into the combine, Mixtral's, else they are cast to the activation dtype first). ``intermediate_size`` is
    then the width of the shared expert, a dense gated MLP beside the routed ones scaled by
    sigmoid(x . shared_gate) (Qwen2-MoE, Qwen3.5-MoE; 0: none). ``dense_mlp_layers`` lists the layers whose MLP
    is instead a plain gated MLP of width ``dense_intermediate_size`` (Qwen2-MoE / Qwen3-MoE's
    ``mlp_only_layers`` and ``decoder_sparse_step``).
    ``clip_qkv`` (OLMoE): queries, keys and values clamped to [-clip, clip] after the QK-norm, before RoPE.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: QkNorm
    norm_placement: NormPlacement
    norm_weight_fp32: bool
    rope_fp32: bool
    layer_types: tuple[LayerType, ...]
    sliding_window: int | None
    rope: tuple[tuple[str, RopeSpec], ...]
    max_position_embeddings: int
    wrapper: str = ""
    skipped_layers: tuple[int, ...] = ()
    embed_vocab_size: int | None = None
    rotary_dim: int | None = None
    norm_zero_centred: bool = False
    attn_output_gate: bool = False
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0
    activation: Activation = Activation.SILU
    embed_scale: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_weights_fp32: bool = False
    dense_mlp_layers: tuple[int, ...] = ()
    dense_intermediate_size: int = 0
    clip_qkv: float | None = None

    def __post_init__(self):
        try:
            object.__setattr__(self, "qk_norm", QkNorm(self.qk_norm))
            object.__setattr__(self, "norm_placement", NormPlacement(self.norm_placement))
            object.__setattr__(self, "activation", Activation(self.activation))
        except ValueError as err:
            raise UnsupportedModelError(str(err)) from None
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap", "clip_qkv"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UnsupportedModelError(f"{name} must be positive, got {value}")
        if self.num_experts and not (
            0 < self.num_experts_per_tok <= self.num_experts and self.moe_intermediate_size > 0
        ):
            raise UnsupportedModelError(
                f"mixture of experts needs 0 < num_experts_per_tok ({self.num_experts_per_tok}) <= num_experts "
                f"({self.num_experts}) and a positive moe_intermediate_size ({self.moe_intermediate_size})"
            )
        dense = self.dense_mlp_layers
        if dense and not (
            self.num_experts
            and self.dense_intermediate_size > 0
            and list(dense) == sorted(set(dense))
            and 0 <= dense[0]
            and dense[-1] < self.num_layers
            and len(dense) < self.num_layers
        ):
            raise UnsupportedModelError(
                f"dense MLP layers {list(dense)} need a mixture of experts with at least one routed layer, a "
                f"positive width ({self.dense_intermediate_size}) and distinct sorted layers of {self.num_layers}"
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if len(self.layer_types) != self.num_layers:
            raise UnsupportedModelError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        known = {*ATTENTION_TYPES, LINEAR_ATTENTION} if self.linear_num_value_heads else set(ATTENTION_TYPES)
        unknown = set(self.layer_types) - known
        if unknown:
            raise UnsupportedModelError(f"unsupported layer_types {sorted(unknown)}")
        object.__setattr__(self, "layer_types", tuple(LayerType(t) for t in self.layer_types))
        object.__setattr__(self, "rope", tuple((LayerType(t), r) for t, r in self.rope))
        if self.linear_num_value_heads:
            hk, hv = self.linear_num_key_heads, self.linear_num_value_heads
            if hk <= 0 or hv % hk or min(self.linear_key_head_dim, self.linear_value_head_dim) <= 0:
                raise UnsupportedModelError(
                    f"linear attention needs value heads ({hv}) a multiple of key heads ({hk}) and positive widths"
                )
            if self.linear_conv_kernel < 1:
                raise UnsupportedModelError(f"linear_conv_kernel_dim must be >= 1, got {self.linear_conv_kernel}")
        rotary = self.rotary_dim
        if rotary is not None and (rotary <= 0 or rotary % 2 or rotary > self.head_dim):
            raise UnsupportedModelError(f"rotary dim {rotary} must be even and within head_dim {self.head_dim}")
        missing = set(self.layer_types) - {LINEAR_ATTENTION} - set(dict(self.rope))
        if missing:
            raise UnsupportedModelError(f"no RoPE parameters for layer types {sorted(missing)}")
        skipped = self.skipped_layers
        if list(skipped) != sorted(set(skipped)) or any(not 0 <= i < self.num_layers + len(skipped) for i in skipped):
            raise UnsupportedModelError(
                f"skipped_layers {list(skipped)} must be distinct, sorted and within the "
                f"{self.num_layers + len(skipped)} decoder layers"
            )
        if self.embed_vocab_size is not None:
            if self.embed_vocab_size < self.vocab_size:
                raise UnsupportedModelError(
                    f"embedding rows {self.embed_vocab_size} < vocab_size {self.vocab_size}: the output "
                    "vocabulary would have tokens that cannot be input"
                )
            if self.tie_word_embeddings and self.embed_vocab_size != self.vocab_size:
                raise UnsupportedModelError("tied embeddings need as many embedding rows as vocabulary entries")

    @property
    def embed_rows(self) -> int:
        """Rows of the input embedding table (vocab_size unless the checkpoint has extra input-only rows)."""
        return self.vocab_size if self.embed_vocab_size is None else self.embed_vocab_size

    def hf_layer_indices(self) -> tuple[int, ...]:
        """The HF decoder-layer index of each of our layers (skipped layers left out)."""
        skipped = set(self.skipped_layers)
        return tuple(i for i in range(self.num_layers + len(skipped)) if i not in skipped)

    @property
    def attention_scale(self) -> float | None:
        """The attention scores' scale: query_pre_attn_scalar**-0.5 (Gemma); None: the backends' head_dim**-0.5."""
        return None if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar**-0.5

    @property
    def rope_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones; the rest pass through)."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        """Each layer's (attention type, dense MLP in a mixture of experts): what its parameters and forward are."""
        dense = set(self.dense_mlp_layers)
        return tuple(LayerKind(t, i in dense) for i, t in enumerate(self.layer_types))

    def attention_layer_types(self) -> tuple[LayerType, ...]:
        """The distinct softmax-attention layer types (those with RoPE tables), sorted."""
        return tuple(sorted(set(self.layer_types) - {LINEAR_ATTENTION}))

    def rope_for(self, layer_type: str) -> RopeSpec:
        """RoPE parameters used by layers of ``layer_type``."""
        return dict(self.rope)[layer_type]

    def window_for(self, layer_type: str) -> int | None:
        """Sliding window of layers of ``layer_type`` (None: full causal attention)."""
        return self.sliding_window if layer_type == SLIDING_ATTENTION else None

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["rope"] = {name: dataclasses.asdict(r) for name, r in self.rope}
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        d = json.loads(text)
        d["rope"] = tuple((name, RopeSpec(**r)) for name, r in sorted(d["rope"].items()))
        d["layer_types"] = tuple(d["layer_types"])
        for name in ("skipped_layers", "dense_mlp_layers"):
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)

    def save(self, path: str) -> None:
        with open(path, "w") as fh:
            fh.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> ModelSpec:
        with open(path) as fh:
            return cls.from_json(fh.read())
