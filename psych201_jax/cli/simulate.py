r"""psych201-simulate: sample k responses at every human response slot, from the teacher-forced history.

Reads the data, builds every participant's tokens under the condition (protocol, template, persona) as
psych201-score does, and for each response slot draws ``samples`` continuations of the history up to and
including its opening marker ``<<`` (the human's own earlier responses stay in the history), each ending at
the closing marker ``>>``, EOS or ``max_new_tokens``. Writes a results directory like psych201-score's
(resumable, fingerprinted, locked): per participant and slot, the human response and each sample's tokens,
text, log-probability under the model and whether it stopped at the marker. ``psych201-export`` writes it
as JSON lines; ``psych201-analyze`` compares the samples with the human responses. With no overrides it
samples the bundled sample with the bundled tiny model.

This is not a closed-loop simulation of a task: the environment's feedback in the history comes from the
human's choices, not the model's.

example:
  psych201-simulate --config.model=/ckpt/Qwen3-8B-Base --config.data=/data/psych201 \
      --config.out=out/qwen3-8b-base-sim --config.samples=8 --config.temperature=1
  psych201-simulate ... --config.temperature=calibrated --config.calibration=out/qwen3-8b-base
"""

import time
from typing import Any

from psych201_jax.cli import common, simulate_config

_CONFIG: Any = None  # defined in run(): its overrides are parsed when it is defined


def build_job(cfg: Any):
    """The typed job of a ``--config`` value (the only place a simulate config dict is read)."""
    from psych201_jax.runs.config import SimulateJob

    return SimulateJob.from_mapping(cfg.to_dict())


def fitted_temperatures(job) -> tuple[float, float] | None:
    """The calibration run's cross-fitted temperatures, for ``temperature=calibrated`` (else None)."""
    if not job.simulation.calibrated:
        return None
    from psych201_jax.analysis import calibration

    return calibration.fitted_temperatures(job.simulation.calibration, job.score.seed)


def main(argv):
    del argv
    from psych201_jax.runs import compilation, simulate  # lazily: jax loads here, not for --help

    job = build_job(_CONFIG.value)
    progress = simulate.run(job, fitted=fitted_temperatures(job))
    seconds = time.perf_counter() - progress.started
    print(
        f"results in {job.out}: {progress.participants} participants, {progress.branches} samples, "
        f"{progress.generated} tokens generated in {seconds:.1f}s ({progress.rates()}; "
        f"{compilation.compile_seconds():.1f}s compiling)"
    )


def config_help() -> str:
    from psych201_jax.runs import config

    return common.help_text(__doc__ or "", __name__, config.documented_keys("simulate"))


def run() -> None:
    """Console-script entry point."""
    global _CONFIG
    _CONFIG = common.define_config(
        "config", simulate_config.__file__, "Simulation configuration (default: the embedded default)."
    )
    common.run(main, help_=config_help)


if __name__ == "__main__":
    run()
