r"""Score every human response of every participant with one model.

  python -m launch.score --config=configs/score.py --config.model=DIR --config.data=PATH \
      --config.out=DIR --config.protocol=reference|robust --config.template=none|chat \
      --config.persona=none|matched --config.dtype=float32|bfloat16

With no overrides it scores the bundled sample with the bundled tiny model (the embedded default).
Writes a results store (``<out>/manifest.json`` and atomically committed chunks of zarr arrays and
participant tables, see psych201_jax/results.py) with every input participant scored or rejected; a
restart with the same configuration resumes where it stopped.
"""

import os
import time

from absl import app
from ml_collections import config_flags

from psych201_jax import job

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                                                 "score.py"), "Scoring configuration.")


def main(argv):
    del argv
    cfg = _CONFIG.value
    progress = job.run(cfg)
    print(job.summarize(cfg.out))
    print(f"results in {cfg.out} ({progress.tokens} tokens scored in "
          f"{time.perf_counter() - progress.started:.1f}s)")


if __name__ == "__main__":
    app.run(main)
