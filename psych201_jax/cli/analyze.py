r"""psych201-analyze: analyse finished scoring (and simulation) results into tables, figures and report.md.

  psych201-analyze --results=DIR [DIR ...] --out=DIR \
      [--ddof=reference|0|1] [--bootstrap=2000] [--seed=0] [--categories=CSV]

``--results`` takes results directories (each holding manifest.json), comma lists of them, or parent
folders searched for them; it may be repeated, and extra positional arguments count as more results. A
``--results`` may also be the study's own layout: a ``data``/``data_acc``/``data_meta``/``data_instruct``
tree of ``<study>/<model>.pth`` files (as its eval scripts write them), a folder holding such trees, or a
merged CSV (``full_data_jureca_*.csv``); those runs are marked imported (``imported:`` paths), with model
info from the paper sweep's table or ``--model_table``.
Writes into ``--out``: report.md, the CSV tables (model_scores, study_scores, pair_misalignment,
pair_paired_stats, pair_types, generations, domains, domains_extended, persona, persona_summary,
accuracy, calibration, calibration_pairs) and the PNG figures (see ``psych201_jax.analysis.figures``); when
the runs hold a stage chain of >= 3 models (``model_info.chain`` / ``stage``, e.g. configs/sweeps/stages.py),
also stages.csv, stages_by_domain.csv, fig_stages.png and report.md's "Stage chains" section
(``psych201_jax.analysis.chains``). Simulation results directories (``psych201-simulate``) found among the
results are analysed apart (``psych201_jax.analysis.simulated``): behaviour.csv (per model x study: exact match,
fair CRPS, TV / JS / W1 to the human responses with bootstrap CIs over participants, sample diversity against
the human spread), behaviour_pairs.csv (post - base per pair and stage step, CIs over studies),
behaviour_runs.csv, the fig_behaviour_*.png figures and report.md's "Generated behaviour" section.

example:
  psych201-analyze --results=out/sweeps/tiny --out=out/report
"""

import os

import matplotlib
from absl import flags, logging

from psych201_jax import paths
from psych201_jax.analysis import metrics, report, runs
from psych201_jax.cli import common
from psych201_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("results", None, "Results dir(s), comma lists, or folders holding results dirs.")
flags.DEFINE_string("out", None, "Output folder for report.md, CSVs and figures.")
flags.DEFINE_enum(
    "ddof",
    "reference",
    metrics.DDOF_MODES,
    "SD convention: reference = ddof 1 for pairs/generations/accuracy, 0 for domains/persona "
    "(as the reference scripts); 0 or 1 = that ddof everywhere.",
)
flags.DEFINE_integer("bootstrap", 2000, "Bootstrap replicates for the confidence intervals.")
flags.DEFINE_integer("seed", 0, "Seed of the bootstrap.")
flags.DEFINE_string("categories", runs.CATEGORIES_CSV, "Study category CSV (experiment + 0/1 columns).")
flags.DEFINE_bool(
    "allow_incomplete",
    False,
    "Include incomplete (killed or running) scoring results, marked as such; incomplete simulations are listed "
    "and left out.",
)
flags.DEFINE_string(
    "model_table",
    None,
    "JSON {hf_id: {family, generation, size_b, kind, base_hf_id}} for imported study-layout runs of models the "
    "paper sweep's table does not list.",
)
flags.mark_flags_as_required(["results", "out"])


def main(argv):
    matplotlib.use("Agg")  # files only: matplotlib would otherwise resolve (and may open) a GUI backend
    given = list(FLAGS.results) + list(argv[1:])  # each a dir, a comma list of dirs, or a parent folder
    results = [",".join(paths.normalize(p.strip()) for p in entry.split(",") if p.strip()) for entry in given]
    out = paths.normalize(FLAGS.out)
    try:  # before the work: a --out that is a file or cannot be created fails at once, naming it
        os.makedirs(out, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out={out}: cannot create the report folder ({err.strerror})") from None
    figures = report.generate(
        results,
        out,
        ddof_mode=FLAGS.ddof,
        n_boot=FLAGS.bootstrap,
        seed=FLAGS.seed,
        categories_csv=FLAGS.categories,
        allow_incomplete=FLAGS.allow_incomplete,
        model_table=paths.normalize(FLAGS.model_table) if FLAGS.model_table else None,
    )
    for name, note in figures.items():
        if note is None:
            logging.info("figure %s written", name)
        else:
            logging.warning("figure %s skipped: %s", name, note)
    print(f"wrote {os.path.join(out, 'report.md')}")


def run() -> None:
    """Console-script entry point."""
    common.run(main, help_=lambda: common.help_text(__doc__ or "", __name__))


if __name__ == "__main__":
    run()
