"""Stage chains (issue 29 item 1): ModelInfo's stage and chain, chains built from them (a pair is a chain of two),
the stage tables against the pair tables, shares of the final misalignment, and the tiny stage sweep end to end
(configs/sweeps/tiny_stages.py through psych201-sweep and psych201-analyze)."""

import csv
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from psych201_jax import defaults
from psych201_jax.analysis import chains, pairs, runs, tables
from psych201_jax.conditions import ConditionError, ModelInfo, Stage
from psych201_jax.runs import store
from psych201_jax.runs.config import ScoreJob
from psych201_jax.testing.results import load, write_results

REPO = pathlib.Path(__file__).resolve().parents[1]
STUDIES = ("thoma2025riskychoice", "franke2024bayesian", "guenther2024substitutions", "not_in_csv")


def _stage_results(path, hf_id, shift, *, stage="", chain="", base="", nan_at=None):
    """A results directory whose model info names its stage and chain; NLLs = a fixed pattern + ``shift`` per
    study index (so every stage moves every response), optionally one response unscored (``nan_at``)."""
    rows = []
    for i, study in enumerate(STUDIES):
        for p in range(3):
            nll = [1.0 + 0.1 * p + 0.05 * r + shift * (1 + 0.5 * i) + 0.01 * r * shift for r in range(4)]
            if nan_at == (study, p):
                nll[1] = None
            rows.append((study, f"p{p}", nll))
    write_results(str(path), hf_id, rows, kind="base" if not base else "Instruction-tuned", base_hf_id=base)
    manifest = store.read_manifest(str(path))
    manifest["config"]["model_info"].update(stage=stage, chain=chain)
    with open(os.path.join(path, store.MANIFEST), "w") as fh:
        json.dump(manifest, fh)
    return load(str(path))


@pytest.fixture
def chain_runs(tmp_path):
    """base -> sft -> dpo -> rl of chain "C" (listed out of training order)."""
    base = _stage_results(tmp_path / "base", "B", 0.0, stage="base")
    members = [
        _stage_results(tmp_path / stage, f"B-{stage}", shift, stage=stage, chain="C", base="B")
        for stage, shift in (("rl", 0.5), ("sft", 0.3), ("dpo", 0.2))
    ]
    return [members[0], base, *members[1:]]


def _build(run_list, n_boot=200):
    return tables.build_tables(run_list, runs.load_categories(), n_boot=n_boot, seed=0)


def test_model_info_stage_and_chain_and_manifests_without_them():
    old = {"hf_id": "M", "family": "F", "generation": "G", "size_b": 2.0, "kind": "base", "base_hf_id": ""}
    info = ModelInfo.from_mapping(old)
    assert info.stage == Stage.UNKNOWN and info.chain == ""
    assert info.as_dict() == {**old, "stage": "", "chain": ""}
    new = ModelInfo.from_mapping({**old, "stage": "dpo", "chain": "C"})
    assert new.stage == Stage.DPO and ModelInfo.from_mapping(new.as_dict()) == new
    with pytest.raises(ConditionError, match="model_info.stage"):
        ModelInfo.from_mapping({**old, "stage": "ppo"})
    # A stored manifest's config without the fields (results written before them) still reads as a job.
    config = ScoreJob().to_dict()
    config["model_info"] = old
    assert ScoreJob.from_mapping(config).model_info == info


def test_stage_and_chain_leave_the_fingerprint_unchanged():
    """model_info is provenance, not a determinant: results scored before stage/chain existed still resume."""
    from psych201_jax.data import spans
    from psych201_jax.data.tokenizer import TokenizerInfo
    from psych201_jax.model.spec import ModelSpec
    from psych201_jax.runs import manifest

    model = defaults.DEFAULT_POST_MODEL
    spec = ModelSpec.load(os.path.join(model, "model_spec.json"))
    tok = TokenizerInfo(os.path.join(model, "tokenizer"))
    plain = ScoreJob(model=model, model_info=ModelInfo(hf_id="P", base_hf_id="B"))
    staged = ScoreJob(model=model, model_info=ModelInfo(hf_id="P", base_hf_id="B", stage=Stage.RL, chain="C"))
    a, b = (manifest.build_manifest(j, model, spec, tok, spans.SpanRules("reference"), 1) for j in (plain, staged))
    assert a["fingerprint"] == b["fingerprint"] and a["determinants"] == b["determinants"]
    assert b["config"]["model_info"]["stage"] == "rl" and "stage" not in json.dumps(b["determinants"])


