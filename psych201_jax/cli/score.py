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

from absl import app
from ml_collections import config_flags

from psych201_jax import console
from psych201_jax.runs import config, job

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    config.__file__,
    "Scoring configuration (default: the embedded default; configs/score.py is the same file for a checkout).",
)


def main(argv):
    del argv
    console.quiet_libraries()
    cfg = _CONFIG.value
    progress = job.run(cfg)
    print(job.summarize(cfg.out))
    print(f"results in {cfg.out} ({progress.tokens} tokens scored in {time.perf_counter() - progress.started:.1f}s)")


def run() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
