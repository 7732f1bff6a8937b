"""report.md: conventions, input notes, the calibration control, the figures and summary tables."""

from __future__ import annotations

import math
from collections.abc import Sequence

from psych201_jax.analysis import calibration, chains, simulated
from psych201_jax.analysis.behaviour_figures import BEHAVIOUR_FIGURES
from psych201_jax.analysis.figures import FIGURES, STAGE_FIGURE
from psych201_jax.analysis.metrics import resolve_ddof
from psych201_jax.analysis.persona import PERSONA_EXCLUDED
from psych201_jax.analysis.tables import Tables, condition_cols


def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|")


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    if not rows:
        return "_(no rows)_\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _incomplete_note(model_scores: Sequence[dict]) -> list[str]:
    """report.md's warning about incomplete runs (included with --allow_incomplete), with their counts."""
    rows = [r for r in model_scores if not r["complete"]]
    if not rows:
        return []
    lines = [
        f"**Warning: {len(rows)} incomplete run(s)** (included with --allow_incomplete; their scores cover only the "
        "participants committed so far):\n"
    ]
    for r in rows:
        total = "?" if r["n_input"] is None else r["n_input"]
        lines.append(f"- {r['model']} ({r['path']}): incomplete, {r['n_done']} of {total} participants")
    return [*lines, ""]


def _calibration_section(t: Tables) -> list[str]:
    """report.md's calibration control: method, one sentence per family, the pair table."""
    rows = t.rows["calibration_pairs"]
    out = [
        "## Calibration control\n",
        "Is post-training's misalignment over-confidence a single temperature undoes? Each model's best "
        "temperature is cross-fitted: fitted on one half of the participants (seeded hash), evaluated on the other, "
        "and swapped; d_pair and the paired statistics are recomputed at those temperatures "
        "(calibration.csv, calibration_pairs.csv).\n",
    ]
    if not rows:
        return [*out, "_No pair with a temperature grid on both models (config temperatures)._\n"]
    out += calibration.conclusions(rows) + [""]
    columns = (
        "post",
        "base",
        "d_pair_raw",
        "d_pair_calibrated",
        "share_removed",
        "share_removed_ci_lo",
        "share_removed_ci_hi",
        "entropy_post",
        "entropy_base",
    )
    return [*out, markdown_table(rows, columns), ""]


def _stage_section(t: Tables, figures: dict[str, str | None]) -> list[str]:
    """report.md's stage chains: method, one sentence per chain (primary condition), figure and table; only
    when the runs hold a chain of >= 3 models (the tables then have stage rows)."""
    if not t.rows["stages"]:
        return []
    want = condition_cols(t.primary) if t.primary else {}
    rows = [r for r in t.rows["stages"] if all(r.get(k) == v for k, v in want.items())]
    name, title, _ = STAGE_FIGURE
    note = figures.get(name)
    out = [
        "## Stage chains: which post-training stage costs human-likeness\n",
        "Every stage of a chain (model_info.chain, ordered by model_info.stage) is compared with the base and with "
        "the previous stage on the responses every member of the chain scored: d_pair and the paired mean NLL "
        "difference with its 95% bootstrap CI over studies (stages.csv; per domain: stages_by_domain.csv). A "
        "stage's share = its paired mean difference from the previous stage / the final stage's paired mean "
        "difference from the base; on common responses the steps add up exactly, so the shares sum to 1 (CI: "
        f"studies resampled, the same draws for every stage). No shares when the final difference is within "
        f"{chains.SHARE_EPS:g} nats of 0. A chain's intermediate checkpoints are also pairs of "
        "pair_misalignment.csv, but only its final release counts in the broader means by type and generation.\n",
        *(chains.conclusions(rows) or ["_No chain in the primary condition._"]),
        "",
        f"### {title}\n",
        f"![{title}]({name})\n" if note is None else f"_Skipped: {note}._\n",
        markdown_table(
            rows,
            (
                "chain",
                "stage",
                "model",
                "d_pair_vs_base",
                "mean_diff_vs_base",
                "ci_studies_lo_vs_base",
                "ci_studies_hi_vs_base",
                "d_pair_vs_previous",
                "mean_diff_vs_previous",
                "share",
                "share_ci_lo",
                "share_ci_hi",
            ),
        ),
        "",
    ]
    return out


