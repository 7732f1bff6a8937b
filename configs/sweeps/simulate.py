"""Simulated participants at the study's scale: every model of the paper sweep (``psych201_paper.py``) samples
k = 8 responses at every response slot of the test set, at T = 1 and at its cross-fitted temperature from
its plain run (the calibration control), so base and post-trained models can be compared on generated
behaviour (``psych201-analyze``: exact match, distance to the human distribution, diversity)."""

import os
import sys

import ml_collections

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:  # a console script run from elsewhere still finds configs/
    sys.path.insert(0, _REPO)

from configs.sweeps import psych201_paper  # noqa: E402


def simulation_conditions(base: list[dict], **simulate) -> list[dict]:
    """``base``'s plain condition (its temperature grid is the calibration control) and two simulations of
    it: at T = 1 and at each model's cross-fitted temperature from its plain run."""
    plain = [dict(x) for x in base if x["name"] == "plain"]
    same = dict(protocol="reference", template="none", persona="none")
    return plain + [
        dict(name="simulate", **same, simulate=dict(simulate)),
        dict(
            name="simulate_calibrated", **same, simulate=dict(simulate, temperature="calibrated", calibration="plain")
        ),
    ]


def get_config() -> ml_collections.ConfigDict:
    c = psych201_paper.get_config()
    c.name = "simulate"
    c.out_root = "out/sweeps/simulate"
    c.conditions = simulation_conditions(c.conditions, samples=8, max_new_tokens=32)
    return c
