"""The typed scoring job: everything one ``psych201-score`` run needs, built once at the edge.

``ScoreJob`` is a frozen, keyword-only object of enums, numbers and nested typed sections. The command
line builds it from ``--config.*`` flags (``from_mapping`` over ml_collections' dict), a sweep builds it
from a sweep entry (``sweep.Job.score_job``), and nothing below the commands sees a config dict. Its
flat form (``to_dict``) is the job's config as the manifest stores it and as ``--config.*`` flags give it
(``flags``); the field documentation is what ``--help`` lists.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from psych201_jax import defaults, paths
from psych201_jax.conditions import (
    DEFAULT_TEMPERATURES,
    Condition,
    ConditionError,
    ModelInfo,
    Persona,
    Protocol,
    Simulation,
    parse_enum,
)
from psych201_jax.data import spans
from psych201_jax.data.pipeline import SpanPipeline
from psych201_jax.errors import UserError

__all__ = ["ConfigError", "DistributedConfig", "MeshConfig", "Mode", "ScoreJob", "SimulateJob", "documented_keys"]


# A job's model info before the model is known: every field unknown, so the job takes the model's own.
UNKNOWN_MODEL = ModelInfo(hf_id="")


class ConfigError(UserError, ValueError):
    """A configuration value is invalid."""


class Mode(enum.StrEnum):
    """auto: decide from the environment; on: always; off: never."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


