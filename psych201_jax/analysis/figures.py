"""The report's figures, modelled on the Psych-201 paper's and drawn for the primary condition.

  fig_nll_by_size.png        model score vs size, one panel per family, one line per post-training kind (fig2);
  fig_misalignment_by_generation.png  base score vs size per generation, and d_pair per generation (fig3a);
  fig_domains.png            pair × domain heatmap of mean d_e, reference columns, "Average" row (fig4);
  fig_misalignment_by_generation_all_pairs.png, fig_domains_all_pairs.png  the same over the project's broader
                             selections (generations_all_pairs.csv, domains_all_pairs.csv);
Each paper figure draws the table that selects as the study's script does (``tables``, ``paper``).
  fig_persona.png            per-study persona benefit d per model, reference and common subsets (fig5);
  fig_persona_all_models.png the same for every model with a persona run (persona_all_models.csv);
  fig_accuracy.png           accuracy vs size, base vs post-trained per family (fig_accuracy);
  fig_pair_ci.png            paired mean NLL difference per pair with bootstrap CIs (not in the paper);
  fig_calibration_curves.png, fig_calibrated_misalignment.png  the calibration control;
  fig_stages.png             misalignment of every stage of a stage chain against its base, one line per chain
                             with CIs (drawn only when a chain of >= 3 models is scored; ``STAGE_FIGURE``).

Each ``plot_*`` writes one PNG or returns why it was skipped. Figures are ``matplotlib.figure.Figure``
objects, not pyplot's, so no global figure state is kept; importing this selects no backend (the command does).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from psych201_jax.analysis import paper
from psych201_jax.analysis.tables import Tables, condition_cols
from psych201_jax.conditions import STAGE_ORDER, Condition

TYPE_COLORS = {"base": "C0", "Instruction-tuned": "C1", "Reasoning": "C2", "Vision": "C3", "Code": "C5", "Math": "C6"}


def _subplots(*args, figsize: tuple[float, float], **kwargs) -> tuple[Figure, Any]:
    """``pyplot.subplots`` without pyplot: a new figure and its axes."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _save(fig: Figure, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def _in(rows: Sequence[dict], cond: Condition | None) -> list[dict]:
    if cond is None:
        return []
    want = condition_cols(cond)
    return [r for r in rows if all(r.get(k) == v for k, v in want.items() if k in r)]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _short(hf_id: str) -> str:
    return hf_id.split("/")[-1]


def _size_panels(rows: Sequence[dict], value: str, ylabel: str, path: str) -> str | None:
    """One panel per family: ``value`` vs size_b (log), one line per kind; duplicate (size, kind)
    cells averaged and Math models dropped, as the reference plots do."""
    rows = [r for r in rows if _finite(r["size_b"]) and r["size_b"] > 0 and _finite(r[value]) and r["kind"] != "Math"]
    families = sorted({r["family"] or "(no family)" for r in rows})
    if not families:
        return f"no model with a size and a finite {value} in the primary condition"
    fig, axes = _subplots(1, len(families), figsize=(2.4 * len(families) + 0.6, 2.4), sharey=True, squeeze=False)
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
    _save(fig, path)
    return None


def _log_sizes(ax, sizes: Sequence[float]) -> None:
    """Log x axis ticked at the model sizes present."""
    ax.set_xscale("log")
    ticks = sorted(set(sizes))
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


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


def plot_misalignment_by_generation(t: Tables, path: str, *, paper_definition: bool = True) -> str | None:
    """fig3a. Paper definition (plot_evolution.py): the base models its ``qwen_generation`` names, and the
    pairs of generation_pairs.csv; otherwise (``_all_pairs``) every base with a generation and the pairs of
    generations_all_pairs.csv (``generation_pair_all`` in pair_misalignment.csv)."""
    scored = [
        r
        for r in _in(t.rows["model_scores"], t.primary)
        if _finite(r["size_b"]) and r["size_b"] > 0 and _finite(r["score"])
    ]
    if paper_definition:
        bases = [
            {**r, "generation": g} for r in scored if (g := paper.evolution_base_generation(r["model"])) is not None
        ]
        gens = _in(t.rows["generations"], t.primary)
        pairs = _in(t.rows["generation_pairs"], t.primary)
    else:
        bases = [r for r in scored if r["kind"] == "base" and r["generation"]]
        gens = _in(t.rows["generations_all_pairs"], t.primary)
        pairs = [r for r in _in(t.rows["pair_misalignment"], t.primary) if r.get("generation_pair_all")]
    if not bases and not gens:
        return "no base model with a generation and size, and no same-generation pair, in the primary condition"
    fig, (ax1, ax2) = _subplots(1, 2, figsize=(7.0, 2.6), gridspec_kw={"width_ratios": [1.4, 1.1]})
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
    _save(fig, path)
    return None


