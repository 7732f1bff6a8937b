"""The study's own result layout, both ways: ``export_reference`` writes this project's results directories as
the ``data*/<study>/<model>.pth`` trees and merged CSVs the study's scripts read; ``read_reference`` reads such
trees and CSVs (the published runs, or an export) as ``metrics.Run``s.

The layout (docs/reference-protocol.md; the study's ``0_analyses``):

  data/<study>/<model>.pth           eval.py: {participant key: 1-D tensor, summed NLL per response in text order}
  data_acc/<study>/<model>.pth       eval_accuracy.py: {key: 1-D float32 tensor, 0/1 per scored token, argmax ==
                                     the human token}
  data_meta/<study>/<model>.pth      eval_meta.py: as data/, the persona (own metadata) runs
  data_instruct/<study>/<model>.pth  eval_instruct.py: as data/, the chat-template runs
  csvs/full_data_jureca_<dir>.csv    csvs/full_merge_jureca.py: columns directory, experiment, model, participant,
                                     trial, nll (``nll`` holds the 0/1 accuracies for data_acc), experiment
                                     "../data/<study>", model "<file name>.pth"

``<study>`` is the study with ``/`` -> ``-``; ``<model>`` the HF id with ``/`` -> ``-``.

Which run goes where (by its condition; the reference protocol only): no template, no persona, no persona
subset -> ``data/`` (``options=study``: ``data_acc/`` instead); ``persona=matched`` -> ``data_meta/``;
``template=chat`` -> ``data_instruct/``. Other conditions (robust, shuffled persona, persona subset) have no
place in the study's layout and are skipped with a note. The model id is the manifest's
``config.model_info.hf_id``.

Participant keys: in the HF layout the stored participant is ``participant_reindexed``, the key eval.py uses.
Raw per-study files (no such field) key a participant by its ``participant`` field; when two experiments of a
study share a participant id, every key of that study becomes ``<experiment>/<participant>``.
The ``.pth`` files are written by ``torch_pickle.save`` (torch's zip format; torch is not needed).
Values: NLLs are written as float64 tensors (our numbers unrounded; the study's own files hold bf16-rounded
sums, the scripts read either through ``.tolist()``); a response with no scored token (null in our store) has no
entry, as in eval.py, whose responses are the labelled runs; a participant with none is an empty tensor; a
rejected participant is left out. The merged CSVs hold every exported model (the study's script keeps only the
models it lists) and, as that script does, only the studies with a ``data/`` folder.

Imported runs: ``Run.path`` starts with ``IMPORTED`` (``imported:<file or tree>#<dir>/<model file>``); their
condition is the study's (reference protocol, bfloat16, the HF test or discrete test set; see ``CONDITIONS``); the
model's info comes from the paper sweep's model table (configs/sweeps/psych201_paper.py) when it lists the id,
else from a user mapping {hf_id: {family, generation, size_b, kind, base_hf_id}} (a JSON file or a dict), else an
unpaired label (the file name). Imported accuracy runs carry no NLLs; their per-token correctness is given to
``run_from_rows`` as ``argmax`` = the 0/1 values and ``target`` = ones.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging

from psych201_jax import defaults, torch_pickle
from psych201_jax.analysis import metrics
from psych201_jax.conditions import Condition, OptionsMode, Persona, Protocol, Template
from psych201_jax.errors import UserError
from psych201_jax.runs import store

__all__ = [
    "CONDITIONS",
    "CSV_COLUMNS",
    "DIRECTORIES",
    "IMPORTED",
    "MERGED_CSV",
    "ExportSummary",
    "ReferenceLayoutError",
    "directory_of",
    "export_reference",
    "is_imported",
    "model_file",
    "read_reference",
]

DIRECTORIES = ("data", "data_acc", "data_meta", "data_instruct")
MERGED_CSV = {d: f"full_data_jureca_{d}.csv" for d in DIRECTORIES}  # full_merge_jureca.py's output names
CSV_COLUMNS = ("directory", "experiment", "model", "participant", "trial", "nll")
IMPORTED = "imported:"
_TEST = "hf:marcelbinz/Psych-201-test"
_DISCRETE = "hf:marcelbinz/Psych-201-discrete-test"
# The condition each directory's runs were scored under (the study's scripts: bf16, the HF test sets).
CONDITIONS = {
    "data": dict(protocol="reference", template="none", persona="none", options="none", dtype="bfloat16", data=_TEST),
    "data_acc": dict(
        protocol="reference", template="none", persona="none", options="study", dtype="bfloat16", data=_DISCRETE
    ),
    "data_meta": dict(
        protocol="reference", template="none", persona="matched", options="none", dtype="bfloat16", data=_TEST
    ),
    "data_instruct": dict(
        protocol="reference", template="chat", persona="none", options="none", dtype="bfloat16", data=_TEST
    ),
}
PAPER_SWEEP = os.path.join(os.path.dirname(defaults.PACKAGE_DIR), "configs", "sweeps", "psych201_paper.py")


class ReferenceLayoutError(UserError, ValueError):
    """A results directory or study tree that cannot be exported or read."""


def is_imported(run: metrics.Run) -> bool:
    return run.path.startswith(IMPORTED)


def model_file(hf_id: str) -> str:
    """The study's file name for a model: the HF id with ``/`` -> ``-``, plus ``.pth``."""
    return hf_id.replace("/", "-") + ".pth"


