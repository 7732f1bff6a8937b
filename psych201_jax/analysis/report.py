"""The analysis report: results directories → CSV tables, PNG figures and ``report.md``.

``generate`` is the whole pipeline (used by ``launch.analyze``): load every run, build the tables
with ``psych201_jax.analysis.metrics``, write them as CSV, draw the figures (each skipped with a note when
its inputs are absent) and write ``report.md`` embedding both.

Figures (modelled on the Psych-201 paper's, drawn for the primary condition, see ``primary_condition``):
  fig_nll_by_size.png        model score vs size, one panel per family, one line per post-training kind (fig2);
  fig_misalignment_by_generation.png  base score vs size per generation, and d_pair per generation (fig3a);
  fig_domains.png            pair × domain heatmap of mean d_e, reference columns, "Average" row (fig4);
  fig_persona.png            per-study persona benefit d per model, reference and common subsets (fig5);
  fig_accuracy.png           accuracy vs size, base vs post-trained per family (fig_accuracy);
  fig_pair_ci.png            paired mean NLL difference per pair with bootstrap CIs (not in the paper).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from psych201_jax import defaults  # noqa: E402
from psych201_jax.analysis import calibration  # noqa: E402
from psych201_jax.analysis import metrics as analysis  # noqa: E402
from psych201_jax.conditions import Condition, ModelInfo  # noqa: E402
from psych201_jax.errors import UserError  # noqa: E402
from psych201_jax.runs import store as results

CATEGORIES_CSV = defaults.CATEGORIES_CSV
CONDITION = Condition.ANALYSIS_FIELDS
INFO = ModelInfo.FIELDS[1:]  # hf_id is the "model" column
TYPE_COLORS = {"base": "C0", "Instruction-tuned": "C1", "Reasoning": "C2", "Vision": "C3", "Code": "C5", "Math": "C6"}

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
        *INFO[:-1],
        *CONDITION,
        "ddof",
        "n_common_studies",
        "d_pair",
        "reason",
        "generation_pair",
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
    "generations": (*CONDITION, "generation", "n_pairs", "d_pair", "mean_diff", "mean_paired_d"),
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


# ------------------------------------------------------------------------------------------ inputs


class IncompleteRunError(UserError):
    """A results directory of a job that has not finished."""


class NoResultsError(UserError, ValueError):
    """A path holds no results directory."""


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


def load_run(path: str) -> analysis.Run:
    """One results directory (``psych201_jax.runs.store`` layout) as an ``analysis.Run``."""
    manifest = results.read_manifest(path)
    if not manifest.get("config", {}).get("model_info"):
        logging.warning(
            "%s: manifest has no config.model_info; the model is labelled by its path and left out of pairs", path
        )
    run = analysis.run_from_rows(manifest, results.iter_rows(path), path)
    n_input = manifest.get("n_input")
    return dataclasses.replace(
        run,
        complete=results.read_complete(path) is not None,
        n_done=len(run.participants) + run.n_rejected,  # every committed row, read once
        n_input=n_input if isinstance(n_input, int) else None,
    )


def load_categories(path: str = CATEGORIES_CSV) -> analysis.Categories:
    """The study category CSV (bundled copy of the reference's by default)."""
    with open(path, newline="") as fh:
        return analysis.parse_categories(csv.DictReader(fh))


def dedupe(runs: Sequence[analysis.Run]) -> tuple[list[analysis.Run], list[str]]:
    """One run per (model, condition): a complete run wins over an incomplete one, else the first; returns
    the kept runs (in input order) and notes on the others. Runs of one condition that differ only in the
    head (options, temperatures: the same NLLs) lend the kept run the head outputs it lacks."""
    best: dict[tuple[str, Condition], analysis.Run] = {}
    for run in runs:
        key = (run.model, run.condition)
        if key not in best or (run.complete and not best[key].complete):
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
                f"{r.path}: same model and condition as {kept.path}; only its head outputs (options, temperatures) "
                f"are used"
            )
        else:
            notes.append(f"{r.path}: same model and condition as {kept.path} ({r.status()}); ignored")
    kept_runs = [merged[(r.model, r.condition)] for r in runs if best[(r.model, r.condition)] is r]
    return kept_runs, notes


