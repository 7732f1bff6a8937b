"""The report's tables: every row built from loaded runs (``build_tables``), and their CSV files.

The tables the paper's figures show select their pairs, models, studies and minimum counts as the study's script
for that figure does (``paper``; docs/reference-protocol.md, "Figure definitions"):

  pair_types        fig2, plot.py (and plot_accuracy.py for accuracy_d): the listed pairs with >= 2 common
                    studies, averaged per the script's post-training type.
  generation_pairs  fig3a, plot_evolution.py: the listed Qwen pairs of one generation, d over >= 1 common study;
  generations       their mean per generation.
  domains           fig4, plot_experiments.py: the listed pairs; the "Average" row is the mean over those pairs.
  persona, persona_summary   fig5, plot_meta.py: the listed models, ``paper.META_EXCLUDED`` studies left out.
  accuracy          plot_accuracy.py: every model's accuracy (its panels plot every model); accuracy_d per pair
                    needs >= 2 common studies.
  model_scores      plot.py / plot_instruct.py: every model and condition (plot_instruct.py compares a model's
                    chat-template run with its own no-template run, the rows of one model in two conditions).

The project's broader variants are separate, named tables: pair_misalignment (every pair whose
``model_info.base_hf_id`` is scored), pair_types_all_pairs, generations_all_pairs (every Instruction-tuned or
Reasoning pair whose base has its generation, >= 2 common studies), domains_all_pairs (every pair),
domains_extended (every pair, all 11 categories plus Other), persona_all_models and persona_summary_all_models.
A stage chain's intermediate checkpoints (``model_info.chain``; e.g. SFT, DPO) are pairs of pair_misalignment but
count in none of the broader means; only its final release does.

Stage chains (``chains``, written only when a chain of >= 3 models is scored): stages (every stage against the
base and the previous stage, and its share of the final misalignment) and stages_by_domain.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence

import numpy as np
from absl import logging

from psych201_jax.analysis import calibration, chains, paper
from psych201_jax.analysis.domains import OTHER_DOMAIN, REFERENCE_DROPPED_DOMAINS, Categories, domain_matrix
from psych201_jax.analysis.metrics import Run, model_score, nll_moments, resolve_ddof, study_scores
from psych201_jax.analysis.pairs import GENERATION_TYPES, find_chains, find_pairs, pair_statistics, reference_pair_d
from psych201_jax.analysis.persona import find_persona_comparisons, persona_statistics
from psych201_jax.analysis.runs import dedupe, primary_condition
from psych201_jax.analysis.stats import means_by, nanmean
from psych201_jax.conditions import Condition, ModelInfo

CONDITION = Condition.ANALYSIS_FIELDS
INFO = ModelInfo.FIELDS[1:]  # hf_id is the "model" column
PAIR_INFO = ("family", "generation", "size_b", "kind")  # the post-trained model's, in the pair tables

COLUMNS = {
    "model_scores": (
        "model",
        *INFO,
        *CONDITION,
        "n_studies",
        "n_participants",
        "n_rejected",
        "n_responses",
        "score",
        "score_participant",
        "accuracy",
        "option_accuracy",
        "complete",
        "n_done",
        "n_input",
        "path",
    ),
    "study_scores": (
        "model",
        "kind",
        *CONDITION,
        "study",
        "n_participants",
        "n_responses",
        "n_unscored_responses",
        "mean_nll",
        "participant_mean_nll",
        "sd_nll",
        "n_tokens",
        "accuracy",
        "option_accuracy",
    ),
    "pair_misalignment": (
        "post",
        "base",
        *PAIR_INFO,
        *CONDITION,
        "ddof",
        "n_common_studies",
        "d_pair",
        "reason",
        "generation_pair",
        "generation_pair_all",
        "n_paired_studies",
        "mean_diff",
        "ci_studies_lo",
        "ci_studies_hi",
        "ci_two_level_lo",
        "ci_two_level_hi",
        "wilcoxon_stat",
        "wilcoxon_p",
        "mean_paired_d",
        "matched_responses",
        "unaligned_participants",
        "unmatched_participants",
        "dropped_responses",
        "stage",
        "chain",
    ),
    "pair_paired_stats": (
        "post",
        "base",
        "kind",
        *CONDITION,
        "study",
        "n_post",
        "n_base",
        "reference_d",
        "domain_d",
        "n_participants",
        "n_responses",
        "mean_diff",
        "sd_diff",
        "paired_d",
        "only_post",
        "only_base",
        "unaligned_participants",
        "dropped_responses",
    ),
    "pair_types": (*CONDITION, "kind", "n_pairs", "d_pair", "mean_diff", "mean_paired_d", "accuracy_d"),
    "pair_types_all_pairs": (*CONDITION, "kind", "n_pairs", "d_pair", "mean_diff", "mean_paired_d", "accuracy_d"),
    "generation_pairs": (
        "post",
        "base",
        "generation",
        *CONDITION,
        "n_common_studies",
        "d_pair",
        "reason",
        "mean_diff",
        "mean_paired_d",
    ),
    "generations": (*CONDITION, "generation", "n_pairs", "d_pair", "mean_diff", "mean_paired_d"),
    "generations_all_pairs": (*CONDITION, "generation", "n_pairs", "d_pair", "mean_diff", "mean_paired_d"),
    "persona": (
        "comparison",
        "model",
        "kind",
        *CONDITION[:2],
        *CONDITION[3:],
        "study",
        "reference_d",
        "common_d",
        "n_common",
        "only_control",
        "only_persona",
        "n_responses",
        "dropped_responses",
        "mean_benefit",
        "sd_benefit",
        "paired_d",
        "share_helped",
    ),
    "persona_summary": (
        "comparison",
        "model",
        "kind",
        *CONDITION[:2],
        *CONDITION[3:],
        "n_reference_studies",
        "reference_d",
        "n_common_studies",
        "common_d",
        "n_common_participants",
        "only_control",
        "only_persona",
        "mean_benefit",
        "ci_studies_lo",
        "ci_studies_hi",
        "ci_two_level_lo",
        "ci_two_level_hi",
        "wilcoxon_stat",
        "wilcoxon_p",
        "mean_paired_d",
        "share_helped",
    ),
    "accuracy": (
        "model",
        *INFO,
        *CONDITION,
        "n_studies",
        "n_tokens",
        "accuracy",
        "option_accuracy",
        "base_accuracy",
        "base_option_accuracy",
        "accuracy_d",
        "accuracy_reason",
    ),
}


COLUMNS["persona_all_models"] = COLUMNS["persona"]
# Written only when the runs hold a stage chain of >= 3 models (``chains``).
STAGE_COLUMNS = {
    "stages": (*chains.COLUMNS[:5], *CONDITION, *chains.COLUMNS[5:]),
    "stages_by_domain": (*chains.DOMAIN_COLUMNS[:3], *CONDITION, *chains.DOMAIN_COLUMNS[3:]),
}
MIN_CHAIN = 3  # models (base included) for the stage section, CSVs and figure
COLUMNS["persona_summary_all_models"] = COLUMNS["persona_summary"]


@dataclasses.dataclass
class Tables:
    """Every table (name → rows) plus what the figures need beyond them."""

    rows: dict[str, list[dict]]
    domain_columns: tuple[list[str], list[str]]  # reference, extended
    primary: Condition | None
    notes: list[str]


def condition_cols(c: Condition) -> dict:
    """A condition's columns in every table."""
    return c.values(CONDITION)


