#!/usr/bin/env bash
#SBATCH --job-name=psych201-tiny
#SBATCH --array=0-1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --requeue
#SBATCH --output=out/sweeps/tiny/logs/slurm-%A_%a.log
# sweep tiny: 2 models, 13 jobs (0 skipped: unsupported), 2 shards.
# Each shard runs its models one after another, each restored and compiled once for all its
# conditions; complete conditions are skipped and partial ones resumed, so rerunning is safe.
# Progress of every shard: psych201-sweep --config=configs/sweeps/tiny.py --status
# --exclusive and --gpus-per-node (set it to your nodes' GPU count): the shard's one task gets
# every GPU of its node, and its mesh spans them. --requeue: SLURM reruns a shard whose node
# failed or was preempted. Submit: sbatch <this file>; rerun it to retry failed conditions.
set -euo pipefail
cd "${REPO:-${SLURM_SUBMIT_DIR:-.}}"
srun --kill-on-bad-exit=1 .venv/bin/psych201-sweep --config=configs/sweeps/tiny.py --shard="${SLURM_ARRAY_TASK_ID}/2"
