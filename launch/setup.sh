#!/usr/bin/env bash
# Creates .venv (Python 3.11, as on the CI machine) and installs psych201_jax with the test extra.
# The constraints file pins the exact versions CI was validated with; pyproject keeps ranges so the
# package also installs on Python 3.12 + jax 0.11 (GPU/TPU hosts).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c launch/constraints.txt -e ".[test]"
