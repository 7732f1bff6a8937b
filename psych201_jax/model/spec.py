"""Architecture description of a supported decoder checkpoint, read from its HF ``config.json``.

``ModelSpec`` is the single source of truth for the Flax model, the converter and the RoPE tables. It is
built from transformers' ``AutoConfig`` (never with remote code), so the RoPE parameters are the ones
transformers itself standardised (``rope_parameters``, possibly nested per ``layer_types`` entry; legacy
``rope_scaling``/``rope_theta`` keys are folded in by transformers on load). It is frozen and hashable,
so it can live as a static attribute of an NNX module, and round-trips through JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from psych201_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "olmo3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


class UnsupportedModelError(UserError, ValueError):
    """The checkpoint's architecture is outside what this package implements."""


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """RoPE frequencies of one layer type (fields as in transformers' ``rope_parameters``)."""

    rope_type: str = "default"
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


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the Flax decoder needs to reproduce one HF checkpoint's forward pass.

    ``norm_placement``: "pre" (Llama/Qwen: input and post-attention norms feed the sublayers) or "post"
    (OLMo 3: norms applied to sublayer outputs before the residual add, no input norm).
    ``qk_norm``: "none", "head" (Qwen3: RMSNorm over head_dim per head) or "full" (OLMo 3: RMSNorm over the
    whole projection width). ``norm_weight_fp32``: multiply the norm weight in fp32 before the cast (OLMo)
    instead of casting first (Llama/Qwen). ``rope_fp32``: apply RoPE in fp32 and cast after (OLMo 3 keeps
    cos/sin in fp32; Llama/Qwen cast cos/sin to the activation dtype first).
    ``rope`` maps each layer type to its RoPE parameters; ``sliding_window`` applies to
    "sliding_attention" layers only (None: those layers attend fully).
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
    qk_norm: str
    norm_placement: str
    norm_weight_fp32: bool
    rope_fp32: bool
    layer_types: tuple[str, ...]
    sliding_window: int | None
    rope: tuple[tuple[str, RopeSpec], ...]
    max_position_embeddings: int

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if len(self.layer_types) != self.num_layers:
            raise UnsupportedModelError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        unknown = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
        if unknown:
            raise UnsupportedModelError(f"unsupported layer_types {sorted(unknown)}")
        missing = set(self.layer_types) - set(dict(self.rope))
        if missing:
            raise UnsupportedModelError(f"no RoPE parameters for layer types {sorted(missing)}")

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


def _rope_spec(params: dict, top_level: dict) -> RopeSpec:
    """One layer type's ``rope_parameters`` dict -> RopeSpec, rejecting RoPE variants we do not implement."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported rope_type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
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
    """ModelSpec from a transformers config object (as returned by ``AutoConfig.from_pretrained``)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _unsupported_type_error(model_type)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    num_layers = config.num_hidden_layers
    layer_types = tuple(getattr(config, "layer_types", None) or (FULL_ATTENTION,) * num_layers)

    rope_parameters = dict(config.rope_parameters)
    if set(rope_parameters) <= {FULL_ATTENTION, SLIDING_ATTENTION}:  # nested per layer type
        rope = tuple(
            (t, _rope_spec(rope_parameters[t], rope_parameters))
            for t in sorted(rope_parameters)
            if rope_parameters[t] is not None
        )
    else:
        shared = _rope_spec(rope_parameters, rope_parameters)
        rope = tuple((t, shared) for t in sorted(set(layer_types)))

    attention_bias = bool(getattr(config, "attention_bias", False))
    family: dict[str, Any] = dict(
        llama=dict(
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm="none",
            norm_placement="pre",
            norm_weight_fp32=False,
            rope_fp32=False,
        ),
        qwen2=dict(
            qkv_bias=True,
            o_bias=False,
            mlp_bias=False,
            qk_norm="none",
            norm_placement="pre",
            norm_weight_fp32=False,
            rope_fp32=False,
        ),
        qwen3=dict(
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=False,
            qk_norm="head",
            norm_placement="pre",
            norm_weight_fp32=False,
            rope_fp32=False,
        ),
        olmo3=dict(
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=False,
            qk_norm="full",
            norm_placement="post",
            norm_weight_fp32=True,
            rope_fp32=True,
        ),
    )[model_type]
    return ModelSpec(
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=config.num_key_value_heads or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(config.rms_norm_eps),
        tie_word_embeddings=bool(config.tie_word_embeddings),
        layer_types=layer_types,
        sliding_window=getattr(config, "sliding_window", None),
        rope=rope,
        max_position_embeddings=config.max_position_embeddings,
        **family,
    )


def from_hf_dir(hf_dir: str) -> ModelSpec:
    """ModelSpec of a local HF checkpoint directory (config.json read via AutoConfig, no remote code)."""
    from transformers import AutoConfig

    read_raw_config(hf_dir)
    return from_hf_config(AutoConfig.from_pretrained(hf_dir, trust_remote_code=False))
