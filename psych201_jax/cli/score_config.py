"""The ``--config`` file of ``psych201-score`` and ``psych201-audit``: the typed job's defaults as the
ml_collections dict its ``--config.<key>`` flags override (see ``psych201_jax.runs.config.ScoreJob``)."""

import ml_collections

from psych201_jax.runs.config import ScoreJob


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(ScoreJob().to_dict())