# The paired metrics of the generated-behaviour section: metric, its words for a CI below 0 and above 0, unit.
BEHAVIOUR_SENTENCE = (
    ("sample_entropy", "narrower", "wider", " bits"),
    ("exact_match", "matches the human response less often", "matches it more often", ""),
    ("js", "closer to the humans' categories", "further from them", " bits"),
    ("wasserstein_scaled", "closer to the humans' values", "further from them", " human SDs"),
)
BEHAVIOUR_TABLE_METRICS = (
    "exact_match",
    "sample_entropy",
    "sample_distinct",
    "tv",
    "js",
    "wasserstein_scaled",
    "crps_scaled",
)


def _behaviour_sentence(p: simulated.PairResult) -> str:
    """One sentence of a comparison: each headline paired difference, its CI and what its sign says."""
    c = p.comparison
    parts = []
    for metric, below, above, unit in BEHAVIOUR_SENTENCE:
        d = p.difference(metric)
        if d is None or not d.n_studies:
            continue
        if math.isnan(d.ci[0]):
            verdict = "no CI"
        else:
            verdict = below if d.ci[1] < 0 else above if d.ci[0] > 0 else "the CI includes 0"
        parts.append(
            f"{metric} {d.mean:+.3g}{unit} [{_fmt(d.ci[0])}, {_fmt(d.ci[1])}] over {d.n_studies} "
            f"stud{'y' if d.n_studies == 1 else 'ies'} ({verdict})"
        )
    against = "its base" if c.against == "base" else "the previous stage"
    chain = f", chain {c.chain}" if c.chain else ""
    return f"- **{c.post.model}** against {against} {c.base.model} ({c.post.label()}{chain}): " + (
        "; ".join(parts) + "." if parts else "no study both simulated."
    )


def behaviour_section(
    bt: simulated.BehaviourTables, figures: dict[str, str | None], n_boot: int, seed: int
) -> list[str]:
    """report.md's generated-behaviour section: method and caveat, notes, one sentence and a short table per
    comparison, the figures, the runs."""
    out = [
        "## Generated behaviour (simulated participants)\n",
        "Each simulation run samples k responses at every response slot from the human transcript up to that "
        "slot's opening marker. This is teacher-forced slot sampling, not a closed-loop simulation of the task: "
        "the history holds the human's earlier responses, and the environment's feedback (rewards, outcomes, the "
        "next trial) follows the human's choices, not the model's. Each study's response type (category, "
        "ordinal, number, free text) comes from its human responses. Per model and study (behaviour.csv): "
        "exact-match rate of samples to the human response; fair CRPS (numbers and ordinal ratings); pooled "
        "samples against pooled human responses, total variation and Jensen–Shannon (categories) or 1-Wasserstein "
        f"(ordinal, numbers; scaled by the human SD to average over studies), 95% bootstrap CIs over participants "
        f"({n_boot} replicates, seed {seed}); diversity: mean per-slot entropy and distinct samples against the "
        "human spread across participants at one slot position (plug-in entropy grows with the number of "
        "responses: k samples against n participants, so compare models with each other, and humans only as a "
        "reference). Pairs (behaviour_pairs.csv): post − base per metric, mean over the studies both have, "
        "95% bootstrap CI over studies; each stage of a stage chain also against the previous stage; "
        "response_type `all` and per type. Runs are compared only within one sampling setting.\n",
    ]
    if bt.notes:
        out += [f"- {n}" for n in bt.notes] + [""]
    if not bt.pairs:
        out.append("_No base / post-trained pair of simulations in one sampling setting._\n")
    for p in bt.pairs:
        out += [_behaviour_sentence(p), ""]
        rows = [
            r
            for r in simulated.pair_rows(p)
            if r["response_type"] == simulated.ALL_TYPES and r["metric"] in BEHAVIOUR_TABLE_METRICS
        ]
        out.append(
            markdown_table(
                rows, ("metric", "n_studies", "mean_base", "mean_post", "mean_human", "mean_diff", "ci_lo", "ci_hi")
            )
        )
    for name, title, _ in BEHAVIOUR_FIGURES:
        note = figures.get(name)
        out += [f"### {title}\n", f"![{title}]({name})\n" if note is None else f"_Skipped: {note}._\n"]
    out += [
        "### Simulation runs\n",
        "Full tables: [behaviour.csv](behaviour.csv) (per model × study), [behaviour_pairs.csv](behaviour_pairs.csv), "
        "[behaviour_runs.csv](behaviour_runs.csv).\n",
        markdown_table(
            bt.rows["behaviour_runs"],
            (
                "model",
                "kind",
                "samples",
                "temperature",
                "mean_temperature",
                "n_participants",
                "n_rejected",
                "share_length_stopped",
                "complete",
            ),
        ),
    ]
    return out


