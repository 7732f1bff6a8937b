"""The study's own analysis scripts as the oracle of our figure tables (issue 27, item 5).

A small sweep of the bundled tiny models, each run under the file name of a real model of the paper, is exported
to the study's layout (``reference_layout.export_reference``); the study's ``full_merge_jureca.py`` and plotting
scripts (vendored unchanged in ``third_party/psych201/0_analyses``) then run on it in a subprocess, from the
folders they expect (``csvs/``: reads ``../data*``; ``plotting/``: reads ``../csvs/*.csv``, writes ``figures/``).
Their numbers, read from the module-level variables the scripts compute (``runpy`` of the unchanged file; most
print only four decimals, plot_experiments.py nothing), must equal ``report.generate``'s tables to float
rounding (``REL``/``ABS``):

  fig2      plot.py            s, es_df, type_avg     model_scores.score, pair_misalignment.d_pair, pair_types.d_pair
  fig3a     plot_evolution.py  results, family_avg    generation_pairs.d_pair, generations.d_pair
  fig4      plot_experiments   heatmap_data, avg_row  domains.csv (the listed pairs and the "Average" row)
  fig5      plot_meta.py       *_cohen_ds             persona.reference_d, persona_summary.reference_d
  accuracy  plot_accuracy.py   s, es_df, type_avg     accuracy.accuracy / accuracy_d, pair_types.accuracy_d

The sweep is chosen so that the old definitions give other numbers: the tiny post model is both Qwen3-8B (over
the tiny base as Qwen3-8B-Base) and Qwen2.5-7B, the tiny base is Qwen2.5-7B-Instruct (d = -d of Qwen3-8B), and
the DeepSeek-R1 distill is the tiny post model over its own weights as Qwen2.5-7B (d = 0). A Qwen2.5 generation
mean that took the distill in, or a domain "Average" over every pair rather than plot_experiments.py's list,
moves away from the study's value. Accuracy: the study's data_acc comes from its discrete test set (one token per
response); the bundled studies are not that set, but plot_accuracy.py reads only the 0/1 vectors, which the
``options=study`` runs export for every scored token.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("torch")  # full_merge_jureca.py reads the .pth files with torch.load
pytest.importorskip("seaborn")  # plot_evolution.py and plot_meta.py import it

from psych201_jax.analysis import paper, reference_layout, report  # noqa: E402
from psych201_jax.analysis.tables import CONDITION  # noqa: E402

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
STUDY = REPO / "third_party" / "psych201" / "0_analyses"
# Real studies of the categories CSV: Risky Choice, Psycholinguistics x2; persona metadata in the first and last.
STUDIES = ("thoma2025riskychoice", "franke2024bayesian", "guenther2024substitutions")
# Tiny model -> the paper's ids it is scored as (plain and options=study), and those also scored with persona.
BASE_IDS = ("Qwen/Qwen3-8B-Base", "Qwen/Qwen2.5-7B-Instruct")
POST_IDS = ("Qwen/Qwen3-8B", "Qwen/Qwen2.5-7B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
PERSONA_IDS = ("Qwen/Qwen3-8B-Base", "Qwen/Qwen3-8B")
REL, ABS = 1e-12, 1e-15  # float rounding (seen: <= 1.8e-15 abs): the same float64 inputs, summed in another order

_INFO = ("hf_id", "family", "generation", "size_b", "kind", "base_hf_id")

# Runs a vendored script unchanged (runpy) and writes the named module-level variables as JSON.
_RUNNER = r"""
import json, runpy, sys
import numpy as np, pandas as pd

