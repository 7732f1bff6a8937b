r"""Export a results directory as one JSON line per input participant.

  psych201-export --results=DIR --out=FILE.jsonl

Each line: {"study", "experiment", "participant", "nll": [...], "n_markers", "status": "scored"|"rejected",
"reason"}. ``nll`` holds the summed NLL of each scored response in text order (null for a response with
no scorable token); ``n_markers`` is the number of ``<<`` responses in the participant's text.
"""

import json

from absl import app, flags

from psych201_jax import console
from psych201_jax.runs import store as results

_RESULTS = flags.DEFINE_string("results", None, "Results directory written by launch.score.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output .jsonl file.", required=True)


def export_rows(results_dir: str):
    for row in results.iter_rows(results_dir):
        yield {
            "study": row["study"],
            "experiment": row["experiment"],
            "participant": row["participant"],
            "nll": row.get("nll", []),
            "n_markers": row.get("responses_text"),
            "status": row["status"],
            "reason": row.get("reason", ""),
        }


def main(argv):
    console.quiet_libraries()
    del argv
    results.read_manifest(_RESULTS.value)  # fails clearly on a directory that is not a results dir
    n = 0
    with open(_OUT.value, "w") as fh:
        for row in export_rows(_RESULTS.value):
            fh.write(json.dumps(row) + "\n")
            n += 1
    print(f"wrote {n} participants to {_OUT.value}")


def run() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
