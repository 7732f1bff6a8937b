"""The study's layout both ways: psych201-export --format=reference -> the study's own full_merge_jureca.py
(vendored, unchanged) -> the same numbers as ours; the study's tree and merged CSV -> read_reference -> the same
per-participant NLLs and accuracies."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from psych201_jax import torch_pickle
from psych201_jax.analysis import metrics, reference_layout
from psych201_jax.runs import store

REPO = pathlib.Path(__file__).resolve().parents[1]
MERGE = REPO / "third_party" / "psych201" / "0_analyses" / "csvs" / "full_merge_jureca.py"
STUDIES = ("thoma2025riskychoice", "busch2024_stroop")
# A real pair of the paper, with its model table's info, so the study's scripts list the files.
_PAPER = reference_layout.paper_models()
_INFO = ("hf_id", "family", "generation", "size_b", "kind", "base_hf_id")
MODELS = {
    role: {k: _PAPER[hf_id][k] for k in _INFO}
    for role, hf_id in (("base", "Qwen/Qwen3-8B-Base"), ("post", "Qwen/Qwen3-8B"))
}
CONDITIONS = {  # name -> (overrides, the study's directory)
    "plain": ({}, "data"),
    "accuracy": ({"options": "study"}, "data_acc"),
    "persona": ({"persona": "matched"}, "data_meta"),
    "chat": ({"template": "chat"}, "data_instruct"),
    "robust": ({"protocol": "robust"}, None),
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Results directories of the tiny pair under each condition (chat: the post model only)."""
    from psych201_jax import defaults
    from psych201_jax.runs import job
    from psych201_jax.runs.config import ScoreJob

    root = tmp_path_factory.mktemp("sweep")
    data = ",".join(os.path.join(defaults.SAMPLE_DATA, s) for s in STUDIES)
    out = {}
    for role, model in (("base", defaults.DEFAULT_MODEL), ("post", defaults.DEFAULT_POST_MODEL)):
        for name, (overrides, _) in CONDITIONS.items():
            if name == "chat" and role == "base":
                continue
            info = {f"model_info.{k}": v for k, v in MODELS[role].items()}
            cfg = ScoreJob().with_overrides(
                {"out": str(root / f"{role}-{name}"), "model": model, "data": data, "log_every_s": 1e9}
                | info
                | overrides
            )
            job.run(cfg)
            out[role, name] = cfg.out
    return out


