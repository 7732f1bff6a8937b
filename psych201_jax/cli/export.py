r"""psych201-export: export a results directory as one JSON line per input participant, or results
directories as the study's own layout.

  psych201-export --results=DIR --out=FILE.jsonl
  psych201-export --format=reference --results=DIR [--results=DIR ...] --out=FOLDER

Each line: {"study", "experiment", "participant", "nll": [...], "n_markers", "status", "reason", and the
span counters responses_text, responses_scored, lost_truncation, missed, runaway, merged, straddle}.
``nll`` holds the summed NLL of each scored response in text order (null for a response with no scorable
token); ``n_markers`` is the number of ``<<`` responses in the text. ``status``: ``scored``, ``unscored``
(nothing of it could be scored, e.g. every response beyond the character cut) or ``rejected``; ``reason``
counts every lost response and labelling problem. With the head's temperature grid: ``temperatures``,
``nll_t`` (one list per temperature, responses in the order of ``nll``), ``entropy`` (per response, summed
over its tokens, nats) and with options ``option_mass``. ``argmax`` and ``target``: per scored token (the
responses' tokens in the order of ``nll``, ``n_scored`` of them per response), the model's top token and the
human token (their equality is the study's per-token accuracy). A simulation (``psych201-simulate``)
exports {"study", "experiment", "participant", "status" (sampled | rejected), "reason", "slots": [{"human",
"human_tokens", "temperature", "samples": [{"tokens", "text", "logprob", "stopped"}]}]}, slots in text
order; a sample's tokens and text exclude its closing marker, ``human_tokens`` are the tokens the scorer
labels for that response, ``logprob`` is the model's (T = 1) log-probability of all it drew. An incomplete
run is refused unless --allow_incomplete.

--format=reference writes the trees and merged CSVs the study's scripts read (``eval.py``'s
``data/<study>/<model>.pth``, ``data_acc/``, ``data_meta/``, ``data_instruct/`` and
``csvs/full_data_jureca_<dir>.csv``; psych201_jax/analysis/reference_layout.py says which run goes where).

example:
  psych201-export --results=out/score-default --out=scores.jsonl
  psych201-export --format=reference --results=out/sweeps/psych201_paper --out=psych201_layout
"""

import json
import os

from absl import flags, logging

from psych201_jax import paths
from psych201_jax.analysis import reference_layout
from psych201_jax.cli import common
from psych201_jax.runs import store as results
from psych201_jax.types import SPAN_COUNTERS

_RESULTS = flags.DEFINE_multi_string(
    "results",
    None,
    "Results directory written by psych201_jax.cli.score (--format=reference: repeatable, or a folder of them)",
    required=True,
)
_OUT = flags.DEFINE_string("out", None, "Output .jsonl file (--format=reference: output folder).", required=True)
_FORMAT = flags.DEFINE_enum(
    "format",
    "jsonl",
    ["jsonl", "reference"],
    "jsonl: one line per participant; reference: the study's data*/<study>/<model>.pth trees and merged CSVs.",
)
_ALLOW_INCOMPLETE = flags.DEFINE_bool("allow_incomplete", False, "Export an incomplete (killed or running) run.")


def export_rows(results_dir: str):
    """One dict per committed participant (see the module docstring)."""
    if results.is_simulation(results_dir):
        yield from simulation_rows(results_dir)
        return
    determinants = results.read_manifest(results_dir).get("determinants", {})
    protocol = results.manifest_protocol(results_dir)
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
        for name in ("argmax", "target"):  # per scored token
            if name in row:
                out[name] = row[name]
        yield out


def simulation_rows(results_dir: str):
    """One dict per committed participant of a simulation: identity, status, reason and its slots."""
    for row in results.iter_rows(results_dir):
        out = {key: row[key] for key in ("study", "experiment", "participant", "status")}
        out["reason"] = row.get("reason", "")
        out["slots"] = [
            {
                "human": slot["human"],
                "human_tokens": slot["human_tokens"],
                "temperature": slot["temperature"],
                "samples": [{k: x[k] for k in ("tokens", "text", "logprob", "stopped")} for x in slot["samples"]],
            }
            for slot in row.get("slots", [])
        ]
        yield out


def _checked_status(results_dir: str) -> results.RunStatus:
    status = results.read_status(results_dir)  # fails clearly on a directory that is not a results dir
    if not status.complete:
        message = f"{results_dir}: {status.describe()}"
        if not _ALLOW_INCOMPLETE.value:
            raise results.ResultsError(
                f"{message}; finish it by rerunning its job, or pass --allow_incomplete to export what is there"
            )
        logging.warning("%s; exporting it (--allow_incomplete)", message)
    return status


def _export_reference(out: str) -> None:
    dirs = [d for entry in _RESULTS.value for d in _results_dirs(paths.normalize(entry))]
    simulations = {d for d in dirs if results.is_simulation(d)}
    for d in sorted(simulations):
        print(f"skipped {d}: a simulation (sampled responses); the study's layout holds scores only")
    dirs = [d for d in dirs if d not in simulations]
    for d in dirs:
        _checked_status(d)
    try:
        summary = reference_layout.export_reference(dirs, out)
    except OSError as err:
        raise results.ResultsError(f"cannot write under {err.filename or out}: {err.strerror}") from None
    for note in summary.skipped:
        print(f"skipped {note}")
    print(
        f"wrote {len(summary.pth_files)} .pth files and {len(summary.csv_files)} merged CSVs under {out} "
        f"from {len(dirs) - len(summary.skipped)} of {len(dirs)} results directories"
    )


def _results_dirs(path: str) -> list[str]:
    """``path`` if it is a results directory, else the results directories under it."""
    if os.path.isfile(os.path.join(path, results.MANIFEST)):
        return [path]
    found = sorted(root for root, _, files in os.walk(path) if results.MANIFEST in files)
    if not found:
        raise results.ResultsError(f"{path}: no results directory (manifest.json) found")
    return found


def main(argv):
    del argv
    out = paths.normalize(_OUT.value)
    if _FORMAT.value == "reference":
        _export_reference(out)
        return
    if len(_RESULTS.value) != 1:
        raise results.ResultsError("--format=jsonl exports one results directory; pass --results once")
    results_dir = paths.normalize(_RESULTS.value[0])
    status = _checked_status(results_dir)
    try:
        fh = open(out, "w")  # before the export: a bad --out fails at once, naming it
    except OSError as err:
        raise results.ResultsError(f"cannot write {out}: {err.strerror}") from None
    n = 0
    with fh:
        for row in export_rows(results_dir):
            fh.write(json.dumps(row) + "\n")
            n += 1
    note = "" if status.complete else f" (incomplete run: {status.n_done} of {status.n_input or '?'} participants)"
    print(f"wrote {n} participants to {out}{note}")


def run() -> None:
    """Console-script entry point."""
    common.run(main, help_=lambda: common.help_text(__doc__ or "", __name__))


if __name__ == "__main__":
    run()