def plot_domains(t: Tables, path: str, *, table: str = "domains") -> str | None:
    """fig4 from ``table``: domains.csv (plot_experiments.py's pairs) or domains_all_pairs.csv."""
    cols = t.domain_columns[0]
    rows = _in(t.rows[table], t.primary)
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
    fig, ax = _subplots(figsize=(6.85, 0.22 * len(labels) + 2.8))
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
    _save(fig, path)
    return None


def plot_persona(t: Tables, path: str, *, table: str = "persona") -> str | None:
    """fig5 from ``table``: persona.csv (plot_meta.py's models) or persona_all_models.csv."""
    if t.primary is None:
        return "no run without persona"
    want = {k: v for k, v in condition_cols(t.primary).items() if k != "persona"}
    rows = [r for r in t.rows[table] if all(r[k] == v for k, v in want.items())]
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
    fig, axes = _subplots(len(panels), 2, figsize=(8.0, 3.4 * len(panels)), sharey="row", squeeze=False)
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
    _save(fig, path)
    return None


def plot_pair_ci(t: Tables, path: str) -> str | None:
    rows = [r for r in _in(t.rows["pair_misalignment"], t.primary) if _finite(r.get("mean_diff"))]
    if not rows:
        return "no pair with matched responses in the primary condition"
    rows = sorted(rows, key=lambda r: r["mean_diff"])
    y = np.arange(len(rows))
    fig, ax = _subplots(figsize=(7.0, 0.25 * len(rows) + 1.4))
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
    _save(fig, path)
    return None


def plot_calibration_curves(t: Tables, path: str) -> str | None:
    rows = [r for r in t.rows["calibration"] if r["study"] == "ALL"]
    if not rows:
        return "no results with a temperature grid (config temperatures)"
    families = sorted({r["family"] or r["model"] for r in rows})
    fig, axes = _subplots(1, len(families), figsize=(4.2 * len(families), 3.4), squeeze=False)
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
    _save(fig, path)
    return None


def plot_calibrated_misalignment(t: Tables, path: str) -> str | None:
    rows = [r for r in t.rows["calibration_pairs"] if _finite(r["d_pair_raw"]) or _finite(r["d_pair_calibrated"])]
    if not rows:
        return "no pair with a temperature grid on both models"
    y = np.arange(len(rows))
    fig, ax = _subplots(figsize=(6.5, 0.3 * len(rows) + 1.4))
    for i, r in enumerate(rows):
        ax.plot([r["d_pair_raw"], r["d_pair_calibrated"]], [i, i], color="0.6", linewidth=1)
    ax.scatter([r["d_pair_raw"] for r in rows], y, color="C3", label="raw", zorder=3)
    ax.scatter([r["d_pair_calibrated"] for r in rows], y, color="C0", label="cross-fitted temperature", zorder=3)
    ax.axvline(0, color="black", linewidth=0.5)
    ax.set_yticks(y, [_short(r["post"]) for r in rows], fontsize=7)
    ax.set_xlabel("d_pair (> 0: post-training moved the model away from humans)")
    ax.legend(fontsize=7)
    _save(fig, path)
    return None