def test_chains_are_ordered_by_stage_and_pairs_are_chains_of_two(chain_runs):
    (chain,), notes = pairs.find_chains(chain_runs)
    assert notes == [] and chain.name == "C"
    assert [r.model for r in chain.runs] == ["B", "B-sft", "B-dpo", "B-rl"]
    assert [(a.model, b.model) for a, b in chain.steps()] == [("B-sft", "B"), ("B-dpo", "B-sft"), ("B-rl", "B-dpo")]
    pair_chains, _ = pairs.pair_chains(chain_runs)
    assert sorted((c.base.model, c.final.model) for c in pair_chains) == [("B", "B-dpo"), ("B", "B-rl"), ("B", "B-sft")]
    assert all(len(c.runs) == 2 and c.name == "" for c in pair_chains)


def test_stage_rows_against_the_pair_table_and_shares(chain_runs):
    t = _build(chain_runs)
    rows = t.rows["stages"]
    assert [r["stage"] for r in rows] == ["sft", "dpo", "rl"]
    assert [r["previous"] for r in rows] == ["B", "B-sft", "B-dpo"]
    pair = {r["post"]: r for r in t.rows["pair_misalignment"]}
    for r in rows:  # against the base: exactly the pair table's row of (stage, base)
        p = pair[r["model"]]
        for k in ("d_pair", "mean_diff", "ci_studies_lo", "ci_studies_hi", "ci_two_level_lo", "ci_two_level_hi"):
            assert r[f"{k}_vs_base"] == p[k], k
    steps = [r["mean_diff_vs_previous"] for r in rows]
    assert sum(steps) == pytest.approx(rows[-1]["mean_diff_vs_base"], abs=1e-12)  # telescoping
    assert sum(r["share"] for r in rows) == pytest.approx(1.0, abs=1e-12)
    assert rows[1]["share"] == pytest.approx(steps[1] / rows[-1]["mean_diff_vs_base"])
    assert steps[1] < 0 < steps[0]  # dpo (shift 0.2) undoes part of sft (0.3): a negative share
    assert all(r["share_ci_lo"] <= r["share_ci_hi"] for r in rows)
    # Per domain: each domain's shares add up to 1 too.
    by_domain: dict[str, float] = {}
    for r in t.rows["stages_by_domain"]:
        by_domain[r["domain"]] = by_domain.get(r["domain"], 0.0) + r["share"]
    assert set(by_domain) == {"Risky Choice", "Psycholinguistics", "Other"}
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in by_domain.values())
    # Only the chain's final release counts in the broader means by type.
    (types,) = t.rows["pair_types_all_pairs"]
    assert types["n_pairs"] == 1 and types["mean_diff"] == pair["B-rl"]["mean_diff"]


def test_a_chain_of_two_gives_exactly_the_pair_row(tmp_path):
    base = _stage_results(tmp_path / "base", "B", 0.0, stage="base")
    post = _stage_results(tmp_path / "post", "P", 0.4, stage="rl", chain="two", base="B")
    statistics = {}

    def cached(a, b):
        return statistics.setdefault((a.path, b.path), pairs.pair_statistics(a, b, DDOFS, 200, 0))

    (chain,), _ = pairs.find_chains([base, post])
    stage = chains.stage_tables([chain], cached, cached, runs.load_categories(), lambda r: {}, 200, 0)
    assert stage.longest == 2
    (row,) = stage.rows
    summary, _ = pairs.pair_statistics(post, base, DDOFS, 200, 0)
    for side in ("base", "previous"):
        for k in ("d_pair", "reason", "mean_diff", "ci_studies_lo", "ci_studies_hi", "wilcoxon_p"):
            assert row[f"{k}_vs_{side}"] == summary[k]
    assert row["share"] == 1.0
    t = _build([base, post])  # a chain of two: no stage section, no stage rows in the tables
    assert t.rows["stages"] == [] and len(t.rows["pair_misalignment"]) == 1


DDOFS = {"pair": 1, "domain": 0, "persona": 0, "accuracy": 1}


def test_common_responses_keep_shares_additive(tmp_path, chain_runs):
    dropped = _stage_results(tmp_path / "dpo2", "B-dpo", 0.2, stage="dpo", chain="C", base="B", nan_at=(STUDIES[0], 1))
    run_list = [r for r in chain_runs if r.model != "B-dpo"] + [dropped]
    (chain,), _ = pairs.find_chains(run_list)
    restricted, n = pairs.common_responses(chain.runs)
    assert n == 3  # the response unscored in dpo, left out of the three other runs
    assert all(
        int(np.isnan(p.nll).sum()) == (p.key == (STUDIES[0], f"{STUDIES[0]}/", "p1"))
        for r in restricted
        for p in r.participants
    )
    t = _build(run_list)
    rows = t.rows["stages"]
    assert {r["chain_dropped_responses"] for r in rows} == {3}
    assert sum(r["share"] for r in rows) == pytest.approx(1.0, abs=1e-12)
    assert sum(r["mean_diff_vs_previous"] for r in rows) == pytest.approx(rows[-1]["mean_diff_vs_base"], abs=1e-12)
    # On fewer responses than the pair table's (rl, base) row.
    pair = {r["post"]: r for r in t.rows["pair_misalignment"]}
    assert rows[-1]["matched_responses"] == pair["B-rl"]["matched_responses"] - 1


