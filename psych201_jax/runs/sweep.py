"""Sweeps: model pairs × conditions → scoring jobs, run one model at a time by shard workers, or written out
as SLURM array / TPU multi-slice scripts.

A sweep config (``configs/sweeps/*.py``) lists models (HF id, family, generation, size, post-training
kind, paired base, architecture) and conditions (protocol, template, persona, subset restriction, which
models they apply to). ``expand`` turns them into ``Job``s with one results directory each. A worker
(``run_shard``) takes its share of the models (``--shard=I/N``) and, per model, restores it once and runs
all its incomplete jobs, those sharing a token stream in one pass (``job.run_conditions``); failures are
recorded without stopping the sweep, and ``sweep_status.json`` tracks every model across shards (after each
condition). A condition whose results another worker holds is "skipped (in use)", not failed.

``out_root`` is normalised (``paths.normalize``); model slugs and condition names are single path
components, so no job's results leave ``out_root``. A corrupt or empty ``sweep_status.json`` is set aside
(``.corrupt-<time>``) and rebuilt from the results directories; a status write that fails (full disk) fails
the condition it reports with one line, never the worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import time
from collections.abc import Mapping
from typing import Any

from absl import logging

from psych201_jax import locks, paths
from psych201_jax.conditions import Condition, ConditionError, ModelInfo, ModelKind, Simulation
from psych201_jax.errors import UserError
from psych201_jax.model.spec import SUPPORTED_MODEL_TYPES
from psych201_jax.runs import store
from psych201_jax.runs.config import ConfigError, ScoreJob, SimulateJob

__all__ = ["Job", "Sweep", "SweepCondition", "SweepError", "SweepModel", "SweepStatus", "expand"]


class SweepError(UserError):
    """A sweep config names conditions or models that cannot run."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepModel:
    """One model of a sweep: what it is, where its checkpoint is, and which conditions apply to it."""

    info: ModelInfo
    path: str = dataclasses.field(metadata={"doc": "checkpoint directory (default: <model_root>/<hf_id>)"})
    arch: str = dataclasses.field(default="", metadata={"doc": "HF model_type; an unsupported one is skipped"})
    chat: bool = dataclasses.field(default=False, metadata={"doc": "the chat condition applies (kinds=chat)"})
    persona: bool = dataclasses.field(default=True, metadata={"doc": "persona conditions apply (kinds=persona)"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepCondition:
    """One condition of a sweep and the models it applies to."""

    name: str = dataclasses.field(metadata={"doc": "names the results directory <out_root>/<model>/<name>"})
    condition: Condition
    kinds: str | tuple[str, ...] = dataclasses.field(
        default="all", metadata={"doc": "all | post | chat | persona | a list of model kinds"}
    )
    simulation: Simulation | None = dataclasses.field(
        default=None,
        metadata={
            "doc": "simulate=dict(samples, temperature, max_new_tokens, top_k, top_p, calibration): a simulation "
            "(psych201-simulate) instead of scoring; calibration names the condition whose temperature grid "
            "gives temperature=calibrated"
        },
    )

    def applies(self, model: SweepModel) -> bool:
        if self.kinds == "all":
            return True
        if self.kinds == "post":
            return model.info.kind != ModelKind.BASE
        if self.kinds == "chat":
            return model.chat
        if self.kinds == "persona":
            return model.persona
        return model.info.kind.value in self.kinds


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sweep:
    """A sweep: model pairs x conditions, one results directory per (model, condition)."""

    name: str = dataclasses.field(metadata={"doc": "the sweep's name (status file, emitted job names)"})
    model_root: str = dataclasses.field(default="", metadata={"doc": "checkpoints are read from <model_root>/<hf_id>"})
    data: str = dataclasses.field(metadata={"doc": "the data of every condition without its own data"})
    out_root: str = dataclasses.field(metadata={"doc": "results go to <out_root>/<model slug>/<condition>"})
    models: tuple[SweepModel, ...] = dataclasses.field(
        metadata={
            "doc": "dicts: hf_id, family, generation, size_b, kind, base_hf_id, stage, chain, path, arch, chat, persona"
        }
    )
    conditions: tuple[SweepCondition, ...] = dataclasses.field(
        metadata={
            "doc": "dicts: name, protocol, template, persona, persona_subset, options, temperatures, data, kinds, "
            "simulate"
        }
    )
    score: tuple[tuple[str, Any], ...] = dataclasses.field(
        default=(), metadata={"doc": "psych201-score config overrides for every job, e.g. dict(dtype='bfloat16')"}
    )

    @classmethod
    def from_mapping(cls, m: Any) -> Sweep:
        """From a sweep config (``configs/sweeps/*.py``); a SweepError names every bad model or condition."""
        sweep, bad = cls.parse(m)
        if bad:
            raise SweepError("; ".join(bad))
        return sweep

    @classmethod
    def parse(cls, m: Any) -> tuple[Sweep, list[str]]:
        """The sweep of its valid models and conditions, and one line per invalid one (left out)."""
        bad: list[str] = []

        def valid(parse, entries):
            out = []
            for entry in entries:
                try:
                    out.append(parse(dict(entry)))
                except SweepError as err:
                    bad.append(str(err))
            return tuple(out)

        try:
            sweep = cls(
                name=str(m["name"]),
                model_root=str(m.get("model_root", "")),
                data=str(m["data"]),
                out_root=paths.normalize(str(m["out_root"])),
                models=valid(lambda x: _model(x, m.get("model_root", "")), m["models"]),
                conditions=valid(_condition, m["conditions"]),
                score=tuple(sorted(dict(m.get("score") or {}).items())),
            )
        except KeyError as err:
            raise SweepError(f"the sweep config lacks {err}") from None
        grids = {c.name for c in sweep.conditions if c.simulation is None and c.condition.temperatures}
        kept = []
        for c in sweep.conditions:
            if c.simulation is not None and c.simulation.calibrated and c.simulation.calibration not in grids:
                bad.append(
                    f"condition {c.name!r}: calibration={c.simulation.calibration!r} must name a scoring condition "
                    f"of this sweep with a temperature grid ({', '.join(sorted(grids)) or 'none has one'})"
                )
            else:
                kept.append(c)
        return dataclasses.replace(sweep, conditions=tuple(kept)), bad

    def overrides(self) -> dict[str, Any]:
        return dict(self.score)


def _model(m: dict, model_root: str) -> SweepModel:
    try:
        info = ModelInfo.from_mapping(m)
    except ConditionError as err:
        raise SweepError(f"model {m.get('hf_id')!r}: {err}") from None
    _check_name(f"model {info.hf_id!r}: its results folder", slug(info.hf_id))
    return SweepModel(
        info=info,
        path=m.get("path") or os.path.join(model_root, info.hf_id),
        arch=str(m.get("arch", "")),
        chat=bool(m.get("chat", False)),
        persona=bool(m.get("persona", True)),
    )


def _check_name(what: str, name: str) -> None:
    """A model slug or condition name is one folder inside ``out_root``: never empty, ``.``, ``..`` or a path."""
    seps = [sep for sep in (os.sep, os.altsep, "\0") if sep]
    if name in ("", ".", "..") or any(sep in name for sep in seps):
        raise SweepError(f"{what} {name!r} is not a plain folder name (it would leave or alias out_root)")


def _condition(m: dict) -> SweepCondition:
    name = str(m.get("name", ""))
    _check_name("condition name", name)
    sim = m.pop("simulate", None)
    try:
        grid = {"temperatures": "none"} if sim else {}  # a simulation has no head, so no temperature grid
        condition = Condition.from_mapping({"temperatures": "none", **m, **grid})
        simulation = None if sim is None else Simulation.from_mapping(dict(sim))
    except ConditionError as err:
        raise SweepError(f"condition {name!r}: {err}") from None
    kinds = m.get("kinds", "all")
    kinds = kinds if isinstance(kinds, str) else tuple(kinds)
    return SweepCondition(name=name, condition=condition, kinds=kinds, simulation=simulation)


CONDITION_FIELDS = Condition.SWEEP_FIELDS


@dataclasses.dataclass(frozen=True)
class Job:
    """One (model, condition) of a sweep, with its results directory."""

    name: str  # <model slug>/<condition>
    out: str
    model: SweepModel
    condition_name: str
    condition: Condition  # its data: the condition's own, else the sweep's
    skip_reason: str = ""  # set when the job cannot run here (e.g. unsupported architecture)
    simulation: Simulation | None = None  # a simulation job; calibrated: its calibration run's directory

    @property
    def model_info(self) -> ModelInfo:
        return self.model.info

    def score_job(self, overrides: Mapping[str, Any]) -> ScoreJob:
        """The ``psych201-score`` job of this sweep job: the one mapping from a sweep entry to a job."""
        try:
            base = ScoreJob(model=self.model.path, model_info=self.model.info, condition=self.condition, out=self.out)
            return base.with_overrides(overrides)
        except ConfigError as err:
            raise SweepError(f"{self.name}: the sweep's score overrides {dict(overrides)} do not fit: {err}") from None

    def simulate_job(self, overrides: Mapping[str, Any]) -> SimulateJob:
        """The ``psych201-simulate`` job of a simulation condition."""
        if self.simulation is None:
            raise SweepError(f"{self.name}: not a simulation")
        try:
            return SimulateJob(score=self.score_job(overrides), simulation=self.simulation)
        except ConfigError as err:
            raise SweepError(f"{self.name}: {err}") from None

    def score_args(self, overrides: Mapping[str, Any]) -> list[str]:
        """This job as ``psych201-score`` flags (``psych201-simulate`` flags for a simulation)."""
        if self.simulation is not None:
            return self.simulate_job(overrides).flags()
        return self.score_job(overrides).flags()


def slug(hf_id: str) -> str:
    return hf_id.replace("/", "--")


def expand(sweep: Sweep) -> list[Job]:
    """All (model, condition) jobs of a sweep, in config order (conditions outer)."""
    jobs = []
    for c in sweep.conditions:
        condition = dataclasses.replace(c.condition, data=c.condition.data or sweep.data)
        for model in sweep.models:
            if not c.applies(model):
                continue
            skip = ""
            if model.arch and model.arch not in SUPPORTED_MODEL_TYPES:
                skip = f"architecture {model.arch!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            name = f"{slug(model.info.hf_id)}/{c.name}"
            out = paths.normalize(os.path.join(sweep.out_root, name))
            if os.path.dirname(os.path.dirname(out)) != paths.normalize(sweep.out_root):
                raise SweepError(f"job {name!r}: its results folder {out} is not inside out_root {sweep.out_root}")
            simulation = c.simulation
            if simulation is not None and simulation.calibrated:  # that condition's results of this model
                calibration = paths.normalize(
                    os.path.join(sweep.out_root, slug(model.info.hf_id), simulation.calibration)
                )
                simulation = dataclasses.replace(simulation, calibration=calibration)
            jobs.append(Job(name, out, model, c.name, condition, skip, simulation))
    return jobs


def problems(jobs: list[Job], overrides: Mapping[str, Any]) -> list[str]:
    """What would make runnable jobs fail before scoring: overrides that do not fit the job config, a model
    path that is neither a converted nor an HF checkpoint, data that does not exist (one line each)."""
    out: list[str] = []
    seen: set[str] = set()

    def once(line: str) -> None:
        if line not in seen:
            seen.add(line)
            out.append(line)

    outs = {job.out for job in jobs if not job.skip_reason}
    for job in jobs:
        if job.skip_reason:
            continue
        try:
            job.score_job(overrides) if job.simulation is None else job.simulate_job(overrides)
        except SweepError as err:
            once(str(err))
        if job.simulation is not None and job.simulation.calibrated and job.simulation.calibration not in outs:
            once(f"{job.name}: its calibration run {job.simulation.calibration} is not a job of this sweep")
        path = job.model.path
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("model_spec.json", "config.json")):
            once(f"model {job.model_info.hf_id!r}: {path} is neither a converted nor an HF checkpoint directory")
        for entry in job.condition.data.split(","):
            if entry and not entry.startswith("hf:") and not os.path.exists(entry):
                once(f"condition {job.condition_name!r}: data {entry} does not exist")
    return out


def is_complete(job: Job) -> bool:
    """Finished, and with this job's condition (an edited sweep config must not skip stale results)."""
    if store.read_complete(job.out) is None:
        return False
    manifest = store.read_manifest(job.out)
    config = manifest.get("config", {})
    try:
        done = Condition.from_mapping(config)
        simulation = Simulation.from_mapping(config) if store.simulates(manifest) else None
    except ConditionError:
        return False
    return done.values(CONDITION_FIELDS) == job.condition.values(CONDITION_FIELDS) and simulation == job.simulation


def models_of(jobs: list[Job]) -> list[tuple[str, list[Job]]]:
    """Runnable jobs grouped by model, in config order: the unit of work of a worker (and of a shard)."""
    by_model: dict[str, list[Job]] = {}
    for job in jobs:
        if not job.skip_reason:
            by_model.setdefault(job.name.split("/")[0], []).append(job)
    return list(by_model.items())


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise SweepError(f"--shard={text!r}: expected I/N, e.g. 0/8") from None
    if not 0 <= index < count:
        raise SweepError(f"--shard={text!r}: need 0 <= I < N")
    return index, count


def shard_models(units: list[tuple[str, list[Job]]], index: int, count: int) -> list[tuple[str, list[Job]]]:
    """Shard ``index`` of ``count``: every count-th model from the index-th (deterministic, disjoint)."""
    return units[index::count]


STATUS = "sweep_status.json"
STATES = ("done", "running", "failed", "remaining")


class SweepStatusError(SweepError):
    """``sweep_status.json`` cannot be written (full disk, read-only) or read."""


class SweepStatus:
    """``<out_root>/sweep_status.json``: per model its state, conditions done / failed / total, restores,
    tokens and seconds, updated atomically under a file lock by any shard (read by ``--status``).

    A file that is not a valid status (corrupt, empty, hand-edited) is named in a warning, set aside as
    ``sweep_status.json.corrupt-<time>`` and rebuilt from ``jobs``' results directories (their
    complete.json). A write that fails is a ``SweepStatusError`` (one line)."""

    def __init__(self, out_root: str, name: str, jobs: list[Job] | None = None):
        self.path = os.path.join(paths.normalize(out_root), STATUS)
        self.name = name
        self.jobs = list(jobs or [])

    def lock(self) -> locks.FileLock:
        return locks.FileLock(self.path + ".lock", wait=True, reentrant=True)

    def _load(self) -> dict | None:
        """The file's status; {} when there is none; None when it is not a valid status."""
        try:
            with open(self.path, "rb") as fh:
                data = json.loads(fh.read())
        except FileNotFoundError:  # written by atomic replace: never half a file
            return {}
        except (ValueError, UnicodeDecodeError):
            return None
        except OSError as err:
            raise SweepStatusError(f"cannot read {self.path}: {err.strerror or err}") from None
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, dict) or not all(
            isinstance(e, dict) and e.get("state") in STATES for e in models.values()
        ):
            return None
        return data

    def read(self) -> dict:
        status = self._load()
        if status is None:
            with self.lock():
                status = self._load()  # another worker may have rebuilt it meanwhile
                if status is None:
                    status = self._rebuild()
        return status or {"sweep": self.name, "models": {}}

    def _rebuild(self) -> dict:
        """Sets the invalid file aside and writes the status that the results directories show."""
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        try:
            os.replace(self.path, aside)
        except OSError as err:
            raise SweepStatusError(f"{self.path} is corrupt and cannot be set aside ({err.strerror or err})") from None
        logging.warning("%s is not a valid sweep status: set aside as %s, rebuilt from the results", self.path, aside)
        status: dict[str, Any] = {"sweep": self.name, "models": {}}
        for model, model_jobs in models_of(self.jobs):
            done = sum(is_complete(j) for j in model_jobs)
            status["models"][model] = {
                "state": "done" if done == len(model_jobs) else "remaining",
                "restores": 0,
                "tokens": 0,
                "seconds": 0.0,
                "conditions": {"done": done, "failed": 0, "total": len(model_jobs)},
            }
        self._write(status)
        return status

    def _write(self, status: dict) -> None:
        status["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        tmp = f"{self.path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "w") as fh:
                json.dump(status, fh, indent=2, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            what = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
            raise SweepStatusError(
                f"cannot update {self.path}: {what}; free space and rerun the same command to resume"
            ) from None

    def update(self, model: str, add: dict | None = None, **fields) -> dict:
        """Sets ``fields`` of ``model``'s entry and adds ``add``'s counts to it, under the lock."""
        with self.lock():
            status = self.read()
            entry = status["models"].setdefault(
                model, {"state": "remaining", "restores": 0, "tokens": 0, "seconds": 0.0}
            )
            entry.update(fields)
            for key, value in (add or {}).items():
                entry[key] = entry.get(key, 0) + value
            self._write(status)
        return status


def status_line(status: dict) -> str:
    """Models per state, conditions of the running ones, aggregate tokens/s and ETA (from finished models)."""
    models = status.get("models", {})
    counts = {s: sum(m["state"] == s for m in models.values()) for s in STATES}
    tokens = sum(m.get("tokens", 0) for m in models.values())
    seconds = sum(m.get("seconds", 0.0) for m in models.values())
    finished = [m["seconds"] for m in models.values() if m["state"] in ("done", "failed") and m.get("seconds")]
    left = counts["remaining"] + counts["running"]
    shards = max(1, len({m.get("shard") for m in models.values() if m["state"] == "running"}))
    eta = f"{sum(finished) / len(finished) * left / shards:.0f}s" if finished else "?"
    running = "; ".join(
        f"{name}: {m['conditions']['done']}/{m['conditions']['total']} conditions"
        for name, m in models.items()
        if m["state"] == "running" and "conditions" in m
    )
    return (
        f"models: {counts['done']} done, {counts['running']} running, {counts['failed']} failed, "
        f"{counts['remaining']} remaining"
        + (f" ({running})" if running else "")
        + f"; {tokens / seconds if seconds else 0.0:.0f} tokens/s; ETA {eta}"
    )
