r"""Score every human response of every participant with one model.

  psych201-score --config=configs/score.py --config.model=DIR --config.data=PATH \
      --config.out=DIR --config.protocol=reference|robust --config.template=none|chat \
      --config.persona=none|matched --config.dtype=float32|bfloat16

With no overrides it scores the bundled sample with the bundled tiny model (the embedded default).
Writes a results store (``<out>/manifest.json`` and atomically committed chunks of zarr arrays and
participant tables, see psych201_jax/runs/store.py) with every input participant scored or rejected; a
restart with the same configuration resumes where it stopped.
"""

import time
from typing import Any

from psych201_jax.cli import common
from psych201_jax.runs import config

_CONFIG: Any = None  # defined in run(): its overrides are parsed when it is defined


def main(argv):
    del argv
    from psych201_jax.runs import job  # lazily: jax, flax and transformers load here, not for --help

    cfg = _CONFIG.value
    progress = job.run(cfg)
    print(job.summarize(cfg.out))
    seconds = time.perf_counter() - progress.started
    print(
        f"results in {cfg.out} ({progress.tokens} tokens scored in {seconds:.1f}s, "
        f"{job.compile_seconds():.1f}s of it compiling)"
    )


def run() -> None:
    """Console-script entry point."""
    global _CONFIG
    _CONFIG = common.define_config(
        "config",
        config.__file__,
        "Scoring configuration (default: the embedded default; configs/score.py is the same file for a checkout).",
    )
    common.run(main)


if __name__ == "__main__":
    run()
