"""The ``launch.score`` configuration (``--config=configs/score.py``); defined in ``psych201_jax.runs.config``."""

from psych201_jax.runs.config import get_config  # noqa: F401
