"""Sweeps: model pairs × conditions → scoring jobs, run one model at a time by shard workers, or written out
as SLURM array / TPU multi-slice scripts.

A sweep config (``configs/sweeps/*.py``) lists models (HF id, family, generation, size, post-training
kind, paired base, architecture) and conditions (protocol, template, persona, subset restriction, which
models they apply to). ``expand`` turns them into ``Job``s with one results directory each. A worker
(``run_shard``) takes its share of the models (``--shard=I/N``) and, per model, restores it once and runs
all its incomplete jobs, those sharing a token stream in one pass (``job.run_conditions``); failures are
recorded without stopping the sweep, and ``sweep_status.json`` tracks every model across shards.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import socket
import time

from absl import logging

from psych201_jax import locks
from psych201_jax.conditions import Condition, ConditionError, ModelInfo
from psych201_jax.errors import UserError
from psych201_jax.model.spec import SUPPORTED_MODEL_TYPES
from psych201_jax.runs import store

MODEL_FIELDS = ModelInfo.FIELDS
CONDITION_FIELDS = Condition.SWEEP_FIELDS


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


def job_config(job: Job | None, data: str, overrides: dict):
    """The ``psych201-score`` config of ``job`` (what its command line, ``score_args``, would give); None:
    the sweep's overrides on the default config (what every job shares, e.g. ``distributed``)."""
    from psych201_jax.runs import config

    cfg = config.get_config()
    if job is not None:
        cfg.model, cfg.data, cfg.out = job.model_path, job.condition.get("data") or data, job.out
        for key in CONDITION_FIELDS:
            cfg[key] = job.condition[key]
        for key in MODEL_FIELDS:
            value = job.model_info[key]
            if key == "size_b":  # unknown sizes are NaN, as ModelInfo reads them
                value = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
            cfg.model_info[key] = value
    try:
        cfg.update_from_flattened_dict(dict(overrides))
    except (KeyError, TypeError, ValueError) as err:
        raise SweepError(f"the sweep's score overrides {dict(overrides)} do not fit the job config: {err}") from None
    return cfg


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


