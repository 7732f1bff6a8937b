"""Architecture description of a supported decoder checkpoint, read from its HF ``config.json``.

``ModelSpec`` is the single source of truth for the Flax model, the converter and the RoPE tables. It is
built from transformers' ``AutoConfig`` (never with remote code), so the RoPE parameters are the ones
transformers itself standardised (``rope_parameters``, possibly nested per ``layer_types`` entry; legacy
``rope_scaling``/``rope_theta`` keys are folded in by transformers on load). It is frozen and hashable,
so it can live as a static attribute of an NNX module, and round-trips through JSON.

Vision-language checkpoints (``VL_WRAPPERS``: Qwen2.5-VL, Qwen3-VL, Llama-3.2-Vision, Gemma 3) are read as their
language model on text-only input: the decoder fields come from the nested ``text_config`` and the spec
records the wrapper. Their M-RoPE reduces to 1-D RoPE when all position streams are equal (text only;
tests/test_parity.py checks it against HF), Qwen3-VL's deepstack adds nothing without images, and
Llama-3.2-Vision's cross-attention layers are skipped by HF without images, so the spec lists them in
``skipped_layers`` and our layer stack holds only the self-attention layers.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from typing import Any

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
# Mixture-of-experts families (every MLP layer a routed one; model/moe.py).
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

    Mixture of experts (``num_experts`` > 0: Qwen2-MoE, Qwen3-MoE, Mixtral, OLMoE, Qwen3.5-MoE; model/moe.py): every
    layer's MLP is routed: a softmax router picks ``num_experts_per_tok`` of ``num_experts`` gated MLPs of width
    ``moe_intermediate_size``, weighted by their router probabilities (renormalised over the chosen ones
    with ``norm_topk_prob``; ``moe_weights_fp32``: the weights stay float32 into the combine, Mixtral's,
    else they are cast to the activation dtype first). ``intermediate_size`` is then the width of the
    shared expert, a dense gated MLP beside the routed ones scaled by sigmoid(x . shared_gate) (Qwen2-MoE,
    Qwen3.5-MoE; 0: none).
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

    def __post_init__(self):
        try:
            object.__setattr__(self, "qk_norm", QkNorm(self.qk_norm))
            object.__setattr__(self, "norm_placement", NormPlacement(self.norm_placement))
            object.__setattr__(self, "activation", Activation(self.activation))
        except ValueError as err:
            raise UnsupportedModelError(str(err)) from None
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
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
        if "skipped_layers" in d:
            d["skipped_layers"] = tuple(d["skipped_layers"])
        return cls(**d)

    def save(self, path: str) -> None:
        with open(path, "w") as fh:
            fh.write(self.to_json())

    @classmethod
    def load(cls, path: str) -> ModelSpec:
        with open(path) as fh:
            return cls.from_json(fh.read())


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

    Every layer must be sparse: layers made dense by ``mlp_only_layers`` / ``decoder_sparse_step`` (no hub
    model of these families has any) are refused. Windows: Mixtral and Qwen3-MoE slide every layer when
    the config has a window (Qwen3-MoE only with use_sliding_window), as their models build one mask;
    Qwen2-MoE and OLMoE refuse windows. Qwen3.5-MoE keeps its hybrid ``layer_types`` (it has no windows),
    always renormalises its top-k weights (its router takes no ``norm_topk_prob``) and always has a shared
    expert.
    """
    experts = int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0)
    if experts <= 0:
        raise UnsupportedModelError(f"{family} config without experts (num_experts={experts})")
    if family in ("qwen2_moe", "qwen3_moe"):
        step = int(getattr(config, "decoder_sparse_step", 1) or 1)
        only = set(getattr(config, "mlp_only_layers", None) or ())
        dense = sorted(i for i in range(num_layers) if i in only or (i + 1) % step)
        if dense:
            raise UnsupportedModelError(
                f"{family} with dense MLP layers {dense[:8]} (mlp_only_layers / decoder_sparse_step) is not supported"
            )
    if family == "olmoe" and getattr(config, "clip_qkv", None) is not None:
        raise UnsupportedModelError(f"olmoe with clip_qkv={config.clip_qkv} is not supported")
    if family == "qwen3_5_moe_text":
        sliding_window = None  # Qwen3_5MoeTextModel builds one causal mask; its layer_types are kept
    elif family in ("mixtral", "qwen3_moe") and sliding_window:
        layer_types = (SLIDING_ATTENTION,) * num_layers
    else:
        if sliding_window and family != "mixtral":
            raise UnsupportedModelError(f"{family} with a sliding window is not supported")
        layer_types, sliding_window = (FULL_ATTENTION,) * num_layers, None
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
    )
    return fields, layer_types, sliding_window


def from_hf_dir(hf_dir: str) -> ModelSpec:
    """ModelSpec of a local HF checkpoint directory (config.json read via AutoConfig, no remote code)."""
    from transformers import AutoConfig

    read_raw_config(hf_dir)
    return from_hf_config(AutoConfig.from_pretrained(hf_dir, trust_remote_code=False))