def plot_stages(t: Tables, path: str) -> str | None:
    """Paired mean NLL difference (95% CI over studies) and d_pair of every stage against the chain's base,
    one line per chain; the base is 0 by definition."""
    rows = [r for r in _in(t.rows["stages"], t.primary) if _finite(r["mean_diff_vs_base"])]
    if not rows:
        return "no stage chain in the primary condition"
    present = {"base", *(r["stage"] for r in rows)}
    order = [s.value for s in STAGE_ORDER if s.value in present]  # the stages some chain has, in training order
    fig, (ax1, ax2) = _subplots(1, 2, figsize=(8.0, 3.0))
    for i, name in enumerate(dict.fromkeys(r["chain"] for r in rows)):
        chain = [r for r in rows if r["chain"] == name]
        x = [0] + [order.index(r["stage"]) for r in chain]
        mean = np.array([0.0] + [r["mean_diff_vs_base"] for r in chain])
        lo = np.array([0.0] + [r["ci_studies_lo_vs_base"] for r in chain], dtype=np.float64)
        hi = np.array([0.0] + [r["ci_studies_hi_vs_base"] for r in chain], dtype=np.float64)
        err = np.nan_to_num(np.vstack([mean - lo, hi - mean]))
        ax1.errorbar(x, mean, yerr=err, marker="o", capsize=3, color=f"C{i % 10}", label=name)
        ax2.plot(x, [0.0] + [r["d_pair_vs_base"] for r in chain], marker="o", color=f"C{i % 10}", label=name)
    for ax, label in (
        (ax1, "Paired NLL difference vs base\n(nats, 95% CI over studies)"),
        (ax2, "Misalignment d_pair vs base"),
    ):
        ax.set_xticks(range(len(order)), order)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3, linewidth=0.5)
    ax1.legend(frameon=False, fontsize=6)
    _save(fig, path)
    return None


# Drawn only when the tables hold stage rows (a chain of >= 3 models): (file, title, plot).
STAGE_FIGURE = ("fig_stages.png", "Misalignment by post-training stage, one line per chain", plot_stages)

FIGURES = (
    ("fig_nll_by_size.png", "NLL by model size, base vs post-trained per family (fig2)", plot_nll_by_size),
    (
        "fig_misalignment_by_generation.png",
        "Base NLL and post-training misalignment by generation (fig3a)",
        plot_misalignment_by_generation,
    ),
    (
        "fig_misalignment_by_generation_all_pairs.png",
        "The same for every same-generation Instruction-tuned or Reasoning pair (not the paper's)",
        functools.partial(plot_misalignment_by_generation, paper_definition=False),
    ),
    ("fig_domains.png", "Post-training misalignment by domain (fig4)", plot_domains),
    (
        "fig_domains_all_pairs.png",
        "Post-training misalignment by domain, every pair scored (not the paper's)",
        functools.partial(plot_domains, table="domains_all_pairs"),
    ),
    ("fig_persona.png", "Persona benefit (fig5)", plot_persona),
    (
        "fig_persona_all_models.png",
        "Persona benefit, every model with a persona run (not the paper's)",
        functools.partial(plot_persona, table="persona_all_models"),
    ),
    ("fig_accuracy.png", "Accuracy, base vs post-trained (fig_accuracy)", plot_accuracy),
    ("fig_pair_ci.png", "Paired post − base NLL difference with bootstrap CIs", plot_pair_ci),
    (
        "fig_calibration_curves.png",
        "Score against temperature, base vs post-trained per family",
        plot_calibration_curves,
    ),
    ("fig_calibrated_misalignment.png", "Raw vs calibrated d_pair per pair", plot_calibrated_misalignment),
)


def draw_all(figures: Sequence[tuple[str, str, Callable[[Any, str], str | None]]], data: Any, out_dir: str):
    """Draws each (file, title, plot) of ``figures`` from ``data``; file name → None if written, else why it was
    skipped. A figure that fails is skipped with the error as its note, so the report is always written."""
    notes: dict[str, str | None] = {}
    for name, _, plot in figures:
        path = os.path.join(out_dir, name)
        try:
            notes[name] = plot(data, path)
        except Exception as err:  # noqa: BLE001 - one broken figure must not lose the report
            logging.exception("figure %s failed", name)
            notes[name] = f"failed: {type(err).__name__}: {err}"
        if notes[name] is not None and os.path.exists(path):
            os.remove(path)
    return notes


def draw_figures(t: Tables, out_dir: str) -> dict[str, str | None]:
    """Draws every figure (``draw_all``); the stage figure only when the tables hold stage rows."""
    return draw_all((*FIGURES, *((STAGE_FIGURE,) if t.rows["stages"] else ())), t, out_dir)