class SweepStatus:
    """``<out_root>/sweep_status.json``: per model its state, conditions done / failed / total, restores,
    tokens and seconds, updated atomically under a file lock by any shard (read by ``--status``)."""

    def __init__(self, out_root: str, name: str):
        self.path = os.path.join(out_root, STATUS)
        self.name = name

    def read(self) -> dict:
        try:
            with open(self.path) as fh:
                return json.load(fh)
        except FileNotFoundError:  # written by atomic replace: never half a file
            return {"sweep": self.name, "models": {}}

    def update(self, model: str, add: dict | None = None, **fields) -> dict:
        """Sets ``fields`` of ``model``'s entry and adds ``add``'s counts to it, under the lock."""
        with locks.FileLock(self.path + ".lock", wait=True):
            status = self.read()
            entry = status["models"].setdefault(
                model, {"state": "remaining", "restores": 0, "tokens": 0, "seconds": 0.0}
            )
            entry.update(fields)
            for key, value in (add or {}).items():
                entry[key] = entry.get(key, 0) + value
            status["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with open(tmp, "w") as fh:
                json.dump(status, fh, indent=2, sort_keys=True)
            os.replace(tmp, self.path)
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


def is_writer() -> bool:
    """Process 0 of a multi-process shard writes the sweep's status and outcomes (every process scores)."""
    import jax

    return jax.process_index() == 0


def run_shard(
    jobs: list[Job], data: str, overrides: dict, *, out_root: str, name: str, shard: tuple[int, int] = (0, 1)
) -> list[dict]:
    """Runs this shard's models one after another in this process, each restored and compiled once, with
    all its conditions (jobs sharing a token stream share the forward pass, see ``job.run_conditions``).
    Complete jobs are skipped, partial ones resumed, a failed condition is recorded and the worker goes on.
    Returns one outcome per job of the shard (skipped jobs included)."""
    from psych201_jax.parallel import distributed
    from psych201_jax.runs import job as job_lib

    units = shard_models(models_of(jobs), *shard)
    shared = job_config(None, data, overrides)
    distributed.initialize_from_config(shared.get("distributed", {}))  # before any JAX use
    job_lib.enable_compile_cache(shared.get("compile_cache", ""))
    writer = is_writer()
    status = SweepStatus(out_root, name)
    if writer:
        for model, model_jobs in units:
            entry = status.read()["models"].get(model, {})
            if entry.get("state") in (None, "remaining"):
                status.update(model, state="remaining", conditions={"done": 0, "failed": 0, "total": len(model_jobs)})
    outcomes = [
        {"job": j.name, "status": "skipped", "detail": j.skip_reason, "out": j.out}
        for j in jobs
        if j.skip_reason and shard[0] == 0
    ]
    for model, model_jobs in units:
        outcomes += _run_model(model, model_jobs, data, overrides, status if writer else None, shard, job_lib)
    return outcomes


def _run_model(model: str, jobs: list[Job], data: str, overrides: dict, status, shard, job_lib) -> list[dict]:
    """One model's jobs: one restore, then each share group of its incomplete jobs (a failed group is
    retried job by job, so only the failing condition fails)."""
    from psych201_jax.data import records
    from psych201_jax.parallel import distributed

    started = time.perf_counter()
    outcomes: dict[str, dict] = {}
    todo = []
    for j in jobs:
        if is_complete(j):
            outcomes[j.name] = {"job": j.name, "status": "done", "detail": "already complete", "out": j.out}
        else:
            todo.append(j)
    tokens = 0

    def report(state: str, restored: int = 0) -> None:
        if status is None:
            return
        done = sum(o["status"] == "done" for o in outcomes.values())
        failed = sum(o["status"] == "failed" for o in outcomes.values())
        final = state != "running"  # tokens and seconds are added once, when the model ends
        current = status.update(
            model,
            add={  # restores are counted when they happen (a killed worker's too)
                "restores": restored,
                "tokens": tokens if final else 0,
                "seconds": time.perf_counter() - started if final else 0.0,
            },
            state=state,
            shard=f"{shard[0]}/{shard[1]}",
            pid=os.getpid(),
            host=socket.gethostname(),
            conditions={"done": done, "failed": failed, "total": len(jobs)},
        )
        print(f"{model}: {state} | {status_line(current)}", flush=True)

    cfgs = {}
    for j in todo:
        try:
            cfgs[j.name] = job_config(j, data, overrides)
        except Exception as err:  # noqa: BLE001 -- a job whose config cannot be built fails alone
            outcomes[j.name] = _failed(j, err)
    by_cfg = {id(c): j for j in todo if (c := cfgs.get(j.name)) is not None}
    if by_cfg:
        report("running")
    loaded, loaded_key = None, None
    load_errors: dict[str, Exception] = {}  # a restore that failed is not tried again for the next group
    totals: dict[str, int | None] = {}
    groups = job_lib.share_groups(list(cfgs.values()))
    while groups:
        group = groups.pop(0)
        group_jobs = [by_cfg[id(c)] for c in group]
        key = job_lib.load_key(group[0])
        if key in load_errors:
            for j in group_jobs:
                outcomes[j.name] = _failed(j, load_errors[key])
            continue
        logging.info("%s: %s", model, ", ".join(j.name for j in group_jobs))
        try:
            if key != loaded_key:  # one restore, unless a job asks for another dtype
                loaded = loaded_key = None  # the previous parameters go before the next restore
                loaded = job_lib.load(group[0])
                loaded_key = key
                report("running", restored=1)
            data_of = group[0].data  # counted once per model and data, not once per share group
            if data_of not in totals:
                totals[data_of] = records.count_participants(data_of)
            tokens += job_lib.run_conditions(loaded, group, total=totals[data_of]).tokens
            for j in group_jobs:  # returned normally: complete (process 0 wrote complete.json)
                outcomes[j.name] = {"job": j.name, "status": "done", "detail": "", "out": j.out}
        except Exception as err:  # noqa: BLE001 -- recorded; the worker goes on with the next condition
            if distributed.is_multiprocess():
                raise  # every process must take the same path: the shard stops, a rerun resumes
            logging.exception("%s failed", ", ".join(j.name for j in group_jobs))
            if loaded is None:
                load_errors[key] = err
            elif len(group) > 1:
                groups = [[c] for c in group] + groups  # one bad condition must not fail its siblings
                continue
            for j in group_jobs:
                outcomes[j.name] = _failed(j, err)
    del loaded  # the next model's parameters replace this one's
    state = "failed" if any(o["status"] == "failed" for o in outcomes.values()) else "done"
    report(state)
    return [outcomes[j.name] for j in jobs]


def _failed(job: Job, err: Exception) -> dict:
    detail = " ".join(str(err).split())[:300]
    return {"job": job.name, "status": "failed", "detail": f"{type(err).__name__}: {detail}", "out": job.out}


def forwarded_flags(argv: list[str]) -> list[str]:
    """The ``--config.*`` and ``--distributed`` flags of ``argv`` an emitted script must repeat, each
    ``--flag value`` pair kept whole (absl takes the value as the next argument when there is no ``=``)."""
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith(("--config.", "--distributed")):
            out.append(arg)
            takes_next = "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-")
            if takes_next:
                out.append(argv[i + 1])
    return out