def _field(default: Any, doc: str) -> Any:
    """A dataclass field with its one-line documentation (listed by ``--help``)."""
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """The device mesh (``data x fsdp x tensor``); with a mesh, ``tokens_per_batch`` is per row shard."""

    mode: Mode = _field(
        Mode.AUTO, "auto: a mesh when there is more than one device or process; on: always a mesh; off: one device"
    )
    data: int = _field(-1, "data-parallel axis size (-1: the devices left over)")
    fsdp: int = _field(1, "parameter-sharding axis size (-1: the devices left over)")
    tensor: int = _field(1, "tensor-parallel axis size (-1: the devices left over)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """Multi-process wiring (``jax.distributed``); TPU pods, SLURM and Open MPI are detected."""

    mode: Mode = _field(
        Mode.AUTO, "auto: initialise when a coordinator is given or a cluster is detected; on: always; off: never"
    )
    coordinator: str = _field("", "coordinator host:port, for clusters jax cannot detect")
    num_processes: int = _field(0, "number of processes (0: detect)")
    process_id: int = _field(-1, "this process's index (-1: detect)")
    local_device_ids: tuple[int, ...] = _field((), "devices of this process, e.g. 0,1 (empty: all)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreJob:
    """One scoring job: model, data, condition, output and run knobs (defaults: the embedded default)."""

    model: str = _field(
        defaults.DEFAULT_MODEL, "converted checkpoint, or an HF directory (converted once into cache_dir)"
    )
    model_info: ModelInfo = _field(
        UNKNOWN_MODEL,
        "what the model is, for the analysis; an empty hf_id takes the model's own identity (see model_identity)",
    )
    condition: Condition = _field(
        Condition(data=defaults.SAMPLE_DATA, temperatures=DEFAULT_TEMPERATURES),
        "how the responses are scored (the flat keys protocol ... temperatures)",
    )
    out: str = _field("out/score-default", "the results directory")
    seed: int = _field(0, "seed of the shuffled-persona derangement")
    attention: str = _field("auto", "attention backend; auto: the native kernel on a one-device CPU job, else xla")
    max_tokens: int = _field(0, "robust token budget of experiment text; 0: context - persona_reserve")
    max_line_bytes: int = _field(1 << 24, "robust: an input line longer than this is rejected unparsed")
    persona_reserve: int = _field(512, "robust: tokens left free for BOS, chat header and persona prefix")
    max_row_length: int = _field(0, "longest packed row; 0: max(context, tokens_per_batch)")
    min_row_length: int = _field(2048, "shortest packed row")
    tokens_per_batch: int = _field(131072, "tokens per batch (rows per batch = tokens_per_batch // row length)")
    chunk_tokens: int = _field(1 << 22, "participant tokens packed together and committed at a time")
    vocab_chunk: int = _field(0, "vocabulary columns per head step; 0: 1,024 on CPU, 8,192 on GPU/TPU")
    cache_dir: str = _field("~/.cache/psych201_jax/converted", "converted HF models and tokenizer snapshots")
    compile_cache: str = _field("~/.cache/psych201_jax/jax", "JAX's persistent compilation cache; empty: off")
    fresh: bool = _field(False, "overwrite results of a different configuration in out")
    log_every_s: float = _field(10.0, "seconds between progress log lines when not on a terminal")
    mesh: MeshConfig = _field(MeshConfig(), "the device mesh")
    distributed: DistributedConfig = _field(DistributedConfig(), "multi-process wiring")

    def __post_init__(self):
        # One normalisation of the paths a store, lock, cache or tensorstore sees (absolute, no '..'). The data
        # is kept as given: it is part of the fingerprint, so results of a relative data path still resume.
        for name in ("model", "out", "cache_dir", "compile_cache"):
            object.__setattr__(self, name, paths.normalize(getattr(self, name)))

        if self.attention != "auto":  # the default needs no check (and --help no jax)
            from psych201_jax.model import attention

            if self.attention not in attention.available_backends():
                raise ConfigError(f"config.attention={self.attention!r} is not one of {attention.available_backends()}")
        for name in ("tokens_per_batch", "chunk_tokens", "min_row_length", "max_line_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_tokens", "max_row_length", "persona_reserve", "vocab_chunk"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"config.{name} must be 0 (automatic) or a positive integer, got {getattr(self, name)!r}"
                )
        if not self.out:
            raise ConfigError("config.out (the results directory) is required")
        if not self.model:
            raise ConfigError("config.model is required")

    @property
    def data(self) -> str:
        return self.condition.data

    @property
    def robust(self) -> bool:
        return self.condition.protocol == Protocol.ROBUST

    @property
    def persona_seed(self) -> int | None:
        """The seed that determines the numbers (only a shuffled persona draws)."""
        return self.seed if self.condition.persona == Persona.SHUFFLED else None

    def replace(self, **changes: Any) -> ScoreJob:
        return dataclasses.replace(self, **changes)

    def token_budget(self, context: int | None) -> int | None:
        """The robust token budget of experiment text in a ``context``-token model (None: no cut). One budget
        for every condition, so persona and no-persona runs score the same responses; the reserve keeps BOS,
        chat header and persona prefix, which are outside the budget, inside the context."""
        if not self.robust:
            return None
        if self.max_tokens:
            return self.max_tokens
        if context is None:
            raise ConfigError("the model's context length is unknown; set config.max_tokens for the robust budget")
        if self.persona_reserve >= context:
            raise ConfigError(
                f"config.persona_reserve={self.persona_reserve} leaves no robust token budget in a "
                f"{context}-token context"
            )
        return context - self.persona_reserve

    def span_pipeline(self, context: int | None) -> SpanPipeline:
        """The records → token spans pipeline of this job, for a model with a ``context``-token window."""
        c = self.condition
        return SpanPipeline(
            data=c.data,
            rules=spans.SpanRules(c.protocol, c.template, token_budget=self.token_budget(context)),
            persona=c.persona,
            persona_subset=c.persona_subset,
            seed=self.seed,
            max_line_bytes=self.max_line_bytes,
        )

    # -- the flat form: manifests, command lines, ml_collections ------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The flat config: condition fields at the top level, ``model_info``/``mesh``/``distributed`` nested."""
        out: dict[str, Any] = {"model": self.model, "model_info": self.model_info.as_dict()}
        c = self.condition
        out.update(c.values(("data",)))
        out["out"] = self.out
        out.update(c.values(("protocol", "template", "persona", "persona_subset")))
        out["seed"] = self.seed
        out["options"] = c.options.value
        out["temperatures"] = temperatures_text(c.temperatures)
        out["dtype"] = c.dtype.value
        for f in _RUN_FIELDS:
            out[f] = getattr(self, f)
        out["mesh"] = {f.name: _plain(getattr(self.mesh, f.name)) for f in dataclasses.fields(MeshConfig)}
        d = self.distributed
        out["distributed"] = {f.name: _plain(getattr(d, f.name)) for f in dataclasses.fields(DistributedConfig)}
        out["distributed"]["local_device_ids"] = ",".join(str(i) for i in d.local_device_ids)
        return out

    def flags(self) -> list[str]:
        """``--config.<key>=<value>`` for every key: this job as a ``psych201-score`` command line."""
        return [f"--config.{key}={value}" for key, value in _flatten(self.to_dict())]

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> ScoreJob:
        """From a flat config (``--config.*`` values, a manifest's config, a sweep's overrides on defaults);
        absent keys take their defaults. A ConfigError names a bad key or value."""
        base = cls().to_dict()
        unknown = sorted(set(m) - set(base))
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}")
        flat = {**base, **{k: v for k, v in m.items()}}
        try:
            condition = Condition.from_mapping(flat)
            info = ModelInfo.from_mapping(_section(flat, "model_info", base), default_hf_id="")
        except ConditionError as err:
            raise ConfigError(f"config.{err}") from None
        mesh = _section(flat, "mesh", base)
        dist = _section(flat, "distributed", base)
        ids = str(dist.get("local_device_ids") or "").strip()
        try:
            local_ids = tuple(int(x) for x in ids.split(",")) if ids else ()
        except ValueError:
            raise ConfigError(f"config.distributed.local_device_ids={ids!r}: expected a comma list of ints") from None
        return cls(
            model=_typed(flat, "model", str),
            model_info=info,
            condition=condition,
            out=_typed(flat, "out", str),
            seed=_typed(flat, "seed", int),
            attention=_typed(flat, "attention", str),
            **{f: _typed(flat, f, type(base[f])) for f in _RUN_FIELDS if f != "attention"},
            mesh=MeshConfig(
                mode=_enum(Mode, mesh.get("mode"), "mesh.mode"),
                data=_typed(mesh, "data", int, "mesh."),
                fsdp=_typed(mesh, "fsdp", int, "mesh."),
                tensor=_typed(mesh, "tensor", int, "mesh."),
            ),
            distributed=DistributedConfig(
                mode=_enum(Mode, dist.get("mode"), "distributed.mode"),
                coordinator=_typed(dist, "coordinator", str, "distributed."),
                num_processes=_typed(dist, "num_processes", int, "distributed."),
                process_id=_typed(dist, "process_id", int, "distributed."),
                local_device_ids=local_ids,
            ),
        )

    def with_overrides(self, overrides: Mapping[str, Any]) -> ScoreJob:
        """This job with dotted-key overrides (``{"dtype": "bfloat16", "mesh.data": 4}``) applied."""
        flat = self.to_dict()
        for key, value in overrides.items():
            head, _, tail = key.partition(".")
            if tail:
                if not isinstance(flat.get(head), dict) or tail not in flat[head]:
                    raise ConfigError(f"unknown config key {key!r}")
                flat[head] = {**flat[head], tail: value}
            elif isinstance(flat.get(key), dict) and isinstance(value, Mapping):
                flat[key] = {**flat[key], **value}  # a section: its other keys keep this job's values
            else:
                flat[key] = value
        return ScoreJob.from_mapping(flat)

    # -- keys of what jobs can share -------------------------------------------------------------------
    def load_key(self) -> tuple:
        """Jobs with equal keys can share one restored model: model, dtype, attention, cache and mesh."""
        return (self.model, self.condition.dtype, self.attention, self.cache_dir, self.mesh)

    def stream_key(self) -> ScoreJob:
        """Jobs with equal keys feed the model the same tokens and share one forward pass: they differ only
        in their head (options, temperatures) or where and how they report."""
        return dataclasses.replace(
            self,
            condition=self.condition.nll_condition(),
            out="-",
            fresh=False,
            model_info=_NO_INFO,
            log_every_s=0.0,
        )