def directory_of(condition: Condition) -> str | None:
    """The study's directory for a run of ``condition`` (None: the layout has no place for it)."""
    if condition.protocol != Protocol.REFERENCE or condition.persona_subset:
        return None
    if condition.template == Template.NONE and condition.persona == Persona.NONE:
        return "data_acc" if condition.options == OptionsMode.STUDY else "data"
    if condition.template == Template.NONE and condition.persona == Persona.MATCHED:
        return "data_meta"
    if condition.template == Template.CHAT and condition.persona == Persona.NONE:
        return "data_instruct"
    return None


# ------------------------------------------------------------------------------------------- export


@dataclasses.dataclass
class ExportSummary:
    """What ``export_reference`` wrote: .pth files, CSV paths, skipped runs (with why)."""

    pth_files: list[str] = dataclasses.field(default_factory=list)
    csv_files: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)


def _values(row: dict, directory: str) -> list[float] | None:
    """A stored row's vector in the study's form (None: left out, a rejected participant)."""
    if row.get("status") != "scored":
        return None
    if directory == "data_acc":
        argmax, target = row.get("argmax") or [], row.get("target") or []
        return [float(a == t) for a, t in zip(argmax, target)]
    return [float(x) for x in row.get("nll") or [] if x is not None and not math.isnan(x)]


def _keys(rows: Sequence[dict]) -> list[str]:
    """Participant keys of one study's rows (see the module docstring)."""
    plain = [str(r["participant"]) for r in rows]
    if len(set(plain)) == len(plain):
        return plain
    return [f"{r.get('experiment', '')}/{r['participant']}" for r in rows]


def _study_vectors(results_dir: str, directory: str) -> dict[str, dict[str, list[float]]]:
    """Study folder name -> {participant key: vector} of one results directory, in row order."""
    by_study: dict[str, list[dict]] = collections.defaultdict(list)
    for row in store.iter_rows(results_dir):
        by_study[str(row["study"]).replace("/", "-")].append(row)
    out: dict[str, dict[str, list[float]]] = {}
    for study, rows in by_study.items():
        vectors: dict[str, list[float]] = {}
        for key, row in zip(_keys(rows), rows):
            values = _values(row, directory)
            if values is not None:
                if key in vectors:
                    raise ReferenceLayoutError(f"{results_dir}: participant {key!r} of {study} appears twice")
                vectors[key] = values
        out[study] = vectors
    return out


