r"""Expand a sweep (model pairs × conditions) into scoring jobs and run them.

  psych201-sweep --config=configs/sweeps/<name>.py [--dry_run] [--emit=local|tpu|slurm]

local: runs the jobs one after another (``launch.score`` subprocesses), skipping completed ones and
recording failed ones without stopping; writes ``<out_root>/sweep_outcomes.json``.
tpu / slurm: writes ``<out_root>/sweep_<emit>.sh`` with one command per job (all TPU workers via
``gcloud compute tpus tpu-vm ssh --worker=all``, or a SLURM array with ``srun``).
--dry_run lists the jobs (and why any is skipped) without running anything.
"""

import os
import sys
from typing import Any

from absl import app, flags, logging

from psych201_jax.cli import common
from psych201_jax.runs import sweep

_CONFIG: Any = None  # defined in run(): its overrides are parsed when it is defined
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the jobs only.")
_EMIT = flags.DEFINE_enum("emit", "local", ["local", "tpu", "slurm"], "Run locally or write job commands.")


def main(argv):
    del argv
    cfg = _CONFIG.value
    if cfg is None:
        raise app.UsageError("--config=configs/sweeps/<name>.py is required")
    jobs = sweep.expand(cfg)
    overrides = dict(cfg.score) if "score" in cfg else {}
    print(f"sweep {cfg.name}: {len(jobs)} jobs ({sum(bool(j.skip_reason) for j in jobs)} skipped) → {cfg.out_root}")
    if _DRY_RUN.value:
        for job in jobs:
            state = (
                ("skip: " + job.skip_reason) if job.skip_reason else ("complete" if sweep.is_complete(job) else "todo")
            )
            print(f"  {job.name:<70} {state}")
        wrong = sweep.problems(jobs, cfg.data)
        for line in wrong:
            print(f"  problem: {line}")
        if wrong:
            raise sweep.SweepError(f"{len(wrong)} problem(s) in sweep {cfg.name} (listed above)")
        return
    os.makedirs(cfg.out_root, exist_ok=True)
    if _EMIT.value != "local":
        path = os.path.join(cfg.out_root, f"sweep_{_EMIT.value}.sh")
        with open(path, "w") as fh:
            fh.write(sweep.emit_commands(jobs, cfg.data, overrides, _EMIT.value))
        print(f"wrote {path}")
        return
    progress, outcomes = sweep.run_local(jobs, cfg.data, overrides, log_dir=os.path.join(cfg.out_root, "logs"))
    sweep.write_outcomes(os.path.join(cfg.out_root, "sweep_outcomes.json"), outcomes)
    print(progress.line())
    for outcome in outcomes:
        if outcome["status"] != "done":
            print(f"  {outcome['status']}: {outcome['job']}: {outcome['detail']}")
    logging.info("outcomes in %s", os.path.join(cfg.out_root, "sweep_outcomes.json"))
    if progress.failed:
        sys.exit(1)


def run() -> None:
    """Console-script entry point."""
    global _CONFIG
    _CONFIG = common.define_config("config", None, "Sweep configuration (configs/sweeps/*.py).")
    common.run(main)


if __name__ == "__main__":
    run()