_NO_INFO = ModelInfo(hf_id="-", size_b=0.0)
# The run knobs that are plain scalars, in the order the flat config lists them.
_RUN_FIELDS = (
    "attention",
    "max_tokens",
    "max_line_bytes",
    "persona_reserve",
    "max_row_length",
    "min_row_length",
    "tokens_per_batch",
    "chunk_tokens",
    "vocab_chunk",
    "cache_dir",
    "compile_cache",
    "fresh",
    "log_every_s",
)


def temperatures_text(grid: tuple[float, ...]) -> str:
    """The config form of a temperature grid: default, none, or a comma list."""
    if grid == DEFAULT_TEMPERATURES:
        return "default"
    return ",".join(repr(t) for t in grid) if grid else "none"


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in d.items():
        if isinstance(value, Mapping):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _section(flat: Mapping[str, Any], name: str, base: Mapping[str, Any]) -> dict[str, Any]:
    value = flat.get(name)
    if not isinstance(value, Mapping):
        raise ConfigError(f"config.{name} must be a section of keys, got {value!r}")
    unknown = sorted(set(value) - set(base[name]))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(f'{name}.{k}' for k in unknown)}")
    return {**base[name], **value}


def _enum(cls: type[enum.StrEnum], value: Any, key: str) -> Any:
    try:
        return parse_enum(cls, value, key)
    except ConditionError as err:
        raise ConfigError(f"config.{err}") from None


