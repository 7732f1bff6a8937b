"""Bytes of a (sharded) model state, per device and in all: what the multi-process tests check a mesh's
parameter split against (tests/mp_driver.py)."""

from __future__ import annotations

import math

import jax
import numpy as np


def state_bytes_per_device(state) -> dict[jax.Device, int]:
    """Bytes of the arrays / ShapeDtypeStructs (with shardings) of ``state`` held by each device."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(state):
        sharding = leaf.sharding
        shard_bytes = math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        for device in sharding.device_set:
            per_device[device] = per_device.get(device, 0) + shard_bytes
    return per_device


def state_bytes(state) -> int:
    """Total (unsharded) bytes of ``state``."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