def export_reference(results_dirs: Iterable[str], out_dir: str) -> ExportSummary:
    """Writes ``results_dirs`` as the study's layout under ``out_dir`` (the module docstring): the ``data*``
    trees (``torch_pickle.save``: torch's zip format, written without torch) and
    ``csvs/full_data_jureca_<dir>.csv``. Refuses two runs that land on one file. Returns what was written."""
    summary = ExportSummary()
    # (directory, study, model file) -> {key: vector}
    tables: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    origin: dict[tuple[str, str], str] = {}
    for results_dir in results_dirs:
        manifest = store.read_manifest(results_dir)
        config = manifest.get("config", {})
        directory = directory_of(Condition.from_mapping(config))
        if directory is None:
            summary.skipped.append(f"{results_dir}: its condition has no place in the study's layout")
            continue
        hf_id = (config.get("model_info") or {}).get("hf_id")
        if not hf_id:
            summary.skipped.append(f"{results_dir}: the manifest has no config.model_info.hf_id")
            continue
        fname = model_file(hf_id)
        if (directory, fname) in origin:
            raise ReferenceLayoutError(
                f"{results_dir} and {origin[directory, fname]} both export to {directory}/<study>/{fname}"
            )
        origin[directory, fname] = results_dir
        for study, vectors in _study_vectors(results_dir, directory).items():
            tables[directory, study, fname] = vectors
    for (directory, study, fname), vectors in sorted(tables.items()):
        folder = os.path.join(out_dir, directory, study)
        os.makedirs(folder, exist_ok=True)
        dtype = np.float32 if directory == "data_acc" else np.float64
        path = os.path.join(folder, fname)
        torch_pickle.save(path, {k: np.asarray(v, dtype=dtype) for k, v in vectors.items()})
        summary.pth_files.append(path)
    studies = {s for (d, s, _) in tables if d == "data"}
    if os.path.isdir(os.path.join(out_dir, "data")):
        studies |= {
            s for s in os.listdir(os.path.join(out_dir, "data")) if os.path.isdir(os.path.join(out_dir, "data", s))
        }
    csv_dir = os.path.join(out_dir, "csvs")
    os.makedirs(csv_dir, exist_ok=True)
    for directory in DIRECTORIES:
        path = os.path.join(csv_dir, MERGED_CSV[directory])
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            for (d, study, fname), vectors in sorted(tables.items()):
                if d != directory or study not in studies:
                    continue
                experiment = os.path.join("..", "data", study)
                for key, values in vectors.items():
                    writer.writerows([d, experiment, fname, key, i, repr(v)] for i, v in enumerate(values))
        summary.csv_files.append(path)
    return summary


# --------------------------------------------------------------------------------------------- import


