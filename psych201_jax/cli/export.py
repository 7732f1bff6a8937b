r"""psych201-export: export a results directory as one JSON line per input participant.

  psych201-export --results=DIR --out=FILE.jsonl

Each line: {"study", "experiment", "participant", "nll": [...], "n_markers", "status", "reason", and the
span counters responses_text, responses_scored, lost_truncation, missed, runaway, merged, straddle}.
``nll`` holds the summed NLL of each scored response in text order (null for a response with no scorable
token); ``n_markers`` is the number of ``<<`` responses in the text. ``status``: ``scored``, ``unscored``
(nothing of it could be scored, e.g. every response beyond the character cut) or ``rejected``; ``reason``
counts every lost response and labelling problem. With the head's temperature grid: ``temperatures``,
``nll_t`` (one list per temperature, responses in the order of ``nll``), ``entropy`` (per response, summed
over its tokens, nats) and with options ``option_mass``. An incomplete run is refused unless
--allow_incomplete.

example:
  psych201-export --results=out/score-default --out=scores.jsonl
"""

import json

from absl import flags, logging

from psych201_jax.cli import common
from psych201_jax.conditions import Protocol
from psych201_jax.runs import store as results
from psych201_jax.types import SPAN_COUNTERS

_RESULTS = flags.DEFINE_string("results", None, "Results directory written by psych201_jax.cli.score.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output .jsonl file.", required=True)
_ALLOW_INCOMPLETE = flags.DEFINE_bool("allow_incomplete", False, "Export an incomplete (killed or running) run.")


def export_rows(results_dir: str):
    """One dict per committed participant (see the module docstring)."""
    determinants = results.read_manifest(results_dir).get("determinants", {})
    protocol = Protocol(determinants.get("protocol", "reference"))
    temperatures = determinants.get("temperatures") or []
    for row in results.iter_rows(results_dir):
        status, reason = results.outcome(row, protocol)
        out = {
            "study": row["study"],
            "experiment": row["experiment"],
            "participant": row["participant"],
            "nll": row.get("nll", []),
            "n_markers": row.get("responses_text"),
            "status": status,
            "reason": reason,
        }
        out.update({name: row[name] for name in SPAN_COUNTERS if name in row})
        if temperatures and "nll_t" in row:  # per temperature, the responses in the order of nll
            out["temperatures"] = temperatures
            out["nll_t"] = [list(per_t) for per_t in zip(*row["nll_t"])] if row["nll_t"] else [[] for _ in temperatures]
        for name in ("entropy", "option_mass"):
            if name in row:
                out[name] = row[name]
        yield out


def main(argv):
    del argv
    status = results.read_status(_RESULTS.value)  # fails clearly on a directory that is not a results dir
    if not status.complete:
        message = f"{_RESULTS.value}: {status.describe()}"
        if not _ALLOW_INCOMPLETE.value:
            raise results.ResultsError(
                f"{message}; finish it by rerunning its job, or pass --allow_incomplete to export what is there"
            )
        logging.warning("%s; exporting it (--allow_incomplete)", message)
    n = 0
    with open(_OUT.value, "w") as fh:
        for row in export_rows(_RESULTS.value):
            fh.write(json.dumps(row) + "\n")
            n += 1
    note = "" if status.complete else f" (incomplete run: {status.n_done} of {status.n_input or '?'} participants)"
    print(f"wrote {n} participants to {_OUT.value}{note}")


def run() -> None:
    """Console-script entry point."""
    common.run(main, help_=lambda: common.help_text(__doc__ or "", __name__))


if __name__ == "__main__":
    run()
