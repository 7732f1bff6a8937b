"""psych201_jax: how well language models predict human behaviour on Psych-201, in JAX.

The public surface (imported lazily, so a command's ``--help`` loads no jax):
  ScoreJob        a typed scoring job (``psych201_jax.runs.config``)
  run             score one job into its results directory (``psych201_jax.runs.job``)
  Condition       how a run was scored; ModelInfo: what the model is (``psych201_jax.conditions``)
  Sweep           model pairs x conditions (``psych201_jax.runs.sweep``)
  generate_report results directories → tables, figures and report.md (``psych201_jax.analysis.report``)
"""

from importlib import import_module, metadata
from typing import Any

try:
    __version__ = metadata.version("psych201_jax")
except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0.0.0+unknown"

_PUBLIC = {
    "ScoreJob": ("psych201_jax.runs.config", "ScoreJob"),
    "run": ("psych201_jax.runs.job", "run"),
    "Condition": ("psych201_jax.conditions", "Condition"),
    "ModelInfo": ("psych201_jax.conditions", "ModelInfo"),
    "Sweep": ("psych201_jax.runs.sweep", "Sweep"),
    "generate_report": ("psych201_jax.analysis.report", "generate"),
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        module, attr = _PUBLIC[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'psych201_jax' has no attribute {name!r}")