def _lend_head_outputs(kept: analysis.Run, other: analysis.Run) -> analysis.Run:
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


def primary_condition(runs: Sequence[analysis.Run]) -> Condition | None:
    """The condition the figures show: without persona, preferring the reference protocol without a
    template (the paper's main setting), then the one with most runs."""
    counts: dict[Condition, int] = {}
    for run in runs:
        counts[run.condition] = counts.get(run.condition, 0) + 1
    plain = [c for c in counts if c.persona == "none"] or list(counts)
    if not plain:
        return None
    return max(
        plain,
        key=lambda c: (
            c.protocol == "reference" and c.template == "none" and not c.persona_subset,
            counts[c],
            str(tuple(_condition_cols(c).values())),
        ),
    )


# ------------------------------------------------------------------------------------------ tables


@dataclasses.dataclass
class Tables:
    """Every table (name → rows) plus what the figures need beyond them."""

    rows: dict[str, list[dict]]
    domain_columns: tuple[list[str], list[str]]  # reference, extended
    primary: Condition | None
    notes: list[str]


def _condition_cols(c: Condition) -> dict:
    return c.values(CONDITION)


def _info_cols(run: analysis.Run) -> dict:
    return {k: run.info[k] for k in INFO}


def build_tables(
    runs: Sequence[analysis.Run],
    categories: analysis.Categories,
    ddof_mode: str = "reference",
    n_boot: int = 2000,
    seed: int = 0,
) -> Tables:
    """All tables of the report from loaded runs (see ``COLUMNS`` and the module docstring)."""
    runs, notes = dedupe(runs)
    ddofs = analysis.resolve_ddof(ddof_mode)
    rows: dict[str, list[dict]] = {name: [] for name in (*COLUMNS, "domains", "domains_extended")}
    scores = {}
    for run in runs:
        studies = analysis.study_scores(run)
        score = scores[(run.model, run.condition)] = analysis.model_score(studies)
        head = {"model": run.model, **_info_cols(run), **_condition_cols(run.condition)}
        status = {"complete": run.complete, "n_done": run.n_done, "n_input": run.n_input}
        rows["model_scores"].append({**head, **score, "n_rejected": run.n_rejected, **status, "path": run.path})
        rows["study_scores"] += [
            {"model": run.model, "kind": run.kind, **_condition_cols(run.condition), **s} for s in studies
        ]

    pairs, unpaired = analysis.find_pairs(runs)
    domain_d: dict[Condition, dict[tuple[str, str], dict[str, float]]] = {}
    pair_of: dict[tuple[str, Condition], tuple[analysis.Run, dict]] = {}
    generation_rows = []
    for post, base in pairs:
        summary, per_study = analysis.pair_statistics(post, base, ddofs, n_boot, seed)
        head = {
            "post": post.model,
            "base": base.model,
            **{k: post.info[k] for k in INFO[:-1]},
            **_condition_cols(post.condition),
        }
        same_generation = post.info["generation"] == base.info["generation"] != ""
        row = {
            **head,
            "ddof": ddofs["pair"],
            **summary,
            "generation_pair": post.kind in analysis.GENERATION_TYPES and same_generation,
        }
        rows["pair_misalignment"].append(row)
        rows["pair_paired_stats"] += [{**head, **s} for s in per_study]
        domain_d.setdefault(post.condition, {})[(post.model, base.model)] = {
            s["study"]: s["domain_d"] for s in per_study if s["n_post"] and s["n_base"]
        }
        pair_of[(post.model, post.condition)] = (base, summary)
        if row["generation_pair"]:
            generation_rows.append(row)
        logging.info(
            "pair %s vs %s: d_pair %.4f (%s), paired mean diff %.4f",
            post.model,
            base.model,
            summary["d_pair"],
            summary["reason"] or "ok",
            summary["mean_diff"],
        )
    rows["pair_types"] = analysis.means_by(
        rows["pair_misalignment"], (*CONDITION, "kind"), ("d_pair", "mean_diff", "mean_paired_d", "accuracy_d")
    )
    rows["generations"] = analysis.means_by(
        generation_rows, (*CONDITION, "generation"), ("d_pair", "mean_diff", "mean_paired_d")
    )
    for post, reason in unpaired:
        rows["pair_misalignment"].append(
            {
                "post": post.model,
                "base": post.info["base_hf_id"],
                **{k: post.info[k] for k in INFO[:-1]},
                **_condition_cols(post.condition),
                "ddof": ddofs["pair"],
                "d_pair": math.nan,
                "reason": reason,
            }
        )
        notes.append(f"{post.model} ({post.path}): {reason}")

    columns: dict[str, list[str]] = {}
    for cond, per_pair in domain_d.items():
        labels = list(per_pair)
        for name, drop, other in (
            ("domains", analysis.REFERENCE_DROPPED_DOMAINS, False),
            ("domains_extended", (), True),
        ):
            cols, matrix, average = analysis.domain_matrix(per_pair, categories, drop=drop, other=other)
            columns[name] = cols
            order = np.argsort([analysis.nanmean(r) for r in matrix], kind="stable")  # reference: rows by mean
            rows[name] += [
                {"post": labels[i][0], "base": labels[i][1], **_condition_cols(cond), **dict(zip(cols, matrix[i]))}
                for i in order
            ]
            rows[name].append({"post": "Average", "base": "", **_condition_cols(cond), **dict(zip(cols, average))})

    for comparison, control, persona in analysis.find_persona_comparisons(runs):
        summary, per_study = analysis.persona_statistics(control, persona, ddofs["persona"], n_boot, seed)
        head = {
            "comparison": comparison,
            "model": persona.model,
            "kind": persona.kind,
            **{k: v for k, v in _condition_cols(persona.condition).items() if k != "persona"},
        }
        rows["persona_summary"].append({**head, **summary})
        rows["persona"] += [{**head, **s} for s in per_study]

    for run in runs:
        score = scores[(run.model, run.condition)]
        row = {
            "model": run.model,
            **_info_cols(run),
            **_condition_cols(run.condition),
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
    if not columns:
        columns = {
            "domains": [n for n in categories.names if n not in analysis.REFERENCE_DROPPED_DOMAINS],
            "domains_extended": [*categories.names, analysis.OTHER_DOMAIN],
        }
    rows["calibration"] = calibration.model_rows(runs, seed)
    rows["calibration_pairs"] = calibration.pair_rows(pairs, ddofs, n_boot, seed)
    return Tables(rows, (columns["domains"], columns["domains_extended"]), primary_condition(runs), notes)


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


# ----------------------------------------------------------------------------------------- figures


def _in(rows: Sequence[dict], cond: Condition | None) -> list[dict]:
    if cond is None:
        return []
    want = _condition_cols(cond)
    return [r for r in rows if all(r.get(k) == v for k, v in want.items() if k in r)]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _size_panels(rows: Sequence[dict], value: str, ylabel: str, path: str) -> str | None:
    """One panel per family: ``value`` vs size_b (log), one line per kind; duplicate (size, kind)
    cells averaged and Math models dropped, as the reference plots do."""
    rows = [r for r in rows if _finite(r["size_b"]) and r["size_b"] > 0 and _finite(r[value]) and r["kind"] != "Math"]
    families = sorted({r["family"] or "(no family)" for r in rows})
    if not families:
        return f"no model with a size and a finite {value} in the primary condition"
    fig, axes = plt.subplots(1, len(families), figsize=(2.4 * len(families) + 0.6, 2.4), sharey=True, squeeze=False)
    for ax, family in zip(axes[0], families):
        members = [r for r in rows if (r["family"] or "(no family)") == family]
        for kind in sorted({r["kind"] for r in members}, key=lambda k: (k != "base", k)):
            cells: dict[float, list[float]] = {}
            for r in members:
                if r["kind"] == kind:
                    cells.setdefault(r["size_b"], []).append(r[value])
            sizes = sorted(cells)
            ax.plot(sizes, [np.mean(cells[s]) for s in sizes], marker="o", label=kind, color=TYPE_COLORS.get(kind))
        _log_sizes(ax, [r["size_b"] for r in members])
        ax.set_title(family)
        ax.set_xlabel("Parameters (billions)")
        ax.grid(True, alpha=0.3, linewidth=0.5)
        ax.legend(frameon=False, fontsize=6)
    axes[0][0].set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return None


def _log_sizes(ax, sizes: Sequence[float]) -> None:
    """Log x axis ticked at the model sizes present."""
    ax.set_xscale("log")
    ticks = sorted(set(sizes))
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _box_strip(ax, groups: Sequence[tuple[str, Sequence[float]]], seed: int = 0) -> None:
    """Box (mean line, no median, no fliers) and jittered points per group, as fig3a / fig5."""
    labels = [g.split("/")[-1] for g, _ in groups]  # HF ids without the organisation
    data = [[v for v in vals if _finite(v)] for _, vals in groups]
    ax.boxplot(
        [d if d else [np.nan] for d in data],
        showfliers=False,
        showmeans=True,
        meanline=True,
        medianprops={"visible": False},
        meanprops={"color": "k", "linestyle": "-", "linewidth": 1.0},
    )
    ax.set_xticks(range(1, len(labels) + 1), labels)
    rng = np.random.default_rng(seed)
    for i, d in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), d, s=6, color="black", alpha=0.7, zorder=3)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.grid(True, axis="y", alpha=0.3, linewidth=0.5)
    ax.tick_params(axis="x", labelrotation=30 if max(map(len, labels), default=0) > 12 else 0, labelsize=7)