def _info_cols(run: Run) -> dict:
    return {k: run.info[k] for k in INFO}


def build_tables(
    runs: Sequence[Run],
    categories: Categories,
    ddof_mode: str = "reference",
    n_boot: int = 2000,
    seed: int = 0,
) -> Tables:
    """All tables of the report from loaded runs (see ``COLUMNS`` and the module docstring: the figures' tables
    follow the study's scripts, the ``_all_pairs`` / ``_all_models`` / ``_extended`` ones are the broader
    variants)."""
    runs, notes = dedupe(runs)
    ddofs = resolve_ddof(ddof_mode)
    rows: dict[str, list[dict]] = {
        name: [] for name in (*COLUMNS, *STAGE_COLUMNS, "domains", "domains_all_pairs", "domains_extended")
    }
    scores = {}
    for run in runs:
        studies = study_scores(run)
        score = scores[(run.model, run.condition)] = model_score(studies)
        head = {"model": run.model, **_info_cols(run), **condition_cols(run.condition)}
        status = {"complete": run.complete, "n_done": run.n_done, "n_input": run.n_input}
        rows["model_scores"].append({**head, **score, "n_rejected": run.n_rejected, **status, "path": run.path})
        rows["study_scores"] += [
            {"model": run.model, "kind": run.kind, **condition_cols(run.condition), **s} for s in studies
        ]

    computed: dict[tuple[str, str], tuple[dict, list[dict]]] = {}

    def statistics(post: Run, base: Run) -> tuple[dict, list[dict]]:
        """``pair_statistics`` of a pair, computed once however many tables use it."""
        key = (post.path, base.path)
        if key not in computed:
            computed[key] = pair_statistics(post, base, ddofs, n_boot, seed)
        return computed[key]

    pairs, unpaired = find_pairs(runs)
    stage_chains, chain_notes = find_chains(runs)
    notes += chain_notes
    # A stage chain's intermediate checkpoints (e.g. SFT, DPO) are paired with their base in pair_misalignment,
    # but only its final release counts in the broader means by type and generation.
    intermediate = {(r.model, r.condition) for c in stage_chains for r in c.runs[1:-1]}
    evolution = {(paper.study_file(post), paper.study_file(base)) for post, base, _ in paper.EVOLUTION_PAIRS}
    domain_d: dict[Condition, dict[tuple[str, str], dict[str, float]]] = {}
    pair_of: dict[tuple[str, Condition], tuple[Run, dict]] = {}
    generation_rows_all = []
    for post, base in pairs:
        summary, per_study = statistics(post, base)
        head = {
            "post": post.model,
            "base": base.model,
            **{k: post.info[k] for k in PAIR_INFO},
            **condition_cols(post.condition),
        }
        same_generation = post.info["generation"] == base.info["generation"] != ""
        final = (post.model, post.condition) not in intermediate
        row = {
            **head,
            "ddof": ddofs["pair"],
            **summary,
            "generation_pair": (paper.study_file(post.model), paper.study_file(base.model)) in evolution,
            "generation_pair_all": post.kind in GENERATION_TYPES and same_generation and final,
            "stage": post.info.get("stage", ""),
            "chain": post.info.get("chain", ""),
        }
        rows["pair_misalignment"].append(row)
        rows["pair_paired_stats"] += [{**head, **s} for s in per_study]
        domain_d.setdefault(post.condition, {})[(post.model, base.model)] = _domain_d(per_study)
        pair_of[(post.model, post.condition)] = (base, summary)
        if row["generation_pair_all"]:
            generation_rows_all.append(row)
        logging.info(
            "pair %s vs %s: d_pair %.4f (%s), paired mean diff %.4f",
            post.model,
            base.model,
            summary["d_pair"],
            summary["reason"] or "ok",
            summary["mean_diff"],
        )
    values = ("d_pair", "mean_diff", "mean_paired_d", "accuracy_d")
    finals = [r for r in rows["pair_misalignment"] if (r["post"], _condition_of(r)) not in intermediate]
    rows["pair_types_all_pairs"] = means_by(finals, (*CONDITION, "kind"), values)
    rows["generations_all_pairs"] = means_by(generation_rows_all, (*CONDITION, "generation"), values[:3])

    # fig2 (plot.py): the listed pairs with >= 2 common studies, by the script's type; accuracy_d as
    # plot_accuracy.py (the same list; NaN below 2 common accuracy studies, skipped in the mean).
    type_rows = []
    for post, base, pt_type in paper.listed_pairs(runs, paper.PLOT_PAIRS):
        summary, _ = statistics(post, base)
        if summary["n_common_studies"] < paper.FIG2_MIN_STUDIES:
            continue
        type_rows.append({**condition_cols(post.condition), "kind": pt_type, **{v: summary[v] for v in values}})
    rows["pair_types"] = means_by(type_rows, (*CONDITION, "kind"), values)

    # fig3a (plot_evolution.py): the listed generation pairs, d over >= 1 common study.
    for post, base, generation in paper.listed_pairs(runs, paper.EVOLUTION_PAIRS):
        summary, _ = statistics(post, base)
        d = reference_pair_d(nll_moments(post), nll_moments(base), ddofs["pair"], paper.FIG3A_MIN_STUDIES)
        if not d.per_study:
            continue  # plot_evolution.py: ``if common.empty: continue``
        rows["generation_pairs"].append(
            {
                "post": post.model,
                "base": base.model,
                "generation": generation,
                **condition_cols(post.condition),
                "n_common_studies": len(d.per_study),
                "d_pair": d.d,
                "reason": d.reason,
                "mean_diff": summary["mean_diff"],
                "mean_paired_d": summary["mean_paired_d"],
            }
        )
    rows["generations"] = means_by(rows["generation_pairs"], (*CONDITION, "generation"), values[:3])

    for post, reason in unpaired:
        rows["pair_misalignment"].append(
            {
                "post": post.model,
                "base": post.info["base_hf_id"],
                **{k: post.info[k] for k in PAIR_INFO},
                **condition_cols(post.condition),
                "ddof": ddofs["pair"],
                "d_pair": math.nan,
                "reason": reason,
            }
        )
        notes.append(f"{post.model} ({post.path}): {reason}")

    # fig4 (plot_experiments.py): the listed pairs only, so its "Average" row is over them.
    listed_domain_d: dict[Condition, dict[tuple[str, str], dict[str, float]]] = {}
    for post, base, _ in paper.listed_pairs(runs, paper.EXPERIMENTS_PAIRS):
        listed_domain_d.setdefault(post.condition, {})[(post.model, base.model)] = _domain_d(statistics(post, base)[1])
    columns: dict[str, list[str]] = {
        "domains": [n for n in categories.names if n not in REFERENCE_DROPPED_DOMAINS],
        "domains_extended": [*categories.names, OTHER_DOMAIN],
    }
    for name, per_condition, drop, other in (
        ("domains", listed_domain_d, REFERENCE_DROPPED_DOMAINS, False),
        ("domains_all_pairs", domain_d, REFERENCE_DROPPED_DOMAINS, False),
        ("domains_extended", domain_d, (), True),
    ):
        for cond, per_pair in per_condition.items():
            labels = list(per_pair)
            cols, matrix, average = domain_matrix(per_pair, categories, drop=drop, other=other)
            order = np.argsort([nanmean(r) for r in matrix], kind="stable")  # reference: rows by mean
            rows[name] += [
                {"post": labels[i][0], "base": labels[i][1], **condition_cols(cond), **dict(zip(cols, matrix[i]))}
                for i in order
            ]
            rows[name].append({"post": "Average", "base": "", **condition_cols(cond), **dict(zip(cols, average))})

    # fig5 (plot_meta.py): persona and persona_summary hold the listed models; the _all_models tables every one.
    for comparison, control, persona in find_persona_comparisons(runs):
        summary, per_study = persona_statistics(
            control, persona, ddofs["persona"], n_boot, seed, exclude=paper.META_EXCLUDED
        )
        head = {
            "comparison": comparison,
            "model": persona.model,
            "kind": persona.kind,
            **{k: v for k, v in condition_cols(persona.condition).items() if k != "persona"},
        }
        listed = paper.meta_label(persona.model) is not None
        for suffix in ("", "_all_models") if listed else ("_all_models",):
            rows[f"persona_summary{suffix}"].append({**head, **summary})
            rows[f"persona{suffix}"] += [{**head, **s} for s in per_study]

    for run in runs:
        score = scores[(run.model, run.condition)]
        row = {
            "model": run.model,
            **_info_cols(run),
            **condition_cols(run.condition),
            "n_studies": score["n_accuracy_studies"],
            "n_tokens": sum(p.n_tokens for p in run.participants),
            "accuracy": score["accuracy"],
            "option_accuracy": score["option_accuracy"],
        }
        if (run.model, run.condition) in pair_of:
            base, summary = pair_of[(run.model, run.condition)]
            base_score = scores[(base.model, base.condition)]
            row.update(
                base_accuracy=base_score["accuracy"],
                base_option_accuracy=base_score["option_accuracy"],
                accuracy_d=summary["accuracy_d"],
                accuracy_reason=summary["accuracy_reason"],
            )
        rows["accuracy"].append(row)
    stages = chains.stage_tables(
        stage_chains,
        statistics,
        lambda post, base: pair_statistics(post, base, ddofs, n_boot, seed),
        categories,
        lambda run: condition_cols(run.condition),
        n_boot,
        seed,
    )
    if stages.longest >= MIN_CHAIN:
        rows["stages"], rows["stages_by_domain"] = stages.rows, stages.by_domain
    rows["calibration"] = calibration.model_rows(runs, seed)
    rows["calibration_pairs"] = calibration.pair_rows(pairs, ddofs, n_boot, seed)
    return Tables(rows, (columns["domains"], columns["domains_extended"]), primary_condition(runs), notes)


