"""Sweeps: model pairs × conditions → scoring jobs, run locally or written out for TPU pods / SLURM.

A sweep config (``configs/sweeps/*.py``) lists models (HF id, family, generation, size, post-training
kind, paired base, architecture) and conditions (protocol, template, persona, subset restriction, which
models they apply to). ``expand`` turns them into ``Job``s with one results directory each; the local
runner runs them one after another in subprocesses, skips completed ones, and records failures without
stopping the sweep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time

from absl import logging

from psych201_jax.conditions import Condition, ConditionError, ModelInfo
from psych201_jax.errors import UserError
from psych201_jax.model.spec import SUPPORTED_MODEL_TYPES
from psych201_jax.runs import store

MODEL_FIELDS = ModelInfo.FIELDS
CONDITION_FIELDS = Condition.SWEEP_FIELDS
SCORE_COMMAND = (sys.executable, "-m", "psych201_jax.cli.score")  # the package's own entry point, any cwd


@dataclasses.dataclass(frozen=True)
class Job:
    name: str  # <model slug>/<condition>
    out: str
    model_path: str
    model_info: dict
    condition: dict
    skip_reason: str = ""  # set when the job cannot run here (e.g. unsupported architecture)

    def score_args(self, data: str, overrides: dict) -> list[str]:
        """``launch.score`` flags of this job."""
        args = [
            f"--config.model={self.model_path}",
            f"--config.data={self.condition.get('data') or data}",
            f"--config.out={self.out}",
        ]
        for key in CONDITION_FIELDS:
            args.append(f"--config.{key}={self.condition[key]}")
        for key in MODEL_FIELDS:
            args.append(f"--config.model_info.{key}={self.model_info[key]}")
        args += [f"--config.{k}={v}" for k, v in sorted(overrides.items())]
        return args


def slug(hf_id: str) -> str:
    return hf_id.replace("/", "--")


def _applies(condition: dict, model: dict) -> bool:
    kinds = condition.get("kinds", "all")
    if kinds == "all":
        return True
    if kinds == "post":
        return model["kind"] != "base"
    if kinds == "chat":
        return bool(model.get("chat"))
    if kinds == "persona":
        return bool(model.get("persona", True))
    return model["kind"] in kinds


def expand(cfg) -> list[Job]:
    """All (model, condition) jobs of a sweep config, in config order (conditions outer)."""
    jobs = []
    for condition in cfg.conditions:
        condition = {"persona_subset": False, "options": "none", "temperatures": "none", "data": "", **dict(condition)}
        for model in cfg.models:
            model = dict(model)
            if not _applies(condition, model):
                continue
            info = {k: model.get(k, "") for k in MODEL_FIELDS}
            path = model.get("path") or os.path.join(cfg.model_root, model["hf_id"])
            arch = model.get("arch", "")
            skip = ""
            if arch and arch not in SUPPORTED_MODEL_TYPES:
                skip = f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            name = f"{slug(model['hf_id'])}/{condition['name']}"
            jobs.append(Job(name, os.path.join(cfg.out_root, name), path, info, condition, skip))
    return jobs


class SweepError(UserError):
    """A sweep config names conditions or models that cannot run."""


def problems(jobs: list[Job], data: str) -> list[str]:
    """What would make runnable jobs fail before scoring: a bad condition value, a model path that is
    neither a converted nor an HF checkpoint, data that does not exist (one line each)."""
    out: list[str] = []
    seen: set[str] = set()

    def once(line: str) -> None:
        if line not in seen:
            seen.add(line)
            out.append(line)

    for job in jobs:
        if job.skip_reason:
            continue
        try:
            Condition.from_mapping(job.condition)
        except ConditionError as err:
            once(f"condition {job.condition['name']!r}: {err}")
        path = job.model_path
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("model_spec.json", "config.json")):
            once(f"model {job.model_info['hf_id']!r}: {path} is neither a converted nor an HF checkpoint directory")
        for entry in (job.condition.get("data") or data).split(","):
            if entry and not entry.startswith("hf:") and not os.path.exists(entry):
                once(f"condition {job.condition['name']!r}: data {entry} does not exist")
    return out


def is_complete(job: Job) -> bool:
    """Finished, and with this job's condition (an edited sweep config must not skip stale results)."""
    if store.read_complete(job.out) is None:
        return False
    try:
        done = Condition.from_mapping(store.read_manifest(job.out).get("config", {}))
    except ConditionError:
        return False
    return done.values(CONDITION_FIELDS) == Condition.from_mapping(job.condition).values(CONDITION_FIELDS)


