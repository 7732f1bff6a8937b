"""A sweep worker: runs its shard's models one after another, each restored once for all its conditions.

Per model, every incomplete job runs on one restored model: scoring jobs that share a token stream in
one pass (``job.run_conditions``), then the simulations (``simulate.run_loaded``). A failed condition is
recorded and the worker goes on; one whose results another worker holds is skipped (``in_use``).
``sweep_status.json`` is updated after each condition (``sweep.SweepStatus``).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging

from psych201_jax import locks
from psych201_jax.errors import UserError
from psych201_jax.runs import store
from psych201_jax.runs.config import ConfigError, ScoreJob, SimulateJob
from psych201_jax.runs.sweep import (
    Job,
    SweepError,
    SweepStatus,
    SweepStatusError,
    is_complete,
    models_of,
    shard_models,
    status_line,
)

# (calibration results directory, seed) -> its two cross-fitted temperatures (``temperature=calibrated``)
FitTemperatures = Callable[[str, int], tuple[float, float]]


def is_writer() -> bool:
    """Process 0 of a multi-process shard writes the sweep's status and outcomes (every process scores)."""
    import jax

    return jax.process_index() == 0


def run_shard(
    jobs: list[Job],
    overrides: Mapping[str, Any],
    *,
    out_root: str,
    name: str,
    shard: tuple[int, int] = (0, 1),
    fit_temperatures: FitTemperatures | None = None,
) -> list[dict]:
    """Runs this shard's models one after another in this process, each restored and compiled once, with
    all its conditions (jobs sharing a token stream share the forward pass, see ``job.run_conditions``).
    Complete jobs are skipped, partial ones resumed, a failed condition is recorded and the worker goes on;
    one that another worker holds is skipped (``in_use`` in its outcome). Returns one outcome per job of the
    shard (skipped jobs included)."""
    from psych201_jax.runs import job as job_lib

    units = shard_models(models_of(jobs), *shard)
    try:
        shared = ScoreJob().with_overrides(overrides)
    except ConfigError as err:
        raise SweepError(f"the sweep's score overrides {dict(overrides)} do not fit the job config: {err}") from None
    job_lib.initialize_runtime(shared)  # before any JAX use
    writer = is_writer()
    status = SweepStatus(out_root, name, jobs)
    if writer:
        try:
            for model, model_jobs in units:
                entry = status.read()["models"].get(model, {})
                if entry.get("state") in (None, "remaining"):
                    conditions = {"done": 0, "failed": 0, "total": len(model_jobs)}
                    status.update(model, state="remaining", conditions=conditions)
        except (SweepStatusError, locks.LockPathError) as err:  # only the report: each model's own update says it again
            logging.warning("%s", err)
    outcomes = [
        {"job": j.name, "status": "skipped", "detail": j.skip_reason, "out": j.out}
        for j in jobs
        if j.skip_reason and shard[0] == 0
    ]
    for model, model_jobs in units:
        outcomes += _run_model(
            model, model_jobs, overrides, status if writer else None, shard, job_lib, fit_temperatures
        )
    return outcomes


