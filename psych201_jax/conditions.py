"""The one definition of a scoring condition and of what a model is, shared by job, sweep and analysis.

A ``Condition`` is everything about *how* a run was scored that the analysis compares runs by; a
``ModelInfo`` is what the analysis needs to know about the model (never parsed from paths). Both are
frozen, keyword-only dataclasses of enum values, built from config or manifest mappings with
``from_mapping``, which names the field and the allowed values on a bad value.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any, ClassVar

__all__ = [
    "Condition",
    "DType",
    "ModelInfo",
    "ModelKind",
    "OptionsMode",
    "Persona",
    "Protocol",
    "Simulation",
    "Stage",
    "Template",
]


class Protocol(enum.StrEnum):
    """How transcripts become token spans (see ``psych201_jax.data.spans``)."""

    REFERENCE = "reference"
    ROBUST = "robust"


class Template(enum.StrEnum):
    NONE = "none"
    CHAT = "chat"


class Persona(enum.StrEnum):
    NONE = "none"
    MATCHED = "matched"
    SHUFFLED = "shuffled"  # another participant's metadata from the same study (a seeded derangement)


class OptionsMode(enum.StrEnum):
    """Whether the head also takes the argmax over each study's response options."""

    NONE = "none"
    STUDY = "study"


class DType(enum.StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class ModelKind(enum.StrEnum):
    BASE = "base"
    INSTRUCT = "Instruction-tuned"
    REASONING = "Reasoning"
    VISION = "Vision"
    CODE = "Code"
    MATH = "Math"
    UNKNOWN = "unknown"


class Stage(enum.StrEnum):
    """The post-training step that produced a checkpoint of a stage chain (``ModelInfo.stage``), in training
    order. A chain's last member is its final release: an RL(VR)-trained final model (OLMo 2/3 Instruct and
    Think, Tülu 3) is ``rl``; ``final`` is a final release whose last step is none of these or unpublished.
    UNKNOWN (""): not a member of a stage chain."""

    UNKNOWN = ""
    BASE = "base"
    SFT = "sft"
    DPO = "dpo"
    RL = "rl"
    FINAL = "final"


STAGE_ORDER: tuple[Stage, ...] = (Stage.BASE, Stage.SFT, Stage.DPO, Stage.RL, Stage.FINAL)


# 17 log-spaced temperatures from 0.25 to 4 (2 ** (k / 4), k = -8 .. 8): 0.5, 1 and 2 are on the grid.
DEFAULT_TEMPERATURES = tuple(2.0 ** (k / 4) for k in range(-8, 9))


def temperature_grid(value: Any) -> tuple[float, ...]:
    """The temperature grid of a config value: "default" (``DEFAULT_TEMPERATURES``), "none" / "" (no
    grid), a comma list or a sequence of positive numbers."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "default":
            return DEFAULT_TEMPERATURES
        if text in ("none", ""):
            return ()
        items: Any = text.split(",")
    else:
        items = value
    try:
        grid = tuple(float(t) for t in items)
    except (TypeError, ValueError):
        raise ConditionError(f"temperatures={value!r}: expected default, none or a comma list of numbers") from None
    if any(not t > 0 for t in grid):
        raise ConditionError(f"temperatures={value!r}: temperatures must be positive")
    return grid


class ConditionError(ValueError):
    """A condition or model-info value is not one of the allowed ones."""


def parse_enum(cls: type[enum.StrEnum], value: Any, field: str) -> Any:
    """``cls(value)``, or a ConditionError naming ``field`` and the allowed values."""
    try:
        return cls(str(value))
    except ValueError:
        raise ConditionError(f"{field}={value!r} is not one of {tuple(m.value for m in cls)}") from None


def _as_bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false", "1", "0"):
        return str(value).lower() in ("true", "1")
    raise ConditionError(f"{field}={value!r} is not a boolean")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Condition:
    """How a run was scored.

    ``options`` and ``temperatures`` change only the head (extra outputs), never the NLLs;
    ``nll_condition`` drops them, and the analysis compares runs by that.
    """

    protocol: Protocol = Protocol.REFERENCE
    template: Template = Template.NONE
    persona: Persona = Persona.NONE
    persona_subset: bool = False  # a no-persona run restricted to the participants with metadata
    options: OptionsMode = OptionsMode.NONE
    dtype: DType = DType.FLOAT32
    data: str = ""
    temperatures: tuple[float, ...] = ()  # the head's temperature grid (calibration statistics)

    # The fields a sweep sets per condition (data and dtype come from the sweep and its overrides).
    SWEEP_FIELDS: ClassVar[tuple[str, ...]] = (
        "protocol",
        "template",
        "persona",
        "persona_subset",
        "options",
        "temperatures",
    )
    # The fields the analysis tables report (options: see nll_condition).
    ANALYSIS_FIELDS: ClassVar[tuple[str, ...]] = ("protocol", "template", "persona", "dtype", "data", "persona_subset")

    def __post_init__(self):
        if self.persona_subset and self.persona != Persona.NONE:
            raise ConditionError("persona_subset restricts the no-persona run; use it with persona=none")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> Condition:
        """From a job config, manifest config or sweep condition (absent fields take their defaults)."""
        return cls(
            protocol=parse_enum(Protocol, m.get("protocol", "reference"), "protocol"),
            template=parse_enum(Template, m.get("template", "none"), "template"),
            persona=parse_enum(Persona, m.get("persona", "none"), "persona"),
            persona_subset=_as_bool(m.get("persona_subset", False), "persona_subset"),
            options=parse_enum(OptionsMode, m.get("options", "none"), "options"),
            dtype=parse_enum(DType, m.get("dtype", "float32") or "float32", "dtype"),
            data=str(m.get("data", "")),
            temperatures=temperature_grid(m.get("temperatures", "none")),
        )

    def nll_condition(self) -> Condition:
        """The condition without head-only fields: runs equal here have equal NLLs."""
        return dataclasses.replace(self, options=OptionsMode.NONE, temperatures=())

    def with_persona(self, persona: Persona | str) -> Condition:
        return dataclasses.replace(self, persona=Persona(persona))

    def with_template(self, template: Template | str) -> Condition:
        return dataclasses.replace(self, template=Template(template))

    def values(self, fields: tuple[str, ...]) -> dict[str, Any]:
        """Plain (str / bool) values of ``fields``, e.g. for table columns or command-line flags."""
        return {f: (v.value if isinstance(v := getattr(self, f), enum.Enum) else v) for f in fields}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What a model is, for pairing and grouping in the analysis (set by sweep configs).

    base_hf_id: the base model a post-trained model is paired with ("" for a base model).
    stage / chain: the post-training step that produced this checkpoint and the name of the stage chain it
    belongs to (``analysis.pairs.find_chains``); unset ("") outside a chain. Neither is part of a results
    fingerprint (``runs.manifest``: the model info is provenance), so adding them never stops a resume.
    """

    hf_id: str
    family: str = ""
    generation: str = ""
    size_b: float = math.nan
    kind: ModelKind = ModelKind.UNKNOWN
    base_hf_id: str = ""
    stage: Stage = Stage.UNKNOWN
    chain: str = ""

    FIELDS: ClassVar[tuple[str, ...]] = (
        "hf_id",
        "family",
        "generation",
        "size_b",
        "kind",
        "base_hf_id",
        "stage",
        "chain",
    )

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any], *, default_hf_id: str = "unknown") -> ModelInfo:
        size = m.get("size_b")
        return cls(
            hf_id=str(m.get("hf_id") or default_hf_id),
            family=str(m.get("family") or ""),
            generation=str(m.get("generation") or ""),
            size_b=float(size) if isinstance(size, (int, float)) and not isinstance(size, bool) else math.nan,
            kind=parse_enum(ModelKind, m.get("kind") or "unknown", "model_info.kind"),
            base_hf_id=str(m.get("base_hf_id") or ""),
            stage=parse_enum(Stage, m.get("stage") or "", "model_info.stage"),
            chain=str(m.get("chain") or ""),
        )

    def as_dict(self) -> dict[str, Any]:
        return {f: (v.value if isinstance(v := getattr(self, f), enum.Enum) else v) for f in self.FIELDS}