@dataclasses.dataclass
class SweepProgress:
    total: int
    done: int = 0
    failed: int = 0
    skipped: int = 0
    tokens: int = 0
    seconds: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def line(self) -> str:
        finished = self.done + self.failed + self.skipped
        remaining = self.total - finished
        elapsed = time.perf_counter() - self.started
        ran = self.done + self.failed
        eta = elapsed / ran * remaining if ran else float("nan")
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return (
            f"jobs: {self.done} done, {self.failed} failed, {self.skipped} skipped, {remaining} remaining; "
            f"{rate:.0f} tokens/s; ETA {eta:.0f}s"
        )


def run_local(jobs: list[Job], data: str, overrides: dict, *, log_dir: str) -> tuple[SweepProgress, list[dict]]:
    """Runs jobs in sequence; completed ones are skipped, failures recorded and the sweep goes on."""
    progress = SweepProgress(len(jobs))
    outcomes = []
    os.makedirs(log_dir, exist_ok=True)
    for job in jobs:
        status, detail = "done", ""
        if job.skip_reason:
            status, detail = "skipped", job.skip_reason
            progress.skipped += 1
        elif is_complete(job):
            status, detail = "done", "already complete"
            progress.done += 1
        else:
            log_path = os.path.join(log_dir, job.name.replace("/", "__") + ".log")
            cmd = [*SCORE_COMMAND, *job.score_args(data, overrides)]
            logging.info("running %s", job.name)
            with open(log_path, "w") as log:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
            complete = store.read_complete(job.out)
            if proc.returncode == 0 and complete is not None:
                progress.done += 1
                progress.tokens += complete.get("tokens", 0)
                progress.seconds += complete.get("seconds", 0.0)
            else:
                status, detail = "failed", f"exit code {proc.returncode}; see {log_path}: {_last_line(log_path)}"
                progress.failed += 1
        outcomes.append({"job": job.name, "status": status, "detail": detail, "out": job.out})
        logging.info("%s: %s %s | %s", job.name, status, detail, progress.line())
    return progress, outcomes


def _last_line(path: str) -> str:
    with open(path) as fh:
        lines = [line.strip() for line in fh if line.strip()]
    return lines[-1][:300] if lines else ""


def emit_commands(jobs: list[Job], data: str, overrides: dict, target: str) -> str:
    """A shell script running every runnable job on a TPU pod slice (all workers) or as a SLURM array."""
    runnable = [j for j in jobs if not j.skip_reason]
    lines = [
        "#!/usr/bin/env bash",
        f"# {len(runnable)} jobs ({len(jobs) - len(runnable)} skipped: unsupported)",
        "set -u",
    ]
    if target == "tpu":
        lines += ["TPU_NAME=${TPU_NAME:?set TPU_NAME}", "ZONE=${ZONE:?set ZONE}", "REPO=${REPO:-~/psych201_jax}"]
        for job in runnable:
            cmd = " ".join(["cd $REPO && .venv/bin/psych201-score", *map(shlex.quote, job.score_args(data, overrides))])
            lines.append(
                f'gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all '
                f'--command={shlex.quote(cmd)} || echo "FAILED {job.name}"'
            )
    elif target == "slurm":
        lines = [
            "#!/usr/bin/env bash",
            f"#SBATCH --array=0-{max(len(runnable) - 1, 0)}",
            "#SBATCH --job-name=psych201-sweep",
            "set -eu",
            "JOBS=(",
        ]
        for job in runnable:
            lines.append("  " + shlex.quote(" ".join(map(shlex.quote, job.score_args(data, overrides)))))
        lines += [")", 'eval "set -- ${JOBS[$SLURM_ARRAY_TASK_ID]}"', 'srun .venv/bin/psych201-score "$@"']
    else:
        raise ValueError(f"unknown emit target {target!r}; expected local, tpu or slurm")
    return "\n".join(lines) + "\n"


def write_outcomes(path: str, outcomes: list[dict]) -> None:
    with open(path, "w") as fh:
        json.dump(outcomes, fh, indent=2)
