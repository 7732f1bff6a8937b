"""The analysis report: results directories → CSV tables, PNG figures and ``report.md``.

``generate`` is the whole pipeline (used by ``psych201_jax.cli.analyze``): load every run (``runs``), build
the tables (``tables``), write them as CSV, draw the figures (``figures``; each skipped with a note when its
inputs are absent) and write ``report.md`` (``markdown``) embedding both. Simulation results directories
(``psych201-simulate``) found beside the scoring ones are read by ``simulated`` instead: their behaviour CSVs,
figures (``behaviour_figures``) and report section are written only when there is one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import logging

from psych201_jax.analysis import reference_layout, simulated
from psych201_jax.analysis.behaviour_figures import draw_behaviour_figures
from psych201_jax.analysis.figures import draw_figures
from psych201_jax.analysis.markdown import render_report
from psych201_jax.analysis.runs import (
    CATEGORIES_CSV,
    IncompleteRunError,
    find_results_dirs,
    load_categories,
    load_run,
    split_simulations,
    split_sources,
)
from psych201_jax.analysis.tables import build_tables, write_tables

__all__ = ["generate"]


def generate(
    paths: Sequence[str],
    out_dir: str,
    *,
    ddof_mode: str = "reference",
    n_boot: int = 2000,
    seed: int = 0,
    categories_csv: str = CATEGORIES_CSV,
    allow_incomplete: bool = False,
    model_table: str | None = None,
) -> dict[str, str | None]:
    """Loads the results dirs under ``paths``, writes every CSV, figure and report.md into
    ``out_dir``; returns the figure notes (None = written).

    A path may also be the study's own layout (a ``data*`` tree of ``.pth`` files or a merged CSV,
    ``reference_layout.read_reference``): its runs sit beside this project's, marked imported (their path
    starts with ``imported:``); their model info comes from the paper sweep's model table or ``model_table``.

    An incomplete run (killed, or still running) is refused unless ``allow_incomplete``, and then marked as
    incomplete with its counts on the console, in report.md and in model_scores.csv; a complete run of the
    same model and condition always wins over it. An incomplete simulation run is refused likewise, and with
    ``allow_incomplete`` listed as incomplete and left out of the behaviour tables.
    """
    ours, theirs = split_sources(paths)
    dirs = find_results_dirs(ours) if ours else []
    dirs, simulation_dirs = split_simulations(dirs)
    sims = simulated.load_simulations(simulation_dirs, allow_incomplete) if simulation_dirs else None
    runs = [run for path in theirs for run in reference_layout.read_reference(path, model_table)]
    for run in runs:
        logging.info("%s: %s (%s), imported, %d participants", run.path, run.model, run.kind, len(run.participants))
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
    write_tables(tables, out_dir)
    figures = draw_figures(tables, out_dir)
    behaviour = None
    if sims is not None:
        behaviour = simulated.build_behaviour(
            sims.complete, incomplete=sims.incomplete, notes=sims.notes, n_boot=n_boot, seed=seed
        )
        simulated.write_behaviour(behaviour, out_dir)
        figures.update(draw_behaviour_figures(behaviour, out_dir))
    n_inputs = len(dirs) + len(simulation_dirs) + len(theirs)
    with open(os.path.join(out_dir, "report.md"), "w") as fh:
        fh.write(render_report(tables, figures, ddof_mode, n_boot, seed, n_inputs, behaviour))
    return figures