def _typed(m: Mapping[str, Any], key: str, kind: type, prefix: str = "") -> Any:
    """``m[key]`` as ``kind`` (ints are not bools; a float field takes ints), or a ConfigError."""
    value = m[key]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
    elif kind is float:
        if not isinstance(value, bool):
            try:
                number = float(value)
            except (TypeError, ValueError):
                number = math.nan
            if math.isfinite(number):
                return number
    elif kind is str:
        if isinstance(value, str):
            return value  # paths are normalised (with ~) in __post_init__
    raise ConfigError(f"config.{prefix}{key} must be a {kind.__name__}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimulateJob:
    """One simulation job (``psych201-simulate``): a scoring job's model, data, condition (its protocol,
    template and persona build the same prefixes; ``options=study`` restricts a response's first token to
    its study's options), output and run knobs, plus how responses are sampled."""

    score: ScoreJob = _field(ScoreJob(out="out/simulate-default"), "model, data, condition, out, mesh, run knobs")
    simulation: Simulation = _field(Simulation(), "how responses are sampled")
    branch_capacity: int = _field(64, "branches (slot x sample) per packed row and decode pass")

    KEYS: ClassVar[tuple[str, ...]] = (*Simulation.FIELDS, "branch_capacity")

    def __post_init__(self):
        if self.branch_capacity < 1:
            raise ConfigError(f"config.branch_capacity must be a positive integer, got {self.branch_capacity!r}")
        if self.score.condition.temperatures:  # the scoring head's grid: no part of a simulation
            grid_free = dataclasses.replace(self.score.condition, temperatures=())
            object.__setattr__(self, "score", self.score.replace(condition=grid_free))

    @property
    def out(self) -> str:
        return self.score.out

    def to_dict(self) -> dict[str, Any]:
        """The flat config: a scoring job's keys (no temperature grid) and the simulation's."""
        flat = {k: v for k, v in self.score.to_dict().items() if k != "temperatures"}
        simulation = self.simulation.as_dict() | {"temperature": str(self.simulation.temperature)}  # or calibrated
        return flat | simulation | {"branch_capacity": self.branch_capacity}

    def flags(self) -> list[str]:
        """``--config.<key>=<value>`` for every key: this job as a ``psych201-simulate`` command line."""
        return [f"--config.{key}={value}" for key, value in _flatten(self.to_dict())]

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> SimulateJob:
        """From a flat config; absent keys take their defaults. A ConfigError names a bad key or value."""
        base = cls().to_dict()
        flat = {**base, **m}
        score = {k: v for k, v in flat.items() if k not in cls.KEYS}
        try:
            simulation = Simulation.from_mapping(flat)
        except ConditionError as err:
            raise ConfigError(f"config.{err}") from None
        return cls(
            score=ScoreJob.from_mapping(score | {"temperatures": "none"}),
            simulation=simulation,
            branch_capacity=_typed(flat, "branch_capacity", int),
        )

    def replace(self, **changes: Any) -> SimulateJob:
        return dataclasses.replace(self, **changes)


def documented_keys(kind: str = "score") -> list[tuple[str, str, str]]:
    """(key, default, description) of every flat config key of a ``score`` or ``simulate`` job, for
    ``--help`` (from the field docs)."""
    job = ScoreJob() if kind == "score" else SimulateJob()
    flat = dict(_flatten(job.to_dict()))
    docs: dict[str, str] = {}
    for f in dataclasses.fields(ScoreJob):
        if f.name == "condition":
            for key, doc in CONDITION_DOCS.items():
                docs[key] = doc
        elif f.name == "model_info":
            for key, doc in MODEL_INFO_DOCS.items():
                docs[f"model_info.{key}"] = doc
        elif f.name in ("mesh", "distributed"):
            section = MeshConfig if f.name == "mesh" else DistributedConfig
            for g in dataclasses.fields(section):
                docs[f"{f.name}.{g.name}"] = g.metadata["doc"]
        else:
            docs[f.name] = f.metadata["doc"]
    docs |= SIMULATION_DOCS
    return [(key, repr(flat[key]), docs[key]) for key in flat]


CONDITION_DOCS = {
    "data": "study folder(s), files, a comma list, or hf:<dataset>",
    "protocol": "reference (the study's scripts, exactly) | robust (spans from character offsets)",
    "template": "none | chat (the tokenizer's chat template)",
    "persona": "none | matched | shuffled (another participant's metadata from the same study)",
    "persona_subset": "with persona=none: only the participants with metadata (the persona subset)",
    "options": "none | study: also the top token among the study's single-token responses",
    "temperatures": "the head's temperature grid: default (17 values, 0.25 to 4), none, or a comma list",
    "dtype": "float32 | bfloat16 (parameters and activations; log-probs always float32)",
}
SIMULATION_DOCS = {
    "samples": "k: samples per response slot",
    "temperature": "a number (0: greedy) or calibrated (each participant at the temperature the calibration control "
    "fitted on the other half of the calibration run's participants)",
    "max_new_tokens": "the most tokens a sample generates (its closing marker or stop token included)",
    "top_k": "keep the k most likely tokens (0: off)",
    "top_p": "keep the most likely tokens up to probability mass p (1: off)",
    "calibration": "with temperature=calibrated: a scoring results directory of the same model with a temperature grid",
    "branch_capacity": "branches (slot x sample) per packed row and decode pass",
}
MODEL_INFO_DOCS = {
    "hf_id": "the model's hub id (names the model in the analysis); empty: the HF directory's name, or the "
    "converted checkpoint's recorded identity",
    "family": "model family, e.g. Qwen3",
    "generation": "model generation, e.g. Qwen3",
    "size_b": "parameters in billions",
    "kind": "base | Instruction-tuned | Reasoning | Vision | Code | Math",
    "base_hf_id": "the base model a post-trained model is paired with (empty for a base model)",
    "stage": "the post-training step that produced it, in a stage chain: base | sft | dpo | rl | final (empty: none)",
    "chain": "the stage chain it belongs to (empty: none); see configs/sweeps/stages.py",
}
