r"""psych201-sweep: expand a sweep (model pairs × conditions) into scoring and simulation jobs and run them, one
model at a time.

The unit of work is one model with all its conditions: a worker restores and compiles the model once and
runs every condition; conditions that feed the model the same tokens (they differ only in the head:
options, the temperature grid) share one forward pass. Results stay one directory per (model, condition)
with its own manifest, fingerprint and resume state. Complete conditions are skipped, partial ones
resumed, a failed one is recorded and the worker goes on; the exit status is 1 if any job failed.

local (default): runs shard I of N (default 0/1: every model) in this process and writes
``<out_root>/sweep_outcomes.json`` (this shard's jobs). Every shard updates ``<out_root>/sweep_status.json``
(models done / running / failed / remaining, conditions per model, tokens/s, ETA); --status prints it.
slurm / tpu: writes ``<out_root>/sweep_<emit>.sh`` running N shards as a SLURM array (one whole node per
shard) or on N TPU slices (one shard per slice, all workers of a slice running the same command).
--dry_run lists the jobs (and why any is skipped) without running anything.

example:
  psych201-sweep --config=configs/sweeps/psych201_paper.py --dry_run
  psych201-sweep --config=configs/sweeps/psych201_paper.py --emit=slurm --shards=8
"""

import dataclasses
import json
import os
import sys
from typing import Any

from absl import app, flags, logging

from psych201_jax.cli import common
from psych201_jax.runs import emit, sweep, sweep_worker

_CONFIG: Any = None  # defined in run(): its overrides are parsed when it is defined
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the jobs only.")
_STATUS = flags.DEFINE_bool("status", False, "Print <out_root>/sweep_status.json as written by every shard.")
_EMIT = flags.DEFINE_enum("emit", "local", ["local", "tpu", "slurm"], "Run here, or write a SLURM / TPU script.")
_SHARD = flags.DEFINE_string("shard", "0/1", "Run shard I of N: every N-th model from the I-th.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"], "Every job's config.distributed.mode (on: all TPU slice workers)."
)
_SHARDS = flags.DEFINE_integer("shards", 1, "Shards of an emitted SLURM / TPU script.", lower_bound=1)


def main(argv):
    del argv
    if _CONFIG.value is None:
        raise app.UsageError("--config=configs/sweeps/<name>.py is required")
    cfg, invalid = sweep.Sweep.parse(_CONFIG.value)
    if invalid and not _DRY_RUN.value:
        raise sweep.SweepError(f"sweep {cfg.name}: " + "; ".join(invalid))
    jobs = sweep.expand(cfg)
    overrides = cfg.overrides()
    if _DISTRIBUTED.value != "auto":
        overrides["distributed.mode"] = _DISTRIBUTED.value
    status = sweep.SweepStatus(cfg.out_root, cfg.name, jobs)
    if _STATUS.value:
        current = status.read()
        print(json.dumps(current, indent=2, sort_keys=True))
        print(sweep.status_line(current))
        return
    units = sweep.models_of(jobs)
    print(
        f"sweep {cfg.name}: {len(jobs)} jobs ({sum(bool(j.skip_reason) for j in jobs)} skipped), "
        f"{len(units)} models → {cfg.out_root}"
    )
    if _DRY_RUN.value:
        for job in jobs:
            state = (
                ("skip: " + job.skip_reason) if job.skip_reason else ("complete" if sweep.is_complete(job) else "todo")
            )
            print(f"  {job.name:<70} {state}")
        wrong = invalid + sweep.problems(jobs, overrides)
        for line in wrong:
            print(f"  problem: {line}")
        if wrong:
            raise sweep.SweepError(f"{len(wrong)} problem(s) in sweep {cfg.name} (listed above)")
        return
    os.makedirs(cfg.out_root, exist_ok=True)
    if _EMIT.value != "local":
        path = os.path.join(cfg.out_root, f"sweep_{_EMIT.value}.sh")
        config_path = flags.FLAGS["config"].config_filename
        text = emit.emit_script(
            jobs,
            _EMIT.value,
            shards=_SHARDS.value,
            config_path=config_path,
            flags=emit.forwarded_flags(sys.argv[1:]),
            name=cfg.name,
            out_root=cfg.out_root,
        )
        os.makedirs(os.path.join(cfg.out_root, "logs"), exist_ok=True)  # SLURM does not create --output's folder
        with open(path, "w") as fh:
            fh.write(text)
        print(f"wrote {path}")
        return
    shard = sweep.parse_shard(_SHARD.value)
    from psych201_jax.analysis import calibration  # simulations at temperature=calibrated

    outcomes = sweep_worker.run_shard(
        jobs,
        overrides,
        out_root=cfg.out_root,
        name=cfg.name,
        shard=shard,
        fit_temperatures=calibration.fitted_temperatures,
    )
    suffix = "" if shard == (0, 1) else f"_shard{shard[0]}of{shard[1]}"
    outcomes_path = os.path.join(cfg.out_root, f"sweep_outcomes{suffix}.json")
    if sweep_worker.is_writer():
        sweep_worker.write_outcomes(outcomes_path, outcomes)
    counts = {s: sum(o["status"] == s for o in outcomes) for s in ("done", "failed", "skipped")}
    in_use = sum(bool(o.get("in_use")) for o in outcomes)
    print(
        f"jobs: {counts['done']} done, {counts['failed']} failed, {counts['skipped']} skipped"
        + (f" ({in_use} in use by another worker)" if in_use else "")
    )
    print(sweep.status_line(status.read()))
    for outcome in outcomes:
        if outcome["status"] != "done":
            state = "skipped (in use)" if outcome.get("in_use") else outcome["status"]
            print(f"  {state}: {outcome['job']}: {outcome['detail']}")
    logging.info("outcomes in %s", outcomes_path)
    if counts["failed"]:
        sys.exit(1)


def run() -> None:
    """Console-script entry point."""
    global _CONFIG
    _CONFIG = common.define_config("config", None, "Sweep configuration (configs/sweeps/*.py).")
    common.run(main, help_=config_help)


def config_help() -> str:
    keys = [
        (f.name, "required" if f.default is dataclasses.MISSING else repr(f.default), f.metadata["doc"])
        for f in dataclasses.fields(sweep.Sweep)
    ]
    return common.help_text(__doc__ or "", __name__, keys)


if __name__ == "__main__":
    run()
