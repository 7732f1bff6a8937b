"""The report's default tables select as the study's plotting scripts do (docs/reference-protocol.md, "Figure
definitions"): fig3a's generations only plot_evolution.py's pairs (no DeepSeek-R1 distill) with one common study
enough, fig4's domain Average only plot_experiments.py's pairs, fig2's type means only plot.py's pairs, fig5 only
plot_meta.py's models; the broader variants are the ``_all_pairs`` / ``_all_models`` tables. Also the model
identity rule of the analysis (one id, two fingerprints: an error) and which run supplies the NLLs when a model
has a plain and an accuracy run, with the bound their NLLs meet."""

import math
import os

import numpy as np
import pytest

from psych201_jax.analysis import report, runs, tables
from psych201_jax.errors import UserError
from psych201_jax.testing.results import load, write_results

# Real study names, so the bundled category CSV applies (Risky Choice, Psycholinguistics ×2, Moral Judgment).
STUDIES = ["thoma2025riskychoice", "franke2024bayesian", "guenther2024substitutions", "awad2018moral"]


def rows(shift, studies=STUDIES, n_participants=3, n_responses=4, seed=0):
    rng = np.random.default_rng(seed)
    return [
        (study, f"p{p}", (1.0 + shift + 0.5 * rng.random(n_responses)).round(4).tolist())
        for study in studies
        for p in range(n_participants)
    ]


# (hf_id, kind, base, generation, shift, studies)
MODELS = [
    ("Qwen/Qwen2.5-7B", "base", "", "Qwen2.5", 0.0, STUDIES),
    ("Qwen/Qwen2.5-7B-Instruct", "Instruction-tuned", "Qwen/Qwen2.5-7B", "Qwen2.5", 0.2, STUDIES),
    # A Reasoning pair of the same generation: plot.py lists it, plot_evolution.py and plot_experiments.py do not.
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "Reasoning", "Qwen/Qwen2.5-7B", "Qwen2.5", 1.5, STUDIES),
    # A generation pair with one common study: plot_evolution.py counts it, plot.py (>= 2) does not.
    ("Qwen/Qwen2-7B", "base", "", "Qwen2", 0.0, STUDIES),
    ("Qwen/Qwen2-7B-Instruct", "Instruction-tuned", "Qwen/Qwen2-7B", "Qwen2", 0.4, STUDIES[:1]),
    # A pair fig4 (plot_experiments.py) lists; the two Qwen2.5 pairs above are outside its list.
    ("Qwen/Qwen3-8B-Base", "base", "", "Qwen3", 0.0, STUDIES),
    ("Qwen/Qwen3-8B", "Reasoning", "Qwen/Qwen3-8B-Base", "Qwen3", 0.1, STUDIES),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    for i, (hf_id, kind, base, generation, shift, studies) in enumerate(MODELS):
        for persona in ("none", "matched"):
            write_results(
                str(root / f"{hf_id.replace('/', '-')}-{persona}"),
                hf_id,
                rows(shift - (0.1 if persona == "matched" else 0.0), studies, seed=i),
                kind=kind,
                base_hf_id=base,
                generation=generation,
                family="Qwen",
                persona=persona,
            )
    return root


@pytest.fixture(scope="module")
def built(root):
    loaded = [load(d) for d in runs.find_results_dirs([str(root)])]
    return tables.build_tables(loaded, runs.load_categories(), n_boot=50, seed=0)


def test_report_draws_the_paper_figures_and_names_the_scripts(root, tmp_path):
    out = tmp_path / "report"
    figures = report.generate([str(root)], str(out), n_boot=20)
    for name in ("fig_misalignment_by_generation.png", "fig_domains.png", "fig_persona.png"):
        assert figures[name] is None and (out / name).is_file(), (name, figures[name])
    text = (out / "report.md").read_text()
    for script in ("plot.py", "plot_evolution.py", "plot_experiments.py", "plot_meta.py", "plot_accuracy.py"):
        assert script in text, script
    for name in ("generations_all_pairs.csv", "domains_all_pairs.csv", "persona_summary_all_models.csv"):
        assert (out / name).is_file(), name


def plain(rows_):
    return [r for r in rows_ if r["persona"] == "none"]


def test_fig3a_generations_as_plot_evolution(built):
    pairs = {r["post"]: r for r in plain(built.rows["pair_misalignment"])}
    gens = {r["generation"]: r for r in plain(built.rows["generations"])}
    # Qwen2.5: only the Instruct pair; the DeepSeek-R1 distill is left out.
    assert gens["Qwen2.5"]["n_pairs"] == 1
    assert gens["Qwen2.5"]["d_pair"] == pytest.approx(pairs["Qwen/Qwen2.5-7B-Instruct"]["d_pair"])
    # Qwen2: one common study is enough for plot_evolution.py, though plot.py's d_pair needs two.
    assert math.isnan(pairs["Qwen/Qwen2-7B-Instruct"]["d_pair"])
    assert gens["Qwen2"]["n_pairs"] == 1 and math.isfinite(gens["Qwen2"]["d_pair"])
    gen_pairs = {r["post"]: r for r in plain(built.rows["generation_pairs"])}
    assert gen_pairs["Qwen/Qwen2-7B-Instruct"]["n_common_studies"] == 1
    assert set(gen_pairs) == {"Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2-7B-Instruct", "Qwen/Qwen3-8B"}
    assert pairs["deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"]["generation_pair"] is False
    # The project's broader variant keeps the distill (and needs two common studies).
    broad = {r["generation"]: r for r in plain(built.rows["generations_all_pairs"])}
    assert broad["Qwen2.5"]["n_pairs"] == 2
    assert broad["Qwen2.5"]["d_pair"] > gens["Qwen2.5"]["d_pair"]
    assert math.isnan(broad["Qwen2"]["d_pair"])