def _load_python(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("_psych201_paper_sweep", path)
    if spec is None or spec.loader is None:
        raise ReferenceLayoutError(f"{path}: cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paper_models(path: str = PAPER_SWEEP) -> dict[str, dict]:
    """hf_id -> model info of the paper sweep's model table (empty when the config is not beside the package,
    e.g. an installed wheel)."""
    if not os.path.isfile(path):
        return {}
    return {m["hf_id"]: m for m in _load_python(path).models()}


def model_infos(model_table: str | Mapping[str, Mapping] | None = None) -> dict[str, dict]:
    """hf_id -> info: the paper sweep's table, then the user's mapping (a JSON file or dict) for ids it lacks."""
    table = paper_models()
    user: Mapping[str, Mapping] = {}
    if isinstance(model_table, str):
        with open(model_table) as fh:
            user = json.load(fh)
        if not isinstance(user, dict) or not all(isinstance(v, dict) for v in user.values()):
            raise ReferenceLayoutError(f"{model_table}: expected a JSON object {{hf_id: {{family, generation, ...}}}}")
    elif model_table is not None:
        user = model_table
    out = {
        k: {f: v for f, v in m.items() if f in ("family", "generation", "size_b", "kind", "base_hf_id")}
        for k, m in table.items()
    }
    for hf_id, info in user.items():
        out.setdefault(hf_id, dict(info))
    return {k: {**v, "hf_id": k} for k, v in out.items()}


def _info_for(fname: str, infos: Mapping[str, dict], where: str) -> dict:
    stem = fname[: -len(".pth")] if fname.endswith(".pth") else fname
    by_file = {model_file(h)[: -len(".pth")]: h for h in infos}
    if stem in by_file:
        return infos[by_file[stem]]
    logging.warning("%s: model %s is in neither the paper's model table nor the mapping; unpaired", where, stem)
    return {"hf_id": stem}


def _run(where: str, directory: str, fname: str, info: dict, data: Mapping[str, Mapping[str, Sequence[float]]]):
    """A ``metrics.Run`` from study -> {key: values} of one directory and model file."""
    rows = []
    for study, vectors in data.items():
        for key, values in vectors.items():
            row: dict[str, Any] = {"study": study, "experiment": study, "participant": str(key), "status": "scored"}
            if directory == "data_acc":
                correct = np.rint(np.asarray(values, dtype=np.float64)).astype(np.int64)
                row.update(nll=[], argmax=correct.tolist(), target=[1] * correct.size)
            else:
                row.update(nll=[float(v) for v in values], argmax=[], target=[])
            rows.append(row)
    manifest = {"config": {"model_info": info, **CONDITIONS[directory]}, "determinants": {}}
    run = metrics.run_from_rows(manifest, rows, f"{IMPORTED}{where}#{directory}/{fname}")
    n = len(run.participants)
    return dataclasses.replace(run, complete=True, n_done=n, n_input=n)


def _vector(path: str, value: Any) -> list[float]:
    if isinstance(value, np.ndarray) and value.ndim <= 1:
        return [float(v) for v in value.astype(np.float64).reshape(-1)]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
        return [float(v) for v in value]
    raise ReferenceLayoutError(f"{path}: a participant's value is not a 1-D tensor ({type(value).__name__})")


def _read_tree(root: str, directory: str, infos: Mapping[str, dict]) -> list[metrics.Run]:
    by_model: dict[str, dict[str, dict[str, list[float]]]] = collections.defaultdict(dict)
    for study in sorted(os.listdir(root)):
        folder = os.path.join(root, study)
        if not os.path.isdir(folder):
            continue
        for fname in sorted(f for f in os.listdir(folder) if f.endswith(".pth")):
            path = os.path.join(folder, fname)
            obj = torch_pickle.load(path)
            if not isinstance(obj, dict):
                raise ReferenceLayoutError(
                    f"{path}: expected a dict of participant -> tensor, got {type(obj).__name__}"
                )
            by_model[fname][study] = {str(k): _vector(path, v) for k, v in obj.items()}
    return [_run(root, directory, f, _info_for(f, infos, root), by_model[f]) for f in sorted(by_model)]


def _read_csv(path: str, infos: Mapping[str, dict]) -> list[metrics.Run]:
    # (directory, model file) -> study -> key -> [(trial, value)]
    groups: dict[tuple[str, str], dict[str, dict[str, list[tuple[int, float]]]]] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise ReferenceLayoutError(
                f"{path}: not a merged CSV (columns {reader.fieldnames}, expected {CSV_COLUMNS})"
            )
        for line in reader:
            directory = line["directory"]
            if directory not in CONDITIONS:
                raise ReferenceLayoutError(f"{path}: unknown directory {directory!r}")
            study = os.path.basename(os.path.normpath(line["experiment"]))
            per_key = groups.setdefault((directory, line["model"]), {}).setdefault(study, {})
            per_key.setdefault(line["participant"], []).append((int(line["trial"]), float(line["nll"])))
    runs = []
    for (directory, fname), studies in sorted(groups.items()):
        data = {s: {k: [v for _, v in sorted(tv)] for k, tv in keys.items()} for s, keys in studies.items()}
        runs.append(_run(path, directory, fname, _info_for(fname, infos, path), data))
    return runs


def read_reference(path: str, model_table: str | Mapping[str, Mapping] | None = None) -> list[metrics.Run]:
    """The runs in a study tree or merged CSV, one per (directory, model): ``path`` is a ``data``,
    ``data_acc``, ``data_meta`` or ``data_instruct`` folder, a folder holding some of them, or a merged CSV
    (``full_data_jureca_*.csv``). Model info: see ``model_infos``; runs are marked ``IMPORTED``."""
    infos = model_infos(model_table)
    if os.path.isfile(path):
        if not path.endswith(".csv"):
            raise ReferenceLayoutError(f"{path}: expected a merged .csv or a data* folder")
        return _read_csv(path, infos)
    name = os.path.basename(os.path.normpath(path))
    if name in DIRECTORIES:
        return _read_tree(path, name, infos)
    trees = [d for d in DIRECTORIES if os.path.isdir(os.path.join(path, d))]
    if not trees:
        raise ReferenceLayoutError(f"{path}: no data, data_acc, data_meta or data_instruct folder and not a merged CSV")
    return [run for d in trees for run in _read_tree(os.path.join(path, d), d, infos)]
