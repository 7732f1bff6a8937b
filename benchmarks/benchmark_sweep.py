r"""Sweep overhead: the tiny sweep's wall time against one plain ``psych201_jax.cli.score`` of the same model and data.

  python -m benchmarks.benchmark_sweep [--out=b.json]

Both run as fresh processes in this run, on fresh results directories, with the persistent compilation
cache off (so neither profits from earlier runs): the plain job scores the bundled base model on the
tiny sweep's data; the sweep runs its 13 jobs (2 models x 7 conditions, of which plain and accuracy share
a forward pass). Reports both wall times, their ratio, and the model restores the sweep's workers counted
(``sweep_status.json``). A ratio, never a timed assertion.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from configs.sweeps import tiny
from psych201_jax.runs import sweep

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "", "Optional JSON file for the numbers.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _wall(*args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main(argv):
    del argv
    cfg = tiny.get_config()
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "sweep_config.py")
        with open(config, "w") as fh:
            fh.write(
                "from configs.sweeps import tiny\n"
                "def get_config():\n"
                "    c = tiny.get_config()\n"
                f"    c.out_root = {os.path.join(tmp, 'sweep')!r}\n"
                "    c.score = dict(c.score, compile_cache='')\n"
                "    return c\n"
            )
        plain = _wall(
            "psych201_jax.cli.score",
            f"--config.data={cfg.data}",
            f"--config.out={os.path.join(tmp, 'plain')}",
            "--config.compile_cache=",
        )
        swept = _wall("psych201_jax.cli.sweep", f"--config={config}")
        status = sweep.SweepStatus(os.path.join(tmp, "sweep"), cfg.name).read()
    jobs = [j for j in sweep.expand(cfg) if not j.skip_reason]
    out = {
        "plain_score_wall_s": plain,
        "sweep_wall_s": swept,
        "sweep_over_plain": swept / plain,
        "jobs": len(jobs),
        "models": len(sweep.models_of(jobs)),
        "restores": sum(m["restores"] for m in status["models"].values()),
    }
    print(json.dumps(out, indent=1))
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    app.run(main)
