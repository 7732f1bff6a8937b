#!/usr/bin/env bash
# Score on a Cloud TPU pod slice: the same psych201_jax.cli.score command on every worker (one SPMD program).
#
#   TPU=my-v5e-16 ZONE=us-west4-a [PROJECT=my-project] [DIR=psych201_jax] [SETUP=1] \
#     bash launch/tpu_pod.sh --config.model=/mnt/models/Llama-3.1-70B --config.data=/mnt/data/psych201 \
#       --config.out=/mnt/results/llama70b --config.dtype=bfloat16 --config.mesh.fsdp=16
#
# Every worker must see the same paths: a converted checkpoint (psych201_jax.cli.convert; each worker reads only the
# slices its chips hold), the data, and the results directory (shared storage, e.g. a gcsfuse mount:
# each worker writes its own chunks, worker 0 the manifest). jax.distributed finds the coordinator, the
# worker count and each worker's id from the TPU metadata (--config.distributed.mode=on).
# SETUP=1 first clones/updates the repository into ~/$DIR on every worker and adds jax[tpu] (same jax version).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
DIR=${DIR:-psych201_jax}
REPO_URL=${REPO_URL:-}
PROJECT_FLAG=()
if [ -n "${PROJECT:-}" ]; then PROJECT_FLAG=(--project="$PROJECT"); fi

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command="$1"
}

if [ "${SETUP:-0}" = 1 ]; then
  : "${REPO_URL:?set REPO_URL (git URL of this repository) for SETUP=1}"
  on_all_workers "set -e; if [ -d ~/$DIR/.git ]; then git -C ~/$DIR pull --ff-only; else git clone $REPO_URL ~/$DIR; fi; \
    cd ~/$DIR && PYTHON=python3.12 bash launch/setup.sh && \
    .venv/bin/python -m pip install -q \"jax[tpu]==\$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""
fi

ARGS=$(printf ' %q' "$@")
on_all_workers "cd ~/$DIR && .venv/bin/python -m psych201_jax.cli.score --config.distributed.mode=on$ARGS"