def test_fig4_average_over_its_listed_pairs(built):
    domain = plain(built.rows["domains"])
    assert [r["post"] for r in domain] == ["Qwen/Qwen3-8B", "Average"]
    listed, average = domain
    for col in built.domain_columns[0]:
        assert average[col] == pytest.approx(listed[col], nan_ok=True)
    everything = plain(built.rows["domains_all_pairs"])
    assert {r["post"] for r in everything} == {
        "Qwen/Qwen2.5-7B-Instruct",
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
        "Qwen/Qwen2-7B-Instruct",
        "Qwen/Qwen3-8B",
        "Average",
    }
    assert everything[-1]["Risky Choice"] > average["Risky Choice"] + 0.5  # the distill pulls it up


def test_fig2_types_as_plot_py(built):
    types = {r["kind"]: r for r in plain(built.rows["pair_types"])}
    pairs = {r["post"]: r for r in plain(built.rows["pair_misalignment"])}
    # plot.py drops the one-study Qwen2 pair (< 2 common studies) instead of counting a NaN.
    assert types["Instruction-tuned"]["n_pairs"] == 1
    assert types["Instruction-tuned"]["d_pair"] == pytest.approx(pairs["Qwen/Qwen2.5-7B-Instruct"]["d_pair"])
    # plot.py types Qwen3-8B and the distill as Reasoning.
    assert types["Reasoning"]["n_pairs"] == 2
    broad = {r["kind"]: r for r in plain(built.rows["pair_types_all_pairs"])}
    assert broad["Instruction-tuned"]["n_pairs"] == 2


def test_fig5_persona_of_plot_meta_models(built):
    listed = {r["model"] for r in built.rows["persona_summary"]}
    assert listed == {"Qwen/Qwen3-8B-Base", "Qwen/Qwen3-8B"}  # plot_meta.py's lists hold no Qwen2 / 2.5 model
    everything = {r["model"] for r in built.rows["persona_summary_all_models"]}
    assert everything == {m[0] for m in MODELS}


# ------------------------------------------------------------------------------- model identity (issue 28)


def _fingerprinted(tmp_path, name, sha, shift, **kw):
    return load(
        write_results(
            str(tmp_path / name), "psych201_jax/tiny-qwen3", rows(shift), model_sha256={"model.safetensors": sha}, **kw
        )
    )


def test_one_id_two_fingerprints_is_an_error_naming_both(tmp_path):
    a = _fingerprinted(tmp_path, "a", "aa" * 32, 0.0)
    b = _fingerprinted(tmp_path, "b", "bb" * 32, 5.0)
    for order in ((a, b), (b, a)):
        with pytest.raises(UserError) as err:
            runs.dedupe(list(order))
        assert a.path in str(err.value) and b.path in str(err.value)


def test_same_fingerprint_complete_run_wins(tmp_path):
    import dataclasses

    done = _fingerprinted(tmp_path, "done", "aa" * 32, 0.0)
    partial = dataclasses.replace(_fingerprinted(tmp_path, "partial", "aa" * 32, 5.0), complete=False)
    for order in ((partial, done), (done, partial)):
        kept, notes = runs.dedupe(list(order))
        assert [r.path for r in kept] == [done.path] and len(notes) == 1


# ------------------------------------------------------------------------- plain vs accuracy runs (item 8)


def test_plain_run_supplies_the_nlls_and_the_accuracy_run_agrees_within_the_bound(tmp_path):
    from psych201_jax import defaults
    from psych201_jax.runs import job
    from psych201_jax.runs.config import ScoreJob

    data = ",".join(os.path.join(defaults.SAMPLE_DATA, s) for s in ("thoma2025riskychoice", "busch2024_stroop"))
    out = {}
    for name, options in (("plain", "none"), ("accuracy", "study")):
        cfg = ScoreJob().with_overrides(
            {"out": str(tmp_path / name), "data": data, "options": options, "log_every_s": 1e9}
        )
        job.run(cfg)
        out[name] = runs.load_run(cfg.out)
    a, b = out["plain"], out["accuracy"]
    assert a.options == "none" and b.options == "study" and a.model_fingerprint == b.model_fingerprint != ""
    by_key = {p.key: p for p in b.participants}
    diffs = [np.abs(p.nll - by_key[p.key].nll)[~np.isnan(p.nll)] for p in a.participants]
    assert sum(d.size for d in diffs) > 50
    assert max(float(d.max()) for d in diffs if d.size) <= runs.HEAD_NLL_TOLERANCE
    for order in ((a, b), (b, a)):
        kept, notes = runs.dedupe(list(order))
        assert len(kept) == 1 and kept[0].path == a.path  # the plain run's NLLs, whatever the order
        assert kept[0].participants[0].n_option_correct is not None  # the accuracy run lends its option choices
        assert "the NLLs are" in notes[0]