def _run_model(
    model: str, jobs: list[Job], overrides: Mapping[str, Any], status, shard, job_lib, fit_temperatures
) -> list[dict]:
    """One model's jobs: one restore, then each share group of its incomplete scoring jobs (a failed group
    is retried job by job, so only the failing condition fails), then each simulation."""
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

    def report(state: str, restored: int = 0) -> UserError | None:
        """Writes the model's entry (conditions counted now); a failed write is returned, not raised."""
        if status is None:
            return None
        final = state != "running"  # tokens and seconds are added once, when the model ends
        try:
            with status.lock():  # the final state reads other workers' results: no update in between
                in_use = [j for j in jobs if outcomes.get(j.name, {}).get("in_use")]
                if final:  # conditions another worker held: finished by now, or still running there
                    ended = [j for j in in_use if is_complete(j)]
                    for j in ended:
                        outcomes[j.name] = {"job": j.name, "status": "done", "detail": "done by another worker"}
                        outcomes[j.name]["out"] = j.out
                    in_use = [j for j in in_use if j not in ended]
                    state = "failed" if any(o["status"] == "failed" for o in outcomes.values()) else state
                    state = "running" if in_use and state == "done" else state
                conditions = {
                    "done": sum(o["status"] == "done" for o in outcomes.values()),
                    "failed": sum(o["status"] == "failed" for o in outcomes.values()),
                    "total": len(jobs),
                }
                if in_use:
                    conditions["in_use"] = len(in_use)
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
                    conditions=conditions,
                )
        except (SweepStatusError, locks.LockPathError) as err:
            logging.error("%s", err)
            return err
        print(f"{model}: {state} | {status_line(current)}", flush=True)
        return None

    from psych201_jax.runs import simulate

    score_jobs: dict[str, ScoreJob | SimulateJob] = {}
    for j in todo:
        try:
            score_jobs[j.name] = j.score_job(overrides) if j.simulation is None else j.simulate_job(overrides)
        except Exception as err:  # noqa: BLE001 -- a job whose config cannot be built fails alone
            outcomes[j.name] = _failed(j, err)
    by_job = {id(c): j for j in todo if (c := score_jobs.get(j.name)) is not None}
    if by_job:
        report("running")
    loaded, loaded_key = None, None
    load_errors: dict[tuple, Exception] = {}  # a restore that failed is not tried again for the next group
    totals: dict[str, int | None] = {}
    scoring = [c for c in score_jobs.values() if isinstance(c, ScoreJob)]
    groups: list[list] = job_lib.share_groups(scoring)
    groups += [[c] for c in score_jobs.values() if isinstance(c, SimulateJob)]  # after their calibration runs
    while groups:
        group = groups.pop(0)
        group_jobs = [by_job[id(c)] for c in group]
        first = group[0].score if isinstance(group[0], SimulateJob) else group[0]
        key = first.load_key()
        if key in load_errors:
            for j in group_jobs:
                outcomes[j.name] = _failed(j, load_errors[key])
            continue
        logging.info("%s: %s", model, ", ".join(j.name for j in group_jobs))
        try:
            if key != loaded_key:  # one restore, unless a job asks for another dtype
                loaded = loaded_key = None  # the previous parameters go before the next restore
                loaded = job_lib.load(first)
                loaded_key = key
                report("running", restored=1)  # counted when it happens (a killed worker's too)
            data_of = first.data  # counted once per model and data, not once per share group
            if data_of not in totals:
                totals[data_of] = records.count_participants(data_of)
            assert loaded is not None
            if isinstance(group[0], SimulateJob):
                sim = group[0]
                fitted = None
                if sim.simulation.calibrated:
                    if fit_temperatures is None:
                        raise ConfigError(f"{sim.out}: temperature=calibrated needs the calibration's temperatures")
                    fitted = fit_temperatures(sim.simulation.calibration, sim.score.seed)
                tokens += simulate.run_loaded(loaded, sim, total=totals[data_of], fitted=fitted).prefix_tokens
            else:
                tokens += job_lib.run_conditions(loaded, group, total=totals[data_of]).tokens
            for j in group_jobs:  # returned normally: complete (process 0 wrote complete.json)
                outcomes[j.name] = {"job": j.name, "status": "done", "detail": "", "out": j.out}
        except Exception as err:  # noqa: BLE001 -- recorded; the worker goes on with the next condition
            if distributed.is_multiprocess():
                raise  # every process must take the same path: the shard stops, a rerun resumes
            if loaded is None:
                load_errors[key] = err
            elif len(group) > 1:
                logging.warning("%s: %s; retrying them one by one", ", ".join(j.name for j in group_jobs), err)
                groups = [[c] for c in group] + groups  # one bad (or held) condition must not fail its siblings
                continue
            if isinstance(err, store.ResultsInUse):  # another worker runs it: not a failure of this one
                logging.warning("%s", err)
                for j in group_jobs:
                    outcomes[j.name] = {"job": j.name, "status": "skipped", "detail": str(err), "out": j.out}
                    outcomes[j.name]["in_use"] = True
            else:
                logging.exception("%s failed", ", ".join(j.name for j in group_jobs))
                for j in group_jobs:
                    outcomes[j.name] = _failed(j, err)
        _report_or_fail(report("running"), group_jobs, outcomes)  # counts after each condition
    del loaded  # the next model's parameters replace this one's
    report("done")  # failed if any condition failed; running while another worker holds one
    return [outcomes[j.name] for j in jobs]


def _report_or_fail(err: UserError | None, jobs: list[Job], outcomes: dict[str, dict]) -> None:
    """A status write that failed (full disk) fails the conditions it reported, with its one line."""
    if err is not None:
        for j in jobs:
            if outcomes[j.name]["status"] == "done":
                outcomes[j.name] = _failed(j, err)


def _failed(job: Job, err: Exception) -> dict:
    detail = " ".join(str(err).split())[:300]
    return {"job": job.name, "status": "failed", "detail": f"{type(err).__name__}: {detail}", "out": job.out}


def write_outcomes(path: str, outcomes: list[dict]) -> None:
    try:
        with open(path, "w") as fh:
            json.dump(outcomes, fh, indent=2)
    except OSError as err:
        what = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
        raise SweepError(f"cannot write {path}: {what}") from None
