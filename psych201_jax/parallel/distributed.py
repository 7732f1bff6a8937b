"""Multi-process (multi-host) plumbing: ``jax.distributed`` start-up, small host collectives, shares of work.

On Cloud TPU pod slices and under SLURM (``srun``), ``jax.distributed.initialize()`` finds the coordinator,
the process count and this process's id by itself; on other machines (CPU tests on 127.0.0.1, a hand-made
cluster) pass them explicitly. CPU processes exchange data with gloo collectives.

Every helper here is a collective when there is more than one process: all processes must call it, in the
same order (the scorer's SPMD steps rely on that).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

_MODES = ("auto", "on", "off")


def cluster_detected() -> bool:
    """Whether the environment looks like a multi-process launch that jax.distributed can configure itself.

    SLURM steps with several tasks, Open MPI jobs and GKE TPU slices are recognised from their environment
    variables. Cloud TPU VMs describe their workers only through the metadata server, so pass
    ``mode="on"`` there (launch/tpu_pod.sh does).
    """
    env = os.environ

    def count(*names):
        for name in names:
            try:
                return int(env[name].split("(")[0])
            except (KeyError, ValueError):
                continue
        return 1

    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and count("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") > 1:
        return True
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    *,
    mode: str = "auto",
    local_device_ids: Sequence[int] | None = None,
    cpu_collectives: str = "gloo",
    initialization_timeout: int = 300,
) -> bool:
    """Starts ``jax.distributed`` if this is a multi-process run; returns whether it is initialised.

    mode "off": never; "on": always (arguments not given are detected by jax: TPU pods, SLURM, Open MPI,
    Kubernetes); "auto": when a coordinator or a process count > 1 is given or ``cluster_detected()``.
    Must run before anything touches a JAX backend. Idempotent.
    """
    if mode not in _MODES:
        raise ValueError(f"distributed mode must be one of {_MODES}, got {mode!r}")
    if jax.distributed.is_initialized():
        return True
    explicit = bool(coordinator_address) or num_processes > 1
    if mode == "off" or (mode == "auto" and not explicit and not cluster_detected()):
        return False
    kwargs: dict[str, Any] = dict(initialization_timeout=initialization_timeout)
    if coordinator_address:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes > 0:
        kwargs["num_processes"] = num_processes
    if process_id >= 0:
        kwargs["process_id"] = process_id
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    if cpu_collectives:
        # CPU cross-process collectives (no effect on TPU/GPU).
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(**kwargs)
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def allgather(x: np.ndarray) -> np.ndarray:
    """[processes, *x.shape]: ``x`` of every process, by process index (host arrays; a collective)."""
    x = np.asarray(x)
    if not is_multiprocess():
        return x[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=False))


def allgather_rows(rows: np.ndarray) -> list[np.ndarray]:
    """Each process's int [n_p, k] table (n_p may differ, also 0), by process index (two collectives)."""
    rows = np.asarray(rows, np.int32)
    if rows.ndim != 2:
        raise ValueError(f"allgather_rows needs a 2-D table, got shape {rows.shape}")
    counts = allgather(np.asarray([rows.shape[0]], np.int32))[:, 0]
    padded = np.zeros((int(counts.max(initial=0)), rows.shape[1]), np.int32)
    padded[: rows.shape[0]] = rows
    gathered = allgather(padded)
    return [gathered[p, :n] for p, n in enumerate(counts)]


def sync(name: str) -> None:
    """Barrier across processes (no-op with one process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def take_share(items: Iterable, index: int, count: int) -> Iterator:
    """Items ``index``, ``index + count``, … of ``items``: a deterministic round-robin share of the input order."""
    if not 0 <= index < count:
        raise ValueError(f"share {index} of {count}")
    return itertools.islice(items, index, None, count)
