"""The ``psych201-score`` configuration (``--config=configs/score.py``): the job's defaults, defined by
``psych201_jax.runs.config.ScoreJob``."""

from psych201_jax.cli.score_config import get_config  # noqa: F401
