"""The generated-behaviour figures (``simulated.BehaviourTables``), one per question, one panel per comparison:

  fig_behaviour_diversity.png  does post-training narrow the samples? Per study, the mean per-slot entropy of the
                               samples of the base and of the post-trained model, and the human spread (entropy of
                               the participants' responses at one slot position);
  fig_behaviour_match.png      does it match the human response more often? Per study, exact-match rate base (x)
                               against post-trained (y);
  fig_behaviour_distance.png   is its pooled distribution further from the humans'? Per study, Jensen–Shannon
                               (categories) or W1 / human SD (ordinal and numbers), base (x) against post (y);
  fig_behaviour_pairs.png      the paired differences (post − base, mean over studies) with their bootstrap CIs.

Each ``plot_*`` writes one PNG or returns why it was skipped (no comparison). ``matplotlib.figure.Figure``
objects, no pyplot state; importing this selects no backend (the command does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging
from matplotlib.figure import Figure

from psych201_jax.analysis.behaviour import StudyBehaviour
from psych201_jax.analysis.figures import _save, _short, draw_all
from psych201_jax.analysis.responses import ResponseType
from psych201_jax.analysis.simulated import ALL_TYPES, BehaviourTables, PairResult

MAX_PANELS = 12  # comparisons drawn per figure; the CSVs hold every one
TYPE_STYLE = {  # response type → (colour, marker)
    ResponseType.CATEGORY: ("C0", "o"),
    ResponseType.ORDINAL: ("C1", "s"),
    ResponseType.NUMBER: ("C2", "D"),
    ResponseType.FREE_TEXT: ("C7", "^"),
}
NO_PAIR = "no base / post-trained pair (or stage step) of simulations in one sampling setting"


def _title(p: PairResult) -> str:
    c = p.comparison
    return f"{_short(c.post.model)} vs {_short(c.base.model)}\n({c.post.label()})"


def _ci_text(p: PairResult, metric: str, unit: str = "") -> str:
    d = p.difference(metric)
    if d is None or math.isnan(d.mean):
        return f"Δ {metric}: n/a"
    ci = "(no CI)" if math.isnan(d.ci[0]) else f"[{d.ci[0]:.3g}, {d.ci[1]:.3g}]"
    return f"Δ {metric} {d.mean:+.3g}{unit} {ci}"


def _panels(n: int, width: float = 3.2, height: float = 3.0) -> tuple[Figure, list]:
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _shown(bt: BehaviourTables) -> Sequence[PairResult]:
    if len(bt.pairs) > MAX_PANELS:
        logging.info("behaviour figures: %d of %d comparisons drawn", MAX_PANELS, len(bt.pairs))
    return bt.pairs[:MAX_PANELS]


def plot_diversity(bt: BehaviourTables, path: str) -> str | None:
    """Per study (x), the samples' mean per-slot entropy of base (circle) and post-trained (triangle) joined by a
    line, and the human spread (black cross)."""
    shown = _shown(bt)
    if not shown:
        return NO_PAIR
    fig, axes = _panels(len(shown), width=max(3.2, 0.35 * max(len(p.post) for p in shown) + 1.5))
    for ax, p in zip(axes, shown):
        studies = sorted(set(p.post) & set(p.base))
        x = np.arange(len(studies))
        base = [p.base[s].diversity.sample_entropy for s in studies]
        post = [p.post[s].diversity.sample_entropy for s in studies]
        human = [p.post[s].diversity.human_entropy for s in studies]
        ax.vlines(x, base, post, color="grey", linewidth=0.8)
        ax.scatter(x, base, marker="o", color="C0", label="base", zorder=3)
        ax.scatter(x, post, marker="^", color="C3", label="post-trained", zorder=3)
        ax.scatter(x, human, marker="x", color="black", label="humans (across participants)", zorder=3)
        if len(studies) <= 20:
            ax.set_xticks(x, studies, rotation=60, ha="right", fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_xlabel(f"{len(studies)} studies")
        ax.set_ylabel("Entropy (bits)")
        ax.set_title(f"{_title(p)}\n{_ci_text(p, 'sample_entropy', ' bits')}", fontsize=7)
        ax.grid(True, axis="y", alpha=0.3, linewidth=0.5)
    axes[0].legend(frameon=False, fontsize=6)
    _save(fig, path)
    return None


def _base_vs_post(
    bt: BehaviourTables,
    path: str,
    value: Callable[[StudyBehaviour], float],
    label: str,
    metrics: Sequence[tuple[str, str]],
) -> str | None:
    """One panel per comparison: per study ``value`` of the base (x) against the post-trained model (y), coloured
    by response type, with the diagonal; titles give the paired differences of ``metrics`` (metric, unit)."""
    shown = _shown(bt)
    if not shown:
        return NO_PAIR
    fig, axes = _panels(len(shown))
    drawn = 0
    for ax, p in zip(axes, shown):
        points = [(value(p.base[s]), value(p.post[s]), p.post[s].kind) for s in sorted(set(p.post) & set(p.base))]
        points = [(x, y, k) for x, y, k in points if math.isfinite(x) and math.isfinite(y)]
        for kind, (colour, marker) in TYPE_STYLE.items():
            xy = [(x, y) for x, y, k in points if k is kind]
            if xy:
                ax.scatter(*zip(*xy), color=colour, marker=marker, label=str(kind), zorder=3)
        drawn += len(points)
        top = max([1e-9, *(v for x, y, _ in points for v in (x, y))])
        ax.plot([0, top], [0, top], color="black", linewidth=0.5, linestyle="--")
        ax.set_xlabel(f"base: {label}")
        ax.set_ylabel(f"post-trained: {label}")
        ax.set_title("\n".join([_title(p), *(_ci_text(p, m, u) for m, u in metrics)]), fontsize=7)
        ax.grid(True, alpha=0.3, linewidth=0.5)
        if points:
            ax.legend(frameon=False, fontsize=6)
    if not drawn:
        return f"no study where both models have a finite {label}"
    _save(fig, path)
    return None


def plot_match(bt: BehaviourTables, path: str) -> str | None:
    return _base_vs_post(bt, path, lambda b: b.exact_match, "exact-match rate", [("exact_match", "")])


def _distance(b: StudyBehaviour) -> float:
    """A study's distance to the human distribution: JS (bits) for categories, W1 / human SD when numeric."""
    if b.kind is ResponseType.CATEGORY:
        return b.js.value
    return b.wasserstein_scaled if b.kind.numeric else math.nan


