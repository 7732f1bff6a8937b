"""A tiny simulation sweep that runs end to end on CPU: the bundled base model and its fine-tuned
"post-trained" partner on two studies of the bundled sample; the plain condition with the temperature grid
(the calibration control), k = 8 samples per response slot at T = 1, and at each model's cross-fitted
temperature from its plain run. ``psych201-analyze`` on its results writes the generated-behaviour section."""

import os
import sys

import ml_collections

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:  # a console script run from elsewhere still finds configs/
    sys.path.insert(0, _REPO)

from configs.sweeps import tiny  # noqa: E402
from configs.sweeps.simulate import simulation_conditions  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    c = tiny.get_config()
    c.name = "tiny_simulate"
    c.out_root = "out/sweeps/tiny_simulate"
    c.conditions = simulation_conditions(c.conditions, samples=8, max_new_tokens=12)
    return c