def test_no_final_misalignment_gives_no_shares(tmp_path):
    base = _stage_results(tmp_path / "base", "B", 0.0, stage="base")
    sft = _stage_results(tmp_path / "sft", "S", 0.3, stage="sft", chain="Z", base="B")
    final = _stage_results(tmp_path / "rl", "R", 0.0, stage="rl", chain="Z", base="B")
    rows = _build([base, sft, final]).rows["stages"]
    assert rows[-1]["mean_diff_vs_base"] == 0.0 and all(math.isnan(r["share"]) for r in rows)
    (sentence,) = chains.conclusions(rows)
    assert "not measurably misaligned" in sentence


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=900)


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_tiny_stage_sweep_end_to_end(tmp_path):
    config = tmp_path / "sweep_config.py"
    config.write_text(
        "from configs.sweeps import tiny_stages\n"
        "def get_config():\n"
        "    c = tiny_stages.get_config()\n"
        f"    c.out_root = {str(tmp_path / 'sweep')!r}\n"
        "    return c\n"
    )
    proc = _run("psych201_jax.cli.sweep", f"--config={config}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "jobs: 12 done, 0 failed, 0 skipped" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = tmp_path / "report"
    analyzed = _run("psych201_jax.cli.analyze", f"--results={tmp_path / 'sweep'}", f"--out={report}", "--bootstrap=200")
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    assert (report / "fig_stages.png").is_file()
    stages = _csv(report / "stages.csv")
    plain = [r for r in stages if r["persona"] == "none"]
    assert [r["stage"] for r in plain] == ["sft", "dpo", "final"] and {r["chain"] for r in plain} == {
        "tiny-qwen3 chain"
    }
    assert len(stages) == 6  # plain and persona (accuracy runs lend their head outputs to the plain runs)
    for condition in ("none", "matched"):
        rows = [r for r in stages if r["persona"] == condition]
        assert sum(float(r["share"]) for r in rows) == pytest.approx(1.0, abs=1e-9)
        assert sum(float(r["mean_diff_vs_previous"]) for r in rows) == pytest.approx(
            float(rows[-1]["mean_diff_vs_base"]), abs=1e-9
        )
        pair = next(
            p
            for p in _csv(report / "pair_misalignment.csv")
            if p["post"] == "psych201_jax/tiny-qwen3-post" and p["persona"] == condition
        )
        assert rows[-1]["mean_diff_vs_base"] == pair["mean_diff"] and rows[-1]["d_pair_vs_base"] == pair["d_pair"]
        assert all(int(r["chain_dropped_responses"]) == 0 for r in rows)
    assert _csv(report / "stages_by_domain.csv")
    text = (report / "report.md").read_text()
    assert "## Stage chains" in text and "**tiny-qwen3 chain**: SFT adds" in text and "(fig_stages.png)" in text


def test_the_plain_tiny_sweep_has_no_stage_section(tmp_path):
    base = _stage_results(tmp_path / "base", "B", 0.0)
    post = _stage_results(tmp_path / "post", "P", 0.4, base="B")
    from psych201_jax.analysis import report

    figures = report.generate([str(tmp_path)], str(tmp_path / "out"), n_boot=50)
    assert "fig_stages.png" not in figures and not (tmp_path / "out" / "stages.csv").exists()
    assert "Stage chains" not in (tmp_path / "out" / "report.md").read_text()
    del base, post


def test_the_stages_sweep_lists_every_chain_and_skips_nothing():
    from configs.sweeps import stages
    from psych201_jax.runs import sweep

    swept = sweep.Sweep.from_mapping(stages.get_config())
    jobs = sweep.expand(swept)
    assert jobs and not [j.name for j in jobs if j.skip_reason]
    infos = {m.info.hf_id: m.info for m in swept.models}
    members: dict[str, list[str]] = {}
    for info in infos.values():
        if info.chain:
            members.setdefault(info.chain, []).append(info.stage)
            assert infos[info.base_hf_id].stage == Stage.BASE and not infos[info.base_hf_id].chain
    assert len(members) == 9 and all(s == ["sft", "dpo", "rl"] for s in members.values())
    assert {"allenai/Olmo-3-7B-Think-SFT", "allenai/OLMo-2-0325-32B-DPO", "allenai/Llama-3.1-Tulu-3-70B"} <= set(infos)
