#!/usr/bin/env bash
# sweep tiny: 2 models, 13 jobs (0 skipped: unsupported), 2 shards.
# Each shard runs its models one after another, each restored and compiled once for all its
# conditions; complete conditions are skipped and partial ones resumed, so rerunning is safe.
# Progress of every shard: psych201-sweep --config=configs/sweeps/tiny.py --status
# One TPU slice per shard, named ${TPU_PREFIX}-0 .. -1; all workers of a slice run
# the same SPMD command (jax.distributed reads the slice from the TPU metadata).
set -uo pipefail
TPU_PREFIX=${TPU_PREFIX:?set TPU_PREFIX}
ZONE=${ZONE:?set ZONE}
DIR=${DIR:-psych201_jax}
mkdir -p out/sweeps/tiny/logs
pids=()
for i in $(seq 0 1); do
  gcloud compute tpus tpu-vm ssh "${TPU_PREFIX}-${i}" --zone="$ZONE" --worker=all \
    --command="cd ~/$DIR && .venv/bin/psych201-sweep --config=configs/sweeps/tiny.py --distributed=on --shard=${i}/2" \
    > out/sweeps/tiny/logs/shard-${i}.log 2>&1 &
  pids+=("$!")
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
echo "$failed of 2 shards failed"
[ "$failed" -eq 0 ]