def conv(v):
    if isinstance(v, pd.DataFrame):
        return [conv(r) for r in v.to_dict(orient="records")]
    if isinstance(v, pd.Series):
        return {("|".join(map(str, k)) if isinstance(k, tuple) else str(k)): conv(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return conv(v.tolist())
    if isinstance(v, dict):
        return {str(k): conv(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [conv(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v

g = runpy.run_path(sys.argv[1], run_name="__main__")
with open(sys.argv[2], "w") as fh:
    json.dump({n: conv(g[n]) for n in sys.argv[3:]}, fh)
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Results directories of the sweep: one forward pass per tiny model and persona setting."""
    from psych201_jax import defaults
    from psych201_jax.runs import job
    from psych201_jax.runs.config import ScoreJob

    root = tmp_path_factory.mktemp("oracle_sweep")
    data = ",".join(os.path.join(defaults.SAMPLE_DATA, s) for s in STUDIES)
    models = reference_layout.paper_models()
    dirs = []
    for model, ids in ((defaults.DEFAULT_MODEL, BASE_IDS), (defaults.DEFAULT_POST_MODEL, POST_IDS)):
        jobs = []
        for hf_id in ids:
            info = {f"model_info.{k}": models[hf_id][k] for k in _INFO}
            conditions = [("plain", {}), ("accuracy", {"options": "study"})]
            if hf_id in PERSONA_IDS:
                conditions.append(("persona", {"persona": "matched"}))
            for name, overrides in conditions:
                out = str(root / f"{hf_id.replace('/', '-')}-{name}")
                base = {"out": out, "model": model, "data": data, "log_every_s": 1e9}
                jobs.append(ScoreJob().with_overrides(base | info | overrides))
                dirs.append(out)
        job.initialize_runtime(jobs[0])
        loaded = job.load(jobs[0])
        for group in job.share_groups(jobs):
            job.run_conditions(loaded, group)
    return dirs


def _run_script(script: pathlib.Path, cwd: pathlib.Path, names: list[str]) -> dict:
    out = cwd / f"{script.stem}.json"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    cmd = [sys.executable, "-c", _RUNNER, str(script), str(out), *names]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
    assert proc.returncode == 0, (script.name, proc.stderr[-3000:])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def study(sweep, tmp_path_factory):
    """The study's numbers: export -> full_merge_jureca.py -> each plotting script, all unchanged."""
    work = tmp_path_factory.mktemp("oracle_study")
    summary = reference_layout.export_reference(sweep, str(work))
    assert not summary.skipped, summary.skipped
    shutil.move(work / "csvs", work / "csvs_ours")  # the study's merge writes its own CSVs
    csvs, plotting = work / "csvs", work / "plotting"
    csvs.mkdir()
    (plotting / "figures").mkdir(parents=True)
    shutil.copy(STUDY / "csvs" / "psych_experiment_categories.csv", csvs)  # plot_experiments.py reads it there
    merge = subprocess.run(
        [sys.executable, str(STUDY / "csvs" / "full_merge_jureca.py")], capture_output=True, text=True, cwd=csvs
    )
    assert merge.returncode == 0, merge.stderr[-3000:]
    scripts = {
        "plot": ["s", "es_df", "type_avg"],
        "plot_evolution": ["results", "family_avg"],
        "plot_experiments": ["heatmap_data", "avg_row", "category_cols"],
        "plot_meta": ["base_cohen_ds", "instruct_cohen_ds"],
        "plot_accuracy": ["s", "es_df", "type_avg"],
    }
    out = {name: _run_script(STUDY / "plotting" / f"{name}.py", plotting, names) for name, names in scripts.items()}
    for fig in ("fig2", "fig3a", "fig4", "fig5", "fig_accuracy"):
        assert (plotting / "figures" / f"{fig}.png").is_file(), fig
    return out


@pytest.fixture(scope="module")
def ours(sweep, tmp_path_factory):
    """psych201-analyze's tables on the same results directories."""
    out = tmp_path_factory.mktemp("oracle_report")
    report.generate(sweep, str(out), n_boot=10)
    return lambda name: pd.read_csv(out / f"{name}.csv", keep_default_na=False, na_values=["nan", ""])


def approx(value):
    return pytest.approx(value, rel=REL, abs=ABS, nan_ok=True)


def _plain(frame):
    return frame[frame["persona"] == "none"]


def _file(hf_id: str) -> str:
    return paper.study_file(hf_id)


def test_fig2_plot_py(study, ours):
    got = study["plot"]
    scores = _plain(ours("model_scores")).set_index("model")["score"]
    theirs = {k.split("|", 1)[1]: v for k, v in got["s"].items() if k.startswith("data|")}
    assert theirs == approx({_file(m): v for m, v in scores.items()})
    pairs = _plain(ours("pair_misalignment")).set_index("post")["d_pair"]
    es = {r["post_model"]: r["cohens_d"] for r in got["es_df"]}
    assert set(es) == {_file(p) for p in ("Qwen/Qwen3-8B", "Qwen/Qwen2.5-7B-Instruct", POST_IDS[2])}
    assert es == approx({_file(m): v for m, v in pairs.items() if _file(m) in es})
    types = _plain(ours("pair_types")).set_index("kind")
    assert got["type_avg"] == approx(types["d_pair"].to_dict())
    assert types["n_pairs"].to_dict() == {"Instruction-tuned": 1, "Reasoning": 2}


def test_fig3a_plot_evolution(study, ours):
    got = study["plot_evolution"]
    gen_pairs = _plain(ours("generation_pairs"))
    per_pair = {(r["family"], r["size"]): r["cohen_d"] for r in got["results"]}
    assert per_pair == approx(
        {("Qwen3", "8B"): gen_pairs.set_index("post").loc["Qwen/Qwen3-8B", "d_pair"]}
        | {("Qwen2.5", "7B"): gen_pairs.set_index("post").loc["Qwen/Qwen2.5-7B-Instruct", "d_pair"]}
    )
    family = {k: v for k, v in got["family_avg"].items() if v == v}  # the generations without a pair are NaN
    generations = _plain(ours("generations")).set_index("generation")
    assert family == approx(generations["d_pair"].to_dict())
    assert generations["n_pairs"].to_dict() == {"Qwen2.5": 1, "Qwen3": 1}
    assert family["Qwen2.5"] == pytest.approx(-family["Qwen3"])  # the sweep's design (module docstring)


def test_fig4_plot_experiments(study, ours):
    got = study["plot_experiments"]
    domains = _plain(ours("domains")).set_index("post")
    names = {post: name for post, _, name in paper.EXPERIMENTS_PAIRS}  # file names
    assert set(got["heatmap_data"]) == {names[_file("Qwen/Qwen3-8B")]}
    cols = got["category_cols"]
    assert sorted(cols) == sorted(c for c in domains.columns if c not in ("base", *CONDITION))
    (avg_row,) = got["avg_row"]
    assert dict(zip(cols, avg_row)) == approx({c: domains.loc["Average", c] for c in cols})
    assert any(v == v for v in avg_row)  # at least one domain holds a number
    row = domains.loc["Qwen/Qwen3-8B"]
    assert got["heatmap_data"][names[_file("Qwen/Qwen3-8B")]] == approx({c: row[c] for c in cols})
    assert list(domains.index) == ["Qwen/Qwen3-8B", "Average"]


def test_fig5_plot_meta(study, ours):
    got = study["plot_meta"]
    labels = dict(paper.META_BASE_MODELS + paper.META_INSTRUCT_MODELS)
    summary = ours("persona_summary").set_index("model")
    per_study = ours("persona")
    theirs = got["base_cohen_ds"] | got["instruct_cohen_ds"]
    assert set(theirs) == {labels[_file(m)] for m in PERSONA_IDS} == {labels[_file(m)] for m in summary.index}
    for model in PERSONA_IDS:
        d = theirs[labels[_file(model)]]
        mine = per_study[per_study["model"] == model].set_index("study")["reference_d"].dropna()
        assert d == approx(mine.to_dict()) and len(d) == 2, model  # thoma and guenther have metadata
        assert sum(d.values()) / len(d) == approx(summary.loc[model, "reference_d"])
        assert summary.loc[model, "n_reference_studies"] == len(d)


def test_accuracy_plot_accuracy(study, ours):
    got = study["plot_accuracy"]
    acc = _plain(ours("accuracy")).set_index("model")
    theirs = {k.split("|", 1)[1]: v for k, v in got["s"].items() if k.startswith("data_acc|")}
    assert theirs == approx({_file(m): v for m, v in acc["accuracy"].items()})
    es = {r["post_model"]: r["cohens_d"] for r in got["es_df"]}
    assert es == approx({_file(m): acc.loc[m, "accuracy_d"] for m in acc.index if _file(m) in es})
    assert len(es) == 3
    types = _plain(ours("pair_types")).set_index("kind")
    assert got["type_avg"] == approx(types["accuracy_d"].to_dict())
