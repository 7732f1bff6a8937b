"""Finding and loading results directories as ``metrics.Run``; one run per model and condition; the
condition the figures show. Simulation directories (``psych201-simulate``: samples, not scores) are found too and
told apart (``split_simulations``); ``analysis.simulated`` reads them."""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence

from absl import logging

from psych201_jax import defaults
from psych201_jax.analysis import domains, metrics
from psych201_jax.conditions import Condition, Persona, Protocol, Template
from psych201_jax.errors import UserError
from psych201_jax.runs import store as results

CATEGORIES_CSV = defaults.CATEGORIES_CSV


class IncompleteRunError(UserError):
    """A results directory of a job that has not finished."""


class NoResultsError(UserError, ValueError):
    """A path holds no results directory."""


# The study's own result trees (eval*.py) and its merged CSVs, read by ``reference_layout.read_reference``.
STUDY_TREES = ("data", "data_acc", "data_meta", "data_instruct")


def split_sources(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """(this project's results paths, paths in the study's own layout) of comma-list ``paths``: a ``.csv``
    file, or a folder named ``data``, ``data_acc``, ``data_meta`` or ``data_instruct`` or holding one, with no
    results directory (manifest.json) anywhere below it, is the study's."""
    ours: list[str] = []
    theirs: list[str] = []
    for entry in paths:
        for path in (p.strip() for p in entry.split(",")):
            if not path:
                continue
            name = os.path.basename(os.path.normpath(path))
            study = (os.path.isfile(path) and path.endswith(".csv")) or (
                os.path.isdir(path)
                and (name in STUDY_TREES or any(os.path.isdir(os.path.join(path, t)) for t in STUDY_TREES))
                and not any(results.MANIFEST in files for _, _, files in os.walk(path))
            )
            (theirs if study else ours).append(path)
    return ours, theirs


def find_results_dirs(paths: Sequence[str]) -> list[str]:
    """Results directories from paths that are results dirs, comma lists, or folders holding them
    (any subfolder with a manifest.json). Raises ValueError when a path yields none."""
    found = []
    for entry in paths:
        for path in (p.strip() for p in entry.split(",")):
            if not path:
                continue
            if os.path.isfile(os.path.join(path, results.MANIFEST)):
                found.append(os.path.abspath(path))
                continue
            inside = []
            for root, dirs, files in os.walk(path):
                dirs.sort()
                if results.MANIFEST in files:
                    inside.append(os.path.abspath(root))
                    dirs.clear()
            if not inside:
                raise NoResultsError(f"{path}: no results directory (manifest.json) found")
            found.extend(inside)
    return list(dict.fromkeys(found))


class NotScoringRunError(UserError):
    """A results directory that holds samples (a simulation), not scores."""


def split_simulations(dirs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(scoring results dirs, simulation results dirs) of ``dirs``, in order."""
    scoring: list[str] = []
    simulations: list[str] = []
    for d in dirs:
        (simulations if results.is_simulation(d) else scoring).append(d)
    return scoring, simulations


def load_run(path: str) -> metrics.Run:
    """One scoring results directory (``psych201_jax.runs.store`` layout) as an ``metrics.Run``; a simulation
    directory is a ``NotScoringRunError`` (``simulated.load_simulation`` reads those)."""
    manifest = results.read_manifest(path)
    if results.simulates(manifest):
        raise NotScoringRunError(f"{path}: a simulation results directory (samples, not scores); not a scoring run")
    if not manifest.get("config", {}).get("model_info"):
        logging.warning(
            "%s: manifest has no config.model_info; the model is labelled by its path and left out of pairs", path
        )
    run = metrics.run_from_rows(manifest, results.iter_rows(path), path)
    n_input = manifest.get("n_input")
    return dataclasses.replace(
        run,
        complete=results.read_complete(path) is not None,
        n_done=len(run.participants) + run.n_rejected,  # every committed row, read once
        n_input=n_input if isinstance(n_input, int) else None,
    )


def load_categories(path: str = CATEGORIES_CSV) -> domains.Categories:
    """The study category CSV (bundled copy of the reference's by default)."""
    with open(path, newline="") as fh:
        return domains.parse_categories(csv.DictReader(fh))


class ModelIdentityError(UserError):
    """Two results directories label different weights with one model id."""


# How far the NLLs of a plain run and an accuracy run (options=study) of one NLL condition may differ: they share
# the forward pass but not the head program (tests/test_paper_definitions.py checks it on the bundled model).
HEAD_NLL_TOLERANCE = 1.5e-5


def dedupe(runs: Sequence[metrics.Run]) -> tuple[list[metrics.Run], list[str]]:
    """One run per (model, condition), in input order of the kept runs; returns them and notes on the others.

    Identity: runs are grouped by model id AND model fingerprint (``metrics.model_fingerprint``: the scored
    weights' hashes from the manifest). Two runs of one id and condition whose fingerprints differ are a
    ``ModelIdentityError`` naming both directories: another model's results under this model's name, never
    resolved by keeping one. A run without a fingerprint (older manifests) matches any.

    Which run supplies the NLLs: a complete run wins over an incomplete one; among complete runs, the plain run
    (``options`` none) wins over an accuracy run (``options=study``), then the first in input order. The
    others' NLLs are not used: a plain and an accuracy run of one condition share the forward pass but not the
    head program, so their NLLs may differ by up to ``HEAD_NLL_TOLERANCE``. A complete other run lends the kept
    run the head outputs it lacks (option choices, the temperature grid)."""
    best: dict[tuple[str, Condition], metrics.Run] = {}
    fingerprinted: dict[tuple[str, Condition], metrics.Run] = {}  # the first run of each key with a fingerprint
    for run in runs:
        key = (run.model, run.condition)
        first = fingerprinted.setdefault(key, run) if run.model_fingerprint else None
        if first is not None and first.model_fingerprint != run.model_fingerprint:
            raise ModelIdentityError(
                f"{first.path} and {run.path} both hold model {run.model!r} under one condition but were scored "
                f"from different weights (model fingerprints {first.model_fingerprint[:60]} vs "
                f"{run.model_fingerprint[:60]}); give one of them its own id (--config.model_info.hf_id) and "
                f"rescore, or analyse them apart"
            )
        kept = best.get(key)
        if kept is None or _preference(run) > _preference(kept):
            best[key] = run
    merged = dict(best)
    notes = []
    for r in runs:
        kept = best[(r.model, r.condition)]
        if kept is r:
            continue
        if r.complete and kept.complete:
            merged[(r.model, r.condition)] = _lend_head_outputs(merged[(r.model, r.condition)], r)
            notes.append(
                f"{r.path}: same model and condition as {kept.path} (options {r.options} vs {kept.options}); the "
                f"NLLs are {kept.path}'s, only its head outputs (options, temperatures) are used"
            )
        else:
            notes.append(f"{r.path}: same model and condition as {kept.path} ({r.status()}); ignored")
    kept_runs = [merged[(r.model, r.condition)] for r in runs if best[(r.model, r.condition)] is r]
    return kept_runs, notes


def _preference(run: metrics.Run) -> tuple[bool, bool]:
    """Which run of one model and condition supplies the NLLs: complete first, then the plain run."""
    return (run.complete, run.options == "none")


def _lend_head_outputs(kept: metrics.Run, other: metrics.Run) -> metrics.Run:
    """``kept`` with the temperature grid and option choices ``other`` has and it lacks, per participant."""
    by_key = {p.key: p for p in other.participants}
    parts = []
    for p in kept.participants:
        q = by_key.get(p.key)
        fill: dict = {}
        if q is not None and p.nll_t is None and q.nll_t is not None and other.temperatures:
            fill.update(nll_t=q.nll_t, entropy=q.entropy)
        if q is not None and p.n_option_correct is None and q.n_option_correct is not None:
            fill.update(n_option_correct=q.n_option_correct, n_option_tokens=q.n_option_tokens)
        parts.append(dataclasses.replace(p, **fill) if fill else p)
    temperatures = kept.temperatures or (other.temperatures if any(p.nll_t is not None for p in parts) else ())
    return dataclasses.replace(kept, participants=tuple(parts), temperatures=temperatures)


def primary_condition(runs: Sequence[metrics.Run]) -> Condition | None:
    """The condition the figures show: without persona, preferring the reference protocol without a
    template (the paper's main setting), then the one with most runs."""
    counts: dict[Condition, int] = {}
    for run in runs:
        counts[run.condition] = counts.get(run.condition, 0) + 1
    plain = [c for c in counts if c.persona == Persona.NONE] or list(counts)
    if not plain:
        return None
    return max(
        plain,
        key=lambda c: (
            c.protocol == Protocol.REFERENCE and c.template == Template.NONE and not c.persona_subset,
            counts[c],
            str(tuple(c.values(Condition.ANALYSIS_FIELDS).values())),
        ),
    )
