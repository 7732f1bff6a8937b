"""SLURM array and TPU multi-slice scripts that run a sweep as ``psych201-sweep --shard=I/N`` workers."""

from __future__ import annotations

import shlex

from psych201_jax.runs.sweep import Job, models_of


def forwarded_flags(argv: list[str]) -> list[str]:
    """The ``--config.*`` and ``--distributed`` flags of ``argv`` an emitted script must repeat, each
    ``--flag value`` pair kept whole (absl takes the value as the next argument when there is no ``=``)."""
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith(("--config.", "--distributed")):
            out.append(arg)
            takes_next = "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-")
            if takes_next:
                out.append(argv[i + 1])
    return out


def emit_script(
    jobs: list[Job], target: str, *, shards: int, config_path: str, flags: list[str], name: str, out_root: str
) -> str:
    """A script running the sweep as ``shards`` shards (``--shard=I/N``, one model's conditions at a time):
    ``slurm``: one ``sbatch --array`` task per shard, each on a whole node (all its GPUs, one SPMD job);
    ``tpu``: one TPU slice per shard, every worker of a slice running the same command (as tpu_pod.sh)."""
    units = models_of(jobs)
    args = " ".join(shlex.quote(a) for a in [f"--config={config_path}", *flags])
    head = [
        "#!/usr/bin/env bash",
        f"# sweep {name}: {len(units)} models, {sum(len(u[1]) for u in units)} jobs "
        f"({sum(bool(j.skip_reason) for j in jobs)} skipped: unsupported), {shards} shards.",
        "# Each shard runs its models one after another, each restored and compiled once for all its",
        "# conditions; complete conditions are skipped and partial ones resumed, so rerunning is safe.",
        f"# Progress of every shard: psych201-sweep {args} --status",
    ]
    if target == "slurm":
        return "\n".join(
            [
                head[0],
                f"#SBATCH --job-name=psych201-{name}",
                f"#SBATCH --array=0-{shards - 1}",
                "#SBATCH --nodes=1",
                "#SBATCH --ntasks-per-node=1",
                "#SBATCH --exclusive",
                "#SBATCH --gpus-per-node=8",
                "#SBATCH --requeue",
                f"#SBATCH --output={out_root}/logs/slurm-%A_%a.log",
                *head[1:],
                "# --exclusive and --gpus-per-node (set it to your nodes' GPU count): the shard's one task gets",
                "# every GPU of its node, and its mesh spans them. --requeue: SLURM reruns a shard whose node",
                "# failed or was preempted. Submit: sbatch <this file>; rerun it to retry failed conditions.",
                "set -euo pipefail",
                'cd "${REPO:-${SLURM_SUBMIT_DIR:-.}}"',
                f"srun --kill-on-bad-exit=1 .venv/bin/psych201-sweep {args} "
                f'--shard="${{SLURM_ARRAY_TASK_ID}}/{shards}"',
                "",
            ]
        )
    if target == "tpu":
        return "\n".join(
            [
                *head,
                "# One TPU slice per shard, named ${TPU_PREFIX}-0 .. -"
                + f"{shards - 1}"
                + "; all workers of a slice run",
                "# the same SPMD command (jax.distributed reads the slice from the TPU metadata).",
                "set -uo pipefail",
                "TPU_PREFIX=${TPU_PREFIX:?set TPU_PREFIX}",
                "ZONE=${ZONE:?set ZONE}",
                "DIR=${DIR:-psych201_jax}",
                f"mkdir -p {shlex.quote(out_root)}/logs",
                "pids=()",
                f"for i in $(seq 0 {shards - 1}); do",
                '  gcloud compute tpus tpu-vm ssh "${TPU_PREFIX}-${i}" --zone="$ZONE" --worker=all \\',
                f'    --command="cd ~/$DIR && .venv/bin/psych201-sweep {_double_quoted(args)} '
                f'--distributed=on --shard=${{i}}/{shards}" \\',
                f"    > {shlex.quote(out_root)}/logs/shard-${{i}}.log 2>&1 &",
                '  pids+=("$!")',
                "done",
                "failed=0",
                'for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done',
                'echo "$failed of ' + f"{shards}" + ' shards failed"',
                '[ "$failed" -eq 0 ]',
                "",
            ]
        )
    raise ValueError(f"unknown emit target {target!r}; expected local, tpu or slurm")


def _double_quoted(text: str) -> str:
    """``text`` safe inside a double-quoted shell string (the remote command keeps its own quoting)."""
    for char in ("\\", '"', "$", "`"):
        text = text.replace(char, "\\" + char)
    return text