def plot_nll_by_size(t: Tables, path: str) -> str | None:
    return _size_panels(_in(t.rows["model_scores"], t.primary), "score", "Negative log-likelihood (↓)", path)


def plot_accuracy(t: Tables, path: str) -> str | None:
    return _size_panels(_in(t.rows["accuracy"], t.primary), "accuracy", "Accuracy (↑)", path)


def plot_misalignment_by_generation(t: Tables, path: str) -> str | None:
    bases = [
        r
        for r in _in(t.rows["model_scores"], t.primary)
        if r["kind"] == "base" and r["generation"] and _finite(r["size_b"]) and r["size_b"] > 0 and _finite(r["score"])
    ]
    gens = _in(t.rows["generations"], t.primary)
    pairs = [r for r in _in(t.rows["pair_misalignment"], t.primary) if r.get("generation_pair")]
    if not bases and not gens:
        return "no base model with a generation and size, and no same-generation pair, in the primary condition"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(7.0, 2.6), gridspec_kw={"width_ratios": [1.4, 1.1]})
    for generation in sorted({r["generation"] for r in bases}):
        cells: dict[float, list[float]] = {}
        for r in bases:
            if r["generation"] == generation:
                cells.setdefault(r["size_b"], []).append(r["score"])
        sizes = sorted(cells)
        ax1.plot(sizes, [np.mean(cells[s]) for s in sizes], marker="o", label=generation)
    _log_sizes(ax1, [r["size_b"] for r in bases])
    ax1.set_xlabel("Parameters (billions)")
    ax1.set_ylabel("Negative log-likelihood (↓)")
    ax1.set_title("Base models")
    ax1.grid(True, alpha=0.3, linewidth=0.5)
    if bases:
        ax1.legend(frameon=False, fontsize=6)
    generations = [g["generation"] for g in gens]
    if generations:
        _box_strip(ax2, [(g, [r["d_pair"] for r in pairs if r["generation"] == g]) for g in generations])
    else:
        ax2.text(0.5, 0.5, "no same-generation pair", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_ylabel("Misalignment d_pair")
    ax2.set_title("Post-trained vs base")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return None


def plot_domains(t: Tables, path: str) -> str | None:
    cols = t.domain_columns[0]
    rows = _in(t.rows["domains"], t.primary)
    pairs = [r for r in rows if r["post"] != "Average"]
    if not pairs or not cols:
        return "no pair in the primary condition"
    matrix = np.array([[r[c] for c in cols] for r in pairs], dtype=np.float64)
    average = np.array([[r[c] for c in cols] for r in rows if r["post"] == "Average"][0], dtype=np.float64)
    if np.all(np.isnan(matrix)):
        return "no study of the pairs is in a reference category"
    col_order = np.argsort(np.where(np.isnan(average), np.inf, average), kind="stable")
    matrix, average = matrix[:, col_order], average[col_order]
    labels = [r["post"] for r in pairs] + ["Average"]
    full = np.vstack([matrix, average])
    vmax = float(np.nanpercentile(np.abs(matrix), 95)) or 1.0
    fig, ax = plt.subplots(figsize=(6.85, 0.22 * len(labels) + 2.8))
    im = ax.imshow(full, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.axhline(len(pairs) - 0.5, color="white", linewidth=2.0)
    for j, v in enumerate(average):
        if not np.isnan(v):
            ax.text(
                j,
                len(pairs),
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=6,
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "black", "linewidth": 0.5},
            )
    ax.set_xticks(range(len(cols)), [cols[i] for i in col_order], rotation=90)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    ax.set_title("Post-training misalignment by domain (mean d_e)")
    fig.colorbar(im, ax=ax, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return None


def plot_persona(t: Tables, path: str) -> str | None:
    if t.primary is None:
        return "no run without persona"
    want = {k: v for k, v in _condition_cols(t.primary).items() if k != "persona"}
    rows = [r for r in t.rows["persona"] if all(r[k] == v for k, v in want.items())]
    panels = [
        (f"{comparison}: {label}", comparison, column)
        for comparison, column, label in (
            ("matched_vs_none", "reference_d", "reference subsets"),
            ("matched_vs_none", "common_d", "common subset"),
            ("matched_vs_shuffled", "common_d", "common subset"),
        )
        if any(r["comparison"] == comparison for r in rows)
    ]
    if not panels:
        return "no persona comparison (a matched-persona run with its no-persona run) in the primary condition"
    groups = (("Base models", lambda k: k == "base"), ("Post-trained models", lambda k: k != "base"))
    fig, axes = plt.subplots(len(panels), 2, figsize=(8.0, 3.4 * len(panels)), sharey="row", squeeze=False)
    for (title, comparison, column), ax_row in zip(panels, axes):
        for ax, (group, member) in zip(ax_row, groups):
            sel = [r for r in rows if r["comparison"] == comparison and member(r["kind"])]
            models = list(dict.fromkeys(r["model"] for r in sel))
            if models:
                _box_strip(ax, [(m, [r[column] for r in sel if r["model"] == m]) for m in models])
            else:
                ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"{group}\n{title.replace('_', ' ')}", fontsize=8)
        ax_row[0].set_ylabel("Persona benefit (d)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return None


def plot_pair_ci(t: Tables, path: str) -> str | None:
    rows = [r for r in _in(t.rows["pair_misalignment"], t.primary) if _finite(r.get("mean_diff"))]
    if not rows:
        return "no pair with matched responses in the primary condition"
    rows = sorted(rows, key=lambda r: r["mean_diff"])
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7.0, 0.25 * len(rows) + 1.4))
    for offset, (lo, hi, label, color) in zip(
        (-0.15, 0.15),
        (
            ("ci_studies_lo", "ci_studies_hi", "studies", "C0"),
            ("ci_two_level_lo", "ci_two_level_hi", "studies → participants", "C1"),
        ),
    ):
        mean = np.array([r["mean_diff"] for r in rows])
        low = np.array([r[lo] for r in rows], dtype=np.float64)
        high = np.array([r[hi] for r in rows], dtype=np.float64)
        ok = ~np.isnan(low)
        ax.errorbar(
            mean[ok],
            y[ok] + offset,
            xerr=[mean[ok] - low[ok], high[ok] - mean[ok]],
            fmt="none",
            ecolor=color,
            capsize=2,
            label=f"95% CI ({label})",
        )
    ax.scatter([r["mean_diff"] for r in rows], y, color="black", s=10, zorder=3)
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_yticks(y, [r["post"] for r in rows], fontsize=6)
    ax.set_xlabel("Paired NLL difference post − base, mean over studies (> 0: post-training worse)")
    ax.legend(frameon=False, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return None


def plot_calibration_curves(t: Tables, path: str) -> str | None:
    rows = [r for r in t.rows["calibration"] if r["study"] == "ALL"]
    if not rows:
        return "no results with a temperature grid (config temperatures)"
    families = sorted({r["family"] or r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.4), squeeze=False)
    for ax, family in zip(axes[0], families):
        for r in (r for r in rows if (r["family"] or r["model"]) == family):
            ts = [float(k[len("score_T") :]) for k in r if k.startswith("score_T")]
            ys = [r[k] for k in r if k.startswith("score_T")]
            style = "-" if r["kind"] == "base" else "--"
            ax.plot(ts, ys, style, color=TYPE_COLORS.get(r["kind"], "C7"), label=_short(r["model"]))
            for key in ("t_fit_half0", "t_fit_half1"):
                if _finite(r[key]):
                    ax.axvline(r[key], color=TYPE_COLORS.get(r["kind"], "C7"), linewidth=0.5, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T (lines: cross-fitted T per half)")
        ax.set_ylabel("Score at T (mean NLL)")
        ax.set_title(family, fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return None


def plot_calibrated_misalignment(t: Tables, path: str) -> str | None:
    rows = [r for r in t.rows["calibration_pairs"] if _finite(r["d_pair_raw"]) or _finite(r["d_pair_calibrated"])]
    if not rows:
        return "no pair with a temperature grid on both models"
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(6.5, 0.3 * len(rows) + 1.4))
    for i, r in enumerate(rows):
        ax.plot([r["d_pair_raw"], r["d_pair_calibrated"]], [i, i], color="0.6", linewidth=1)
    ax.scatter([r["d_pair_raw"] for r in rows], y, color="C3", label="raw", zorder=3)
    ax.scatter([r["d_pair_calibrated"] for r in rows], y, color="C0", label="cross-fitted temperature", zorder=3)
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_yticks(y, [_short(r["post"]) for r in rows], fontsize=7)
    ax.set_xlabel("d_pair (> 0: post-training moved the model away from humans)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return None


FIGURES = (
    ("fig_nll_by_size.png", "NLL by model size, base vs post-trained per family (fig2)", plot_nll_by_size),
    (
        "fig_misalignment_by_generation.png",
        "Base NLL and post-training misalignment by generation (fig3a)",
        plot_misalignment_by_generation,
    ),
    ("fig_domains.png", "Post-training misalignment by domain (fig4)", plot_domains),
    ("fig_persona.png", "Persona benefit (fig5)", plot_persona),
    ("fig_accuracy.png", "Accuracy, base vs post-trained (fig_accuracy)", plot_accuracy),
    ("fig_pair_ci.png", "Paired post − base NLL difference with bootstrap CIs", plot_pair_ci),
    (
        "fig_calibration_curves.png",
        "Score against temperature, base vs post-trained per family",
        plot_calibration_curves,
    ),
    ("fig_calibrated_misalignment.png", "Raw vs calibrated d_pair per pair", plot_calibrated_misalignment),
)


def draw_figures(t: Tables, out_dir: str) -> dict[str, str | None]:
    """Draws every figure; file name → None if written, else why it was skipped. A figure that
    fails is skipped with the error as its note, so the report is always written."""
    notes = {}
    for name, _, plot in FIGURES:
        path = os.path.join(out_dir, name)
        try:
            notes[name] = plot(t, path)
        except Exception as err:  # noqa: BLE001 - one broken figure must not lose the report
            logging.exception("figure %s failed", name)
            plt.close("all")
            notes[name] = f"failed: {type(err).__name__}: {err}"
        if notes[name] is not None and os.path.exists(path):
            os.remove(path)
    return notes


# ------------------------------------------------------------------------------------------ report


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


def _short(hf_id: str) -> str:
    return hf_id.split("/")[-1]


def render_report(
    t: Tables, figures: dict[str, str | None], ddof_mode: str, n_boot: int, seed: int, n_inputs: int
) -> str:
    """The text of report.md."""
    ddofs = analysis.resolve_ddof(ddof_mode)
    primary = ", ".join(f"{k}={v}" for k, v in _condition_cols(t.primary).items()) if t.primary else "none"
    out = [
        "# Psych-201 analysis report\n",
        f"{n_inputs} results directories, {len(t.rows['model_scores'])} runs analysed. "
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
        "- Generations: pairs of an Instruction-tuned or Reasoning model with a base of its own generation "
        "(`generation_pair` in pair_misalignment.csv), as fig3a; Vision, Code and Math pairs are left out.",
        "- Domains: per-study d (domain ddof) inner-joined with the bundled category CSV, mean per category; "
        "domains.csv drops Intertemporal Choice, Moral Judgment, Psychophysics and Cognitive Control as fig4, "
        "domains_extended.csv keeps them and adds Other (uncategorised or not in the CSV).",
        "- Persona benefit = NLL without (or with a shuffled) persona − NLL with the matched persona "
        f"(positive = the persona helps); {', '.join(analysis.PERSONA_EXCLUDED)} excluded as in the reference. "
        "reference_d uses each run's own participants (as plot_meta); common_d and the per-participant "
        "statistics use participants scored in both runs, on their common prefix of responses.",
        "- Accuracy = argmax over the full vocabulary == human token, per scored token, pooled per study, mean "
        "over studies; accuracy d = post − base (negative = post-training worse). Option-restricted accuracy "
        "needs `option_argmax` in the rows; n/a otherwise.\n",
    ]
    if t.notes:
        out += ["## Input notes\n"] + [f"- {n}" for n in t.notes] + [""]
    out += _calibration_section(t)
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
        "domains_extended.csv (all 11 categories plus Other), persona.csv (per model × study).\n"
    )
    return "\n".join(out)


def generate(
    paths: Sequence[str],
    out_dir: str,
    *,
    ddof_mode: str = "reference",
    n_boot: int = 2000,
    seed: int = 0,
    categories_csv: str = CATEGORIES_CSV,
    allow_incomplete: bool = False,
) -> dict[str, str | None]:
    """Loads the results dirs under ``paths``, writes every CSV, figure and report.md into
    ``out_dir``; returns the figure notes (None = written).

    An incomplete run (killed, or still running) is refused unless ``allow_incomplete``, and then marked as
    incomplete with its counts on the console, in report.md and in model_scores.csv; a complete run of the
    same model and condition always wins over it.
    """
    dirs = find_results_dirs(paths)
    runs = []
    for d in dirs:
        run = load_run(d)
        if not run.complete:
            if not allow_incomplete:
                raise IncompleteRunError(
                    f"{d}: {run.status()}; finish it by rerunning its job, or pass --allow_incomplete to include "
                    f"it marked as incomplete"
                )
            logging.warning("%s: %s, included (--allow_incomplete)", d, run.status())
        logging.info(
            "%s: %s (%s), %d participants scored, %d rejected",
            d,
            run.model,
            run.kind,
            len(run.participants),
            run.n_rejected,
        )
        runs.append(run)
    tables = build_tables(runs, load_categories(categories_csv), ddof_mode, n_boot, seed)
    os.makedirs(out_dir, exist_ok=True)
    for name, columns in COLUMNS.items():
        write_csv(os.path.join(out_dir, f"{name}.csv"), tables.rows[name], columns)
    for name, cols in (("domains", tables.domain_columns[0]), ("domains_extended", tables.domain_columns[1])):
        write_csv(os.path.join(out_dir, f"{name}.csv"), tables.rows[name], ("post", "base", *CONDITION, *cols))
    curve_columns = list(dict.fromkeys(k for r in tables.rows["calibration"] for k in r if k.startswith("score_T")))
    write_csv(
        os.path.join(out_dir, "calibration.csv"),
        tables.rows["calibration"],
        (*calibration.MODEL_COLUMNS, *curve_columns),
    )
    write_csv(
        os.path.join(out_dir, "calibration_pairs.csv"), tables.rows["calibration_pairs"], calibration.PAIR_COLUMNS
    )
    figures = draw_figures(tables, out_dir)
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write(render_report(tables, figures, ddof_mode, n_boot, seed, len(dirs)))
    return figures