def emit_script(
    jobs: list[Job], target: str, *, shards: int, config_path: str, flags: list[str], name: str, out_root: str
) -> str:
    """A script running the sweep as ``shards`` shards (``--shard=I/N``, one model's conditions at a time):
    ``slurm``: one ``sbatch --array`` task per shard, each on a whole node (all its GPUs, one SPMD job);
    ``tpu``: one TPU slice per shard, every worker of a slice running the same command (as tpu_pod.sh)."""
    units = models_of(jobs)
    args = " ".join(shlex.quote(a) for a in [f"--config={config_path}", *flags])
    head = [
        "#!/usr/bin/env bash",
        f"# sweep {name}: {len(units)} models, {sum(len(u[1]) for u in units)} jobs "
        f"({sum(bool(j.skip_reason) for j in jobs)} skipped: unsupported), {shards} shards.",
        "# Each shard runs its models one after another, each restored and compiled once for all its",
        "# conditions; complete conditions are skipped and partial ones resumed, so rerunning is safe.",
        f"# Progress of every shard: psych201-sweep {args} --status",
    ]
    if target == "slurm":
        return "\n".join(
            [
                head[0],
                f"#SBATCH --job-name=psych201-{name}",
                f"#SBATCH --array=0-{shards - 1}",
                "#SBATCH --nodes=1",
                "#SBATCH --ntasks-per-node=1",
                "#SBATCH --exclusive",
                "#SBATCH --gpus-per-node=8",
                "#SBATCH --requeue",
                f"#SBATCH --output={out_root}/logs/slurm-%A_%a.log",
                *head[1:],
                "# --exclusive and --gpus-per-node (set it to your nodes' GPU count): the shard's one task gets",
                "# every GPU of its node, and its mesh spans them. --requeue: SLURM reruns a shard whose node",
                "# failed or was preempted. Submit: sbatch <this file>; rerun it to retry failed conditions.",
                "set -euo pipefail",
                'cd "${REPO:-${SLURM_SUBMIT_DIR:-.}}"',
                f"srun --kill-on-bad-exit=1 .venv/bin/psych201-sweep {args} "
                f'--shard="${{SLURM_ARRAY_TASK_ID}}/{shards}"',
                "",
            ]
        )
    if target == "tpu":
        return "\n".join(
            [
                *head,
                "# One TPU slice per shard, named ${TPU_PREFIX}-0 .. -"
                + f"{shards - 1}"
                + "; all workers of a slice run",
                "# the same SPMD command (jax.distributed reads the slice from the TPU metadata).",
                "set -uo pipefail",
                "TPU_PREFIX=${TPU_PREFIX:?set TPU_PREFIX}",
                "ZONE=${ZONE:?set ZONE}",
                "DIR=${DIR:-psych201_jax}",
                f"mkdir -p {shlex.quote(out_root)}/logs",
                "pids=()",
                f"for i in $(seq 0 {shards - 1}); do",
                '  gcloud compute tpus tpu-vm ssh "${TPU_PREFIX}-${i}" --zone="$ZONE" --worker=all \\',
                f'    --command="cd ~/$DIR && .venv/bin/psych201-sweep {_double_quoted(args)} '
                f'--distributed=on --shard=${{i}}/{shards}" \\',
                f"    > {shlex.quote(out_root)}/logs/shard-${{i}}.log 2>&1 &",
                '  pids+=("$!")',
                "done",
                "failed=0",
                'for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done',
                'echo "$failed of ' + f"{shards}" + ' shards failed"',
                '[ "$failed" -eq 0 ]',
                "",
            ]
        )
    raise ValueError(f"unknown emit target {target!r}; expected local, tpu or slurm")


def _double_quoted(text: str) -> str:
    """``text`` safe inside a double-quoted shell string (the remote command keeps its own quoting)."""
    for char in ("\\", '"', "$", "`"):
        text = text.replace(char, "\\" + char)
    return text


def write_outcomes(path: str, outcomes: list[dict]) -> None:
    with open(path, "w") as fh:
        json.dump(outcomes, fh, indent=2)