CALIBRATED = "calibrated"


def _number(value: Any, field: str, kind: type) -> Any:
    """``value`` as int or float (a bool is neither), or a ConditionError naming ``field``."""
    if not isinstance(value, bool):
        try:
            number = kind(str(value).strip()) if isinstance(value, str) else kind(value)
            if kind is float or float(number) == float(value):
                if math.isfinite(number):
                    return number
        except (TypeError, ValueError):
            pass
    raise ConditionError(f"{field}={value!r} is not a {'number' if kind is float else 'whole number'}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Simulation:
    """How responses are sampled (a simulation run): ``samples`` k per response slot, drawn at
    ``temperature`` (0: greedy; ``calibrated``: each participant at the temperature the calibration control
    fitted on the other half of the ``calibration`` scoring run's participants), at most ``max_new_tokens``
    each, with optional top-k (0: off) and top-p (1: off)."""

    samples: int = 8
    temperature: float | str = 1.0
    max_new_tokens: int = 32
    top_k: int = 0
    top_p: float = 1.0
    calibration: str = ""

    FIELDS: ClassVar[tuple[str, ...]] = ("samples", "temperature", "max_new_tokens", "top_k", "top_p", "calibration")

    def __post_init__(self):
        if self.samples < 1 or self.max_new_tokens < 1 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConditionError(f"need samples >= 1, max_new_tokens >= 1, top_k >= 0 and 0 < top_p <= 1: {self}")
        if self.calibrated != bool(self.calibration):
            raise ConditionError(
                "temperature=calibrated needs calibration=<a scoring run of the same model with a temperature grid>, "
                "and calibration is used only with temperature=calibrated"
            )
        if not self.calibrated and (not isinstance(self.temperature, float) or self.temperature < 0):
            raise ConditionError(f"temperature={self.temperature!r}: expected a number >= 0 or {CALIBRATED!r}")

    @property
    def calibrated(self) -> bool:
        return self.temperature == CALIBRATED

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> Simulation:
        """From a job config or sweep condition (absent fields take their defaults)."""
        base = cls()
        t = m.get("temperature", base.temperature)
        return cls(
            samples=_number(m.get("samples", base.samples), "samples", int),
            temperature=CALIBRATED if str(t).strip() == CALIBRATED else _number(t, "temperature", float),
            max_new_tokens=_number(m.get("max_new_tokens", base.max_new_tokens), "max_new_tokens", int),
            top_k=_number(m.get("top_k", base.top_k), "top_k", int),
            top_p=_number(m.get("top_p", base.top_p), "top_p", float),
            calibration=str(m.get("calibration", "") or ""),
        )

    def as_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.FIELDS}
