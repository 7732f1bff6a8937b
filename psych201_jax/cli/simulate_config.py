"""The ``--config`` file of ``psych201-simulate``: the typed job's defaults as the ml_collections dict its
``--config.<key>`` flags override (see ``psych201_jax.runs.config.SimulateJob``)."""

import ml_collections

from psych201_jax.runs.config import SimulateJob


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(SimulateJob().to_dict())