def _condition_of(row: dict) -> Condition:
    """The NLL condition of a table row (its condition columns)."""
    return Condition.from_mapping({k: row[k] for k in CONDITION})


def _domain_d(per_study: Sequence[dict]) -> dict[str, float]:
    """Study → the domain d_e of a pair (studies both models scored), from ``pair_statistics`` rows."""
    return {s["study"]: s["domain_d"] for s in per_study if s["n_post"] and s["n_base"]}


def write_csv(path: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Rows as CSV with a fixed header; missing cells are empty, NaN is written as ``nan``."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_cell(r.get(k, "")) for k in columns})


def _csv_cell(v):
    """Floats at full precision (repr), NaN as ``nan``."""
    return repr(float(v)) if isinstance(v, (float, np.floating)) else v


def write_tables(t: Tables, out_dir: str) -> None:
    """Every table as ``<name>.csv`` in ``out_dir``, with its fixed columns."""
    for name, columns in COLUMNS.items():
        write_csv(os.path.join(out_dir, f"{name}.csv"), t.rows[name], columns)
    for name, columns in STAGE_COLUMNS.items():
        if t.rows["stages"]:
            write_csv(os.path.join(out_dir, f"{name}.csv"), t.rows[name], columns)
    for name, cols in (
        ("domains", t.domain_columns[0]),
        ("domains_all_pairs", t.domain_columns[0]),
        ("domains_extended", t.domain_columns[1]),
    ):
        write_csv(os.path.join(out_dir, f"{name}.csv"), t.rows[name], ("post", "base", *CONDITION, *cols))
    curve_columns = list(dict.fromkeys(k for r in t.rows["calibration"] for k in r if k.startswith("score_T")))
    write_csv(
        os.path.join(out_dir, "calibration.csv"),
        t.rows["calibration"],
        (*calibration.MODEL_COLUMNS, *curve_columns),
    )
    write_csv(os.path.join(out_dir, "calibration_pairs.csv"), t.rows["calibration_pairs"], calibration.PAIR_COLUMNS)