def plot_distance(bt: BehaviourTables, path: str) -> str | None:
    return _base_vs_post(bt, path, _distance, "distance to humans", [("js", " bits"), ("wasserstein_scaled", " SD")])


FOREST_METRICS = (
    ("exact_match", "Exact-match rate"),
    ("sample_entropy", "Sample entropy (bits)"),
    ("js", "JS to humans (categories, bits)"),
    ("wasserstein_scaled", "W1 to humans / human SD"),
)


def plot_pairs(bt: BehaviourTables, path: str) -> str | None:
    """Post − base per comparison (rows) and metric (panels): mean over studies and its 95% bootstrap CI."""
    shown = _shown(bt)
    if not shown:
        return NO_PAIR
    fig = Figure(figsize=(3.0 * len(FOREST_METRICS), 0.45 * len(shown) + 1.4))
    axes = fig.subplots(1, len(FOREST_METRICS), sharey=True, squeeze=False)[0]
    y = np.arange(len(shown))
    for ax, (metric, label) in zip(axes, FOREST_METRICS):
        for i, p in enumerate(shown):
            d = p.difference(metric, ALL_TYPES)
            if d is None or math.isnan(d.mean):
                continue
            err = np.nan_to_num([[d.mean - d.ci[0]], [d.ci[1] - d.mean]])
            ax.errorbar(d.mean, i, xerr=err, marker="o", color="C3", capsize=3)
        ax.axvline(0, color="black", linewidth=0.5)
        ax.set_xlabel(f"Δ {label}\n(post − base)", fontsize=7)
        ax.grid(True, axis="x", alpha=0.3, linewidth=0.5)
    axes[0].set_yticks(y, [f"{_short(p.comparison.post.model)} vs {_short(p.comparison.base.model)}" for p in shown])
    axes[0].invert_yaxis()
    _save(fig, path)
    return None


BEHAVIOUR_FIGURES = (
    ("fig_behaviour_diversity.png", "Sample diversity, base vs post-trained, with the human spread", plot_diversity),
    ("fig_behaviour_match.png", "Exact-match rate of samples to the human response, base vs post-trained", plot_match),
    (
        "fig_behaviour_distance.png",
        "Distance of the pooled samples to the pooled human responses, base vs post-trained",
        plot_distance,
    ),
    ("fig_behaviour_pairs.png", "Paired differences post − base with 95% bootstrap CIs over studies", plot_pairs),
)


def draw_behaviour_figures(bt: BehaviourTables, out_dir: str) -> dict[str, str | None]:
    """Draws every behaviour figure (``figures.draw_all``); file name → None if written, else why not."""
    return draw_all(BEHAVIOUR_FIGURES, bt, out_dir)
