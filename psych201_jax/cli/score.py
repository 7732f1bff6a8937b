r"""psych201-score: score every human response of every participant with one model.

Reads the data, turns every participant's transcript into token spans under the condition (protocol,
template, persona), scores the responses with the model on a device mesh and writes a results directory:
``<out>/manifest.json`` and atomically committed chunks holding every input participant, scored or
rejected with its reason. Rerunning the same command resumes where it stopped; a different configuration
is refused unless --config.fresh=True. With no overrides it scores the bundled sample with the bundled
tiny model (the embedded default).

example:
  psych201-score --config.model=/ckpt/Qwen3-8B-Base --config.data=/data/psych201 \
      --config.out=out/qwen3-8b-base --config.protocol=robust --config.dtype=bfloat16
"""

import time
from typing import Any

from psych201_jax.cli import common, score_config

_CONFIG: Any = None  # defined in run(): its overrides are parsed when it is defined


def build_job(cfg: Any):
    """The typed job of a ``--config`` value (the only place a score config dict is read)."""
    from psych201_jax.runs.config import ScoreJob

    return ScoreJob.from_mapping(cfg.to_dict())


def main(argv):
    del argv
    from psych201_jax.runs import compilation, job  # lazily: jax, flax and transformers load here, not for --help

    score_job = build_job(_CONFIG.value)
    progress = job.run(score_job)
    print(job.summarize(score_job.out))
    seconds = time.perf_counter() - progress.started
    print(
        f"results in {score_job.out} ({progress.tokens} tokens scored in {seconds:.1f}s, "
        f"{compilation.compile_seconds():.1f}s of it compiling)"
    )


def config_help() -> str:
    from psych201_jax.runs import config

    return common.help_text(__doc__ or "", __name__, config.documented_keys())


def run() -> None:
    """Console-script entry point."""
    global _CONFIG
    _CONFIG = common.define_config(
        "config",
        score_config.__file__,
        "Scoring configuration (default: the embedded default; configs/score.py is the same file for a checkout).",
    )
    common.run(main, help_=config_help)


if __name__ == "__main__":
    run()