@pytest.fixture(scope="module")
def exported(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("layout")
    proc = subprocess.run(
        [sys.executable, "-m", "psych201_jax.cli.export", "--format=reference", f"--out={out}"]
        + [f"--results={d}" for d in sweep.values()],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" in proc.stdout and "robust" not in proc.stdout.split("skipped")[0]
    return out, proc.stdout


def _our_run(results_dir):
    return metrics.run_from_rows(store.read_manifest(results_dir), store.iter_rows(results_dir), results_dir)


def _study_merge(out: pathlib.Path) -> pathlib.Path:
    """Runs the study's full_merge_jureca.py unchanged: from a folder beside data/ (it reads ../data*)."""
    pytest.importorskip("torch")  # the study's script reads the .pth files with torch.load, and pandas
    pytest.importorskip("pandas")
    work = out / "study_csvs"
    work.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, str(MERGE)], capture_output=True, text=True, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def test_tree_layout_and_keys(sweep, exported):
    out, stdout = exported
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.pth"))
    expected = {
        f"{d}/{s}/{m}.pth"
        for (role, name), _ in sweep.items()
        if (d := CONDITIONS[name][1])
        for s in STUDIES
        for m in [MODELS[role]["hf_id"].replace("/", "-")]
    }
    # A study whose participants all lack metadata has no persona rows, so no data_meta file.
    assert set(files) <= expected and {f for f in expected if not f.startswith("data_meta")} <= set(files)
    assert "skipped" in stdout and "base-robust" in stdout and "post-robust" in stdout
    rows = {r["participant"]: r for r in store.iter_rows(sweep["post", "plain"]) if r["study"] == STUDIES[0]}
    saved = torch_pickle.load(out / "data" / STUDIES[0] / "Qwen-Qwen3-8B.pth")
    assert list(saved) == list(rows)  # keyed by the stored participant, in row order
    for key, values in saved.items():
        assert values.dtype == np.float64
        np.testing.assert_array_equal(values, [x for x in rows[key]["nll"] if x is not None])
    acc = torch_pickle.load(out / "data_acc" / STUDIES[0] / "Qwen-Qwen3-8B.pth")
    arow = {r["participant"]: r for r in store.iter_rows(sweep["post", "accuracy"]) if r["study"] == STUDIES[0]}
    for key, values in acc.items():
        assert values.dtype == np.float32
        np.testing.assert_array_equal(values, np.equal(arow[key]["argmax"], arow[key]["target"]))


def test_study_merge_matches_ours(sweep, exported):
    """The study's full_merge_jureca.py on the export: the same CSVs as ours, and the same numbers as our runs."""
    pd = pytest.importorskip("pandas")

    out, _ = exported
    work = _study_merge(out)
    for directory, name in reference_layout.MERGED_CSV.items():
        theirs = pd.read_csv(work / name, dtype={"participant": str})
        ours = pd.read_csv(out / "csvs" / name, dtype={"participant": str})
        assert list(theirs.columns) == list(reference_layout.CSV_COLUMNS)
        key = ["directory", "experiment", "model", "participant", "trial"]
        theirs, ours = (f.sort_values(key).reset_index(drop=True) for f in (theirs, ours))
        pd.testing.assert_frame_equal(theirs, ours, check_exact=True)
        assert len(theirs), directory
        # Per study and model: the response-pooled mean (accuracy for data_acc) equals our run's.
        means = theirs.groupby(["model", "experiment"])["nll"].mean()
        for (role, cond), results_dir in sweep.items():
            if CONDITIONS[cond][1] != directory:
                continue
            run = _our_run(results_dir)
            fname = MODELS[role]["hf_id"].replace("/", "-") + ".pth"
            for row in metrics.study_scores(run):
                value = row["accuracy"] if directory == "data_acc" else row["mean_nll"]
                got = means.get((fname, f"../data/{row['study']}"))
                assert got == pytest.approx(value, rel=1e-12, abs=1e-12), (directory, role, row["study"])


def _by_key(run):
    return {(p.study, p.participant): p for p in run.participants}


def test_read_reference_gives_our_numbers(sweep, exported):
    out, _ = exported
    work = _study_merge(out)
    from_tree = {(r.path.rsplit("#", 1)[1]): r for r in reference_layout.read_reference(str(out))}
    from_csv = {
        (r.path.rsplit("#", 1)[1]): r
        for name in reference_layout.MERGED_CSV.values()
        for r in reference_layout.read_reference(str(work / name))
    }
    assert set(from_tree) == set(from_csv) and len(from_tree) == 7
    for (role, cond), results_dir in sweep.items():
        directory = CONDITIONS[cond][1]
        if directory is None:
            continue
        ours = _our_run(results_dir)
        fname = MODELS[role]["hf_id"].replace("/", "-") + ".pth"
        for imported in (from_tree[f"{directory}/{fname}"], from_csv[f"{directory}/{fname}"]):
            assert reference_layout.is_imported(imported)
            assert imported.info == {**metrics.model_info({"config": {"model_info": MODELS[role]}})}
            assert imported.condition == metrics.condition_of({"config": reference_layout.CONDITIONS[directory]})
            theirs = _by_key(imported)
            mine = {(p.study, p.participant): p for p in ours.participants}
            if directory == "data":  # every participant is in data/ (the CSV: those with a response)
                assert set(theirs) <= set(mine)
            for k, p in theirs.items():
                if directory == "data_acc":
                    assert (p.n_tokens, p.n_correct) == (mine[k].n_tokens, mine[k].n_correct)
                else:
                    np.testing.assert_array_equal(p.nll, mine[k].nll[~np.isnan(mine[k].nll)])
            if directory != "data_acc":
                a = {r["study"]: r["mean_nll"] for r in metrics.study_scores(imported)}
                b = {r["study"]: r["mean_nll"] for r in metrics.study_scores(ours) if r["n_responses"]}
                assert a == pytest.approx(b, rel=1e-12)


def test_read_reference_model_mapping(tmp_path, exported):
    """An id outside the paper's table takes its info from the user's mapping; without one it is unpaired."""
    out, _ = exported
    tree = tmp_path / "data" / STUDIES[0]
    tree.mkdir(parents=True)
    shutil.copy(out / "data" / STUDIES[0] / "Qwen-Qwen3-8B.pth", tree / "acme-Tiny-1B.pth")
    (run,) = reference_layout.read_reference(str(tmp_path / "data"))
    assert run.info["hf_id"] == "acme-Tiny-1B" and run.info["kind"] == "unknown"
    mapping = tmp_path / "models.json"
    info = dict(family="Acme", generation="A1", size_b=1, kind="Instruction-tuned", base_hf_id="acme/Tiny-1B-Base")
    mapping.write_text(json.dumps({"acme/Tiny-1B": info}))
    (run,) = reference_layout.read_reference(str(tmp_path), model_table=str(mapping))
    assert run.info == {"hf_id": "acme/Tiny-1B", **info, "size_b": 1.0, "stage": "", "chain": ""}
    with pytest.raises(reference_layout.ReferenceLayoutError, match="no data"):
        reference_layout.read_reference(str(tmp_path / "data" / STUDIES[0]))


def test_jsonl_export_has_tokens(sweep, tmp_path):
    from psych201_jax.cli import export

    rows = list(export.export_rows(sweep["base", "plain"]))
    stored = list(store.iter_rows(sweep["base", "plain"]))
    for line, row in zip(rows, stored):
        assert line["argmax"] == row["argmax"] and line["target"] == row["target"]
        assert len(line["argmax"]) == sum(row["n_scored"])


def test_analyze_reads_the_study_layout_beside_our_runs(sweep, exported, tmp_path):
    """psych201-analyze --results=<our results> --results=<the study's data tree>: the imported runs sit in
    model_scores.csv beside ours, marked by their imported: path, with our numbers."""
    import csv

    out, _ = exported
    ours = sweep["post", "plain"]
    report = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "psych201_jax.cli.analyze", f"--results={ours}", f"--results={out / 'data'}"]
        + [f"--out={report}", "--bootstrap=10"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(report / "model_scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    imported = [r for r in rows if r["path"].startswith(reference_layout.IMPORTED)]
    mine = [r for r in rows if r["path"] == ours]
    assert len(mine) == 1 and {r["model"] for r in imported} == {m["hf_id"] for m in MODELS.values()}
    twin = next(r for r in imported if r["model"] == mine[0]["model"])
    assert float(twin["score"]) == pytest.approx(float(mine[0]["score"]), rel=1e-12)
