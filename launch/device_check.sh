#!/usr/bin/env bash
# The accelerator check, one command: OUT=DIR bash launch/device_check.sh [--dry_run]
#
# On the single-GPU box (Python 3.12, jax CUDA, torch CUDA, transformers, flax, orbax, tensorstore,
# absl-py, jaxtyping; no network) the check needs nothing else (it imports no ml_collections). Wheels
# found in .whl/ (git-ignored, carried by the device tool) are installed into /tmp/site first. Writes $OUT/device_check.json and
# $OUT/device_check.log. --dry_run runs the same code paths on tiny shapes (CI runs it on CPU). Stages:
# attention backends, the matmul peak, slot sampling against HF generate (simulate: --simulate_model,
# --simulate_slots=0 skips it), then the scorer per model shape (--models=a,b splits them over calls).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-device_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LIMIT=480
for arg in "$@"; do [ "$arg" = "--dry_run" ] && LIMIT=420; done
timeout "$LIMIT" "$PY" -m benchmarks.device_check --out="$OUT/device_check.json" "$@" 2>&1 | tee "$OUT/device_check.log"