def render_report(
    t: Tables,
    figures: dict[str, str | None],
    ddof_mode: str,
    n_boot: int,
    seed: int,
    n_inputs: int,
    behaviour: simulated.BehaviourTables | None = None,
) -> str:
    """The text of report.md; the generated-behaviour section only with ``behaviour`` (simulation runs)."""
    ddofs = resolve_ddof(ddof_mode)
    primary = ", ".join(f"{k}={v}" for k, v in condition_cols(t.primary).items()) if t.primary else "none"
    out = [
        "# Psych-201 analysis report\n",
        f"{n_inputs} results directories, {len(t.rows['model_scores'])} runs analysed"
        + (f" and {len(behaviour.runs)} simulation runs" if behaviour is not None else "")
        + ". "
        f"Figures show the primary condition ({primary}); the CSV tables beside this file cover every condition.\n",
        *_incomplete_note(t.rows["model_scores"]),
        "## Conventions\n",
        f"- ddof mode `{ddof_mode}`: pairs and generations ddof={ddofs['pair']}, domains ddof={ddofs['domain']}, "
        f"persona ddof={ddofs['persona']}, accuracy ddof={ddofs['accuracy']}.",
        "- Score = mean over studies of the response-pooled mean NLL (lower = more human-like).",
        "- Reference d_pair = mean over common studies of (μ_post − μ_base)/sqrt((σ_post² + σ_base²)/2) on "
        "response NLLs; ≥ 2 common studies; positive = post-training moved the model away from humans.",
        "- Paired statistics: post − base on the same responses (same participant and response index, "
        "participants with equal response counts only); per-study means, their mean over studies, 95% "
        f"percentile bootstrap CIs ({n_boot} replicates, seed {seed}) resampling studies, and studies then "
        "participants; Wilcoxon signed-rank test across studies.",
        "- Paired d = mean difference / SD of the differences (d_z), with the ddof of its analysis.",
        "- Figure definitions: each paper figure's table selects its pairs, models, studies and minimum counts "
        "as the study's script for it does, by the study's file name of the model (id with / → -, .pth): "
        "pair_types.csv as fig2's plot.py (its PAIRS, ≥ 2 common studies, mean per its post-training type; "
        "accuracy_d as plot_accuracy.py, the same list); generations.csv and generation_pairs.csv as fig3a's "
        "plot_evolution.py (only its Qwen2/2.5/3/3.5 pairs of a base of the same generation, so no DeepSeek-R1 "
        "distill; ≥ 1 common study); domains.csv as fig4's plot_experiments.py (its 25 pairs; Average over them); "
        "persona.csv and persona_summary.csv as fig5's plot_meta.py (its 22 models); accuracy.csv as "
        "plot_accuracy.py (every model); model_scores.csv as plot.py and plot_instruct.py (every model and "
        "condition). A model outside a script's list is only in the broader tables.",
        "- Broader variants (not the paper's): pair_misalignment.csv (every pair by model_info.base_hf_id, "
        "≥ 2 common studies), pair_types_all_pairs.csv, generations_all_pairs.csv (every Instruction-tuned or "
        "Reasoning pair whose base has its generation, DeepSeek-R1 distills included, ≥ 2 common studies; "
        "`generation_pair_all`), domains_all_pairs.csv (every pair), domains_extended.csv (every pair, all 11 "
        "categories plus Other), persona_all_models.csv and persona_summary_all_models.csv.",
        "- Domains: per-study d (domain ddof) inner-joined with the bundled category CSV, mean per category; "
        "domains.csv and domains_all_pairs.csv drop Intertemporal Choice, Moral Judgment, Psychophysics and "
        "Cognitive Control as fig4.",
        "- Runs: one per model id, model fingerprint (the manifest's model source hashes) and condition; one id "
        "with two fingerprints under one condition is an error. When a model has a plain run and an accuracy run "
        "(options=study) of one condition, the NLLs are the complete plain run's (else the first complete one's); "
        "the accuracy run lends only its option choices. The two runs share the forward pass but not the head "
        "program, so their NLLs may differ by up to 1.5e-5.",
        "- Persona benefit = NLL without (or with a shuffled) persona − NLL with the matched persona "
        f"(positive = the persona helps); {', '.join(PERSONA_EXCLUDED)} excluded as in the reference. "
        "reference_d uses each run's own participants (as plot_meta); common_d and the per-participant "
        "statistics use participants scored in both runs, on their common prefix of responses.",
        "- Accuracy = argmax over the full vocabulary == human token, per scored token, pooled per study, mean "
        "over studies; accuracy d = post − base (negative = post-training worse). Option-restricted accuracy "
        "needs `option_argmax` in the rows; n/a otherwise.\n",
    ]
    if t.notes:
        out += ["## Input notes\n"] + [f"- {n}" for n in t.notes] + [""]
    out += _calibration_section(t)
    out += _stage_section(t, figures)
    if behaviour is not None:
        out += behaviour_section(behaviour, figures, n_boot, seed)
    out += ["## Figures\n"]
    for name, title, _ in FIGURES:
        note = figures.get(name)
        out.append(f"### {title}\n")
        out.append(f"![{title}]({name})\n" if note is None else f"_Skipped: {note}._\n")
    sections = (
        (
            "Model scores",
            "model_scores",
            (
                "model",
                "kind",
                "size_b",
                "protocol",
                "template",
                "persona",
                "n_studies",
                "n_participants",
                "n_responses",
                "score",
                "score_participant",
                "accuracy",
                "option_accuracy",
            ),
        ),
        (
            "Post-training misalignment per pair",
            "pair_misalignment",
            (
                "post",
                "base",
                "kind",
                "protocol",
                "template",
                "persona",
                "persona_subset",
                "n_common_studies",
                "d_pair",
                "reason",
                "mean_diff",
                "ci_studies_lo",
                "ci_studies_hi",
                "ci_two_level_lo",
                "ci_two_level_hi",
                "wilcoxon_p",
                "mean_paired_d",
                "matched_responses",
                "unaligned_participants",
            ),
        ),
        (
            "Means by post-training type",
            "pair_types",
            (
                "kind",
                "protocol",
                "template",
                "persona",
                "persona_subset",
                "n_pairs",
                "d_pair",
                "mean_diff",
                "mean_paired_d",
                "accuracy_d",
            ),
        ),
        (
            "Means by generation",
            "generations",
            ("generation", "protocol", "template", "persona", "n_pairs", "d_pair", "mean_diff", "mean_paired_d"),
        ),
        (
            "Domains (reference categories)",
            "domains",
            ("post", "protocol", "template", "persona", *t.domain_columns[0]),
        ),
        (
            "Persona (summary)",
            "persona_summary",
            (
                "comparison",
                "model",
                "kind",
                "reference_d",
                "common_d",
                "n_common_participants",
                "only_control",
                "mean_benefit",
                "ci_studies_lo",
                "ci_studies_hi",
                "wilcoxon_p",
                "share_helped",
            ),
        ),
        (
            "Accuracy",
            "accuracy",
            (
                "model",
                "kind",
                "protocol",
                "template",
                "persona",
                "accuracy",
                "option_accuracy",
                "base_accuracy",
                "accuracy_d",
                "accuracy_reason",
            ),
        ),
    )
    out.append("## Tables\n")
    for title, name, columns in sections:
        out += [f"### {title}\n", f"Full table: [{name}.csv]({name}.csv).\n", markdown_table(t.rows[name], columns)]
    out.append(
        "Also written: study_scores.csv (per model × study), pair_paired_stats.csv (per pair × study), "
        "domains_extended.csv (all 11 categories plus Other), persona.csv (per model × study), and the broader "
        "variants named above.\n"
    )
    return "\n".join(out)
