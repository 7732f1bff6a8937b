"""Device meshes, the logical-axis rules table and the row layout of packed batches on a mesh.

Mesh axes (outer to inner): ``data`` (replicas: parameters replicated, rows split), ``fsdp`` (parameters split
on the embedding dimension and gathered per layer, rows split too) and ``tensor`` (heads, MLP width and
vocabulary split; rows replicated). All axes are ``AxisType.Auto`` (GSPMD): the model's logical names are
mapped to mesh axes by ``RULES`` and applied with ``with_sharding_constraint`` (``model.axes.constrain``)
under ``jax.set_mesh``; the names themselves and ``logical_to_spec`` live in ``model/axes.py``.

``rules_for(spec, mesh)`` specialises the table to one model: a rule whose mesh axes do not divide the
dimension it names (e.g. 2 key/value heads on ``tensor=4``) is cut to its longest dividing prefix or
dropped, so that dimension is replicated instead. Parameters then always have even shardings and can be
restored straight into them (``checkpoint.load_model(mesh=, rules=)``).

A packed step is ``row_shards`` = data x fsdp independent sub-batches (each one ``packing.PackedBatch`` with
its own scoring plan) stacked along rows; ``RowLayout`` says which of them this process feeds and which
processes hold the same rows (replicas across processes feed identical data).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import cast

import jax
import numpy as np
from flax import nnx

from psych201_jax.model import axes as model_axes
from psych201_jax.model.axes import Rules, logical_to_spec, mesh_axes_of
from psych201_jax.model.spec import ModelSpec

AXES = ("data", "fsdp", "tensor")
ROW_AXES = ("data", "fsdp")

# Logical axis -> mesh axes; first matching rule whose mesh axes are still free wins (model_axes.logical_to_spec).
RULES: Rules = (
    # parameters
    (model_axes.VOCAB, "tensor"),
    (model_axes.EMBED, "fsdp"),
    (model_axes.Q_HEADS, "tensor"),
    (model_axes.KV_HEADS, "tensor"),
    (model_axes.MLP, "tensor"),
    (model_axes.LIN_K_HEADS, "tensor"),
    (model_axes.LIN_V_HEADS, "tensor"),
    # experts split over fsdp (their embedding axis then stays whole: fsdp is taken), each expert's MLP
    # width over tensor; where fsdp does not divide the experts, the embedding axis takes fsdp instead.
    (model_axes.EXPERT, "fsdp"),
    (model_axes.EXPERT_MLP, "tensor"),
    (model_axes.DENSE_MLP, "tensor"),
    (model_axes.ROUTER, None),
    (model_axes.HEAD_DIM, None),
    (model_axes.LAYERS, None),
    (model_axes.NORM, None),
    # activations
    (model_axes.ACT_BATCH, ROW_AXES),
    (model_axes.ACT_LENGTH, None),
    (model_axes.ACT_EMBED, None),
    (model_axes.ACT_Q_HEADS, "tensor"),
    (model_axes.ACT_KV_HEADS, "tensor"),
    (model_axes.ACT_HEAD_DIM, None),
    (model_axes.ACT_MLP, "tensor"),
    (model_axes.ACT_VOCAB, "tensor"),
    (model_axes.ACT_LIN_K_HEADS, "tensor"),
    (model_axes.ACT_LIN_V_HEADS, "tensor"),
)


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, *, n_devices: int | None = None) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes over ``n_devices`` (default: all devices); one size may be -1 (= the rest)."""
    n = jax.device_count() if n_devices is None else n_devices
    sizes = [int(data), int(fsdp), int(tensor)]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive, at most one -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} devices cannot be split into a mesh with {dict(zip(AXES, sizes))}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, have {n}")
    return cast("tuple[int, int, int]", tuple(sizes))


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A ``data x fsdp x tensor`` mesh (Auto axis types) over ``devices`` (default: every device of every process)."""
    shape = mesh_shape(data, fsdp, tensor, n_devices=None if devices is None else len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def mesh_for(mode: str = "auto", data: int = -1, fsdp: int = 1, tensor: int = 1) -> jax.sharding.Mesh:
    """The mesh of a job's ``mesh`` settings; every job runs on a mesh.

    mode "off": the 1 x 1 x 1 mesh on this process's first device (one process only); "auto" and "on": the
    ``data x fsdp x tensor`` mesh over every device of every process (sizes that do not fit are an error).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"mesh.mode must be auto, on or off, got {mode!r}")
    if mode == "off":
        if jax.process_count() > 1:
            raise ValueError("mesh.mode=off runs on one device of one process; a multi-process job needs a mesh")
        return make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
    return make_mesh(data, fsdp, tensor)


def logical_sizes(spec: ModelSpec) -> dict[str, int]:
    """Size of every logical dimension of one model (activation names included); batch/length are free."""
    sizes = {
        model_axes.VOCAB: spec.vocab_size,
        model_axes.EMBED: spec.hidden_size,
        model_axes.NORM: spec.hidden_size,
        model_axes.Q_HEADS: spec.num_heads,
        model_axes.KV_HEADS: spec.num_kv_heads,
        model_axes.HEAD_DIM: spec.head_dim,
        model_axes.MLP: spec.intermediate_size,
        model_axes.LAYERS: spec.num_layers,
        model_axes.LIN_K_HEADS: spec.linear_num_key_heads,
        model_axes.LIN_V_HEADS: spec.linear_num_value_heads,
        model_axes.EXPERT: spec.num_experts,
        model_axes.EXPERT_MLP: spec.moe_intermediate_size,
        model_axes.DENSE_MLP: spec.dense_intermediate_size,
    }
    sizes.update(
        {
            model_axes.ACT_EMBED: spec.hidden_size,
            model_axes.ACT_Q_HEADS: spec.num_heads,
            model_axes.ACT_KV_HEADS: spec.num_kv_heads,
            model_axes.ACT_HEAD_DIM: spec.head_dim,
            # every MLP's width (a mixture of experts' dense layers too): a split must divide each
            model_axes.ACT_MLP: math.gcd(spec.intermediate_size, spec.dense_intermediate_size),
            model_axes.ACT_VOCAB: spec.vocab_size,
            model_axes.ACT_LIN_K_HEADS: spec.linear_num_key_heads,
            model_axes.ACT_LIN_V_HEADS: spec.linear_num_value_heads,
        }
    )
    return sizes


def rules_for(spec: ModelSpec, mesh: jax.sharding.Mesh, rules: Rules = RULES) -> Rules:
    """``rules`` restricted to shardings that divide ``spec``'s dimensions evenly on ``mesh``.

    Each rule keeps the longest prefix of its mesh axes whose size product divides the named dimension
    (size-1 axes always do); a rule left with no axes is dropped, so a later rule for the same name, or
    replication, applies. Names of unknown size (activation batch and length) keep their rules: the
    scorer makes rows a multiple of the row shards.
    """
    sizes = logical_sizes(spec)
    out = []
    for logical, mesh_axes in rules:
        axes = mesh_axes_of(mesh_axes)
        unknown = [a for a in axes if a not in mesh.shape]
        if unknown:
            raise ValueError(
                f"rule {logical!r} -> {mesh_axes!r} names axes {unknown} not in the mesh {mesh.axis_names}"
            )
        if not axes or logical not in sizes:
            out.append((logical, mesh_axes))
            continue
        keep: list[str] = []
        for axis in axes:
            if sizes[logical] % (math.prod(mesh.shape[a] for a in keep) * mesh.shape[axis]):
                break
            keep.append(axis)
        if keep:
            out.append((logical, keep[0] if len(keep) == 1 else tuple(keep)))
    return tuple(out)


def row_axes(rules: Rules) -> tuple[str, ...]:
    """Mesh axes the rows of a packed batch are split over (the activation batch rule)."""
    spec = logical_to_spec((model_axes.ACT_BATCH,), rules)
    return mesh_axes_of(spec[0]) if len(spec) else ()


def vocab_axes(rules: Rules) -> tuple[str, ...]:
    """Mesh axes the vocabulary of the (un)embedding is split over, not counting row axes."""
    spec = logical_to_spec((model_axes.VOCAB, model_axes.EMBED), rules)
    rows = set(row_axes(rules))
    return tuple(a for a in mesh_axes_of(spec[0]) if a not in rows)


def state_shardings(state, mesh: jax.sharding.Mesh, rules: Rules):
    """NamedShardings of an ``nnx.State`` from each variable's logical axes (``out_sharding`` metadata)."""

    def leaf(var):
        return var.replace(jax.NamedSharding(mesh, logical_to_spec(var.get_metadata()["out_sharding"], rules)))

    return jax.tree.map(leaf, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How the rows of a step are split over the mesh and fed by the processes.

    A step stacks ``shards`` sub-batches along rows; sub-batch s lives on the devices whose coordinates on
    ``axes`` linearise to s. Processes holding the same set of sub-batches are replicas (one *share* of
    the participants per distinct set); ``local_shards`` are this process's sub-batch numbers in the order
    their rows appear in process-local data.
    """

    mesh: jax.sharding.Mesh
    axes: tuple[str, ...]
    shards: int
    local_shards: tuple[int, ...]
    share_index: int
    share_count: int
    process_share: tuple[int, ...]  # process index -> share index
    writer: bool  # this process is the first of its share (writes its results)

    @classmethod
    def create(cls, mesh: jax.sharding.Mesh, axes: Sequence[str], process_index: int | None = None) -> RowLayout:
        axes = tuple(axes)
        shards = math.prod(mesh.shape[a] for a in axes)
        sharding = jax.NamedSharding(mesh, jax.P(axes if axes else None))
        held: dict[int, set[int]] = {}
        for device, index in sharding.devices_indices_map((shards,)).items():
            start = index[0].start or 0
            # jax types these keys as `Device = xc.Device`, an alias mypy cannot resolve
            held.setdefault(device.process_index, set()).add(start)  # type: ignore[attr-defined]
        groups = sorted({frozenset(s) for s in held.values()}, key=min)
        for a in groups:
            for b in groups:
                if a is not b and a & b:
                    raise ValueError(
                        f"mesh {dict(mesh.shape)}: processes hold overlapping but different row shards "
                        f"{sorted(a)} and {sorted(b)}; use a mesh whose row axes follow processes"
                    )
        if len({len(g) for g in groups}) != 1:
            raise ValueError(f"mesh {dict(mesh.shape)}: processes hold unequal numbers of row shards")
        process_share = tuple(groups.index(frozenset(held[p])) for p in sorted(held))
        me = jax.process_index() if process_index is None else process_index
        share = process_share[me]
        return cls(
            mesh=mesh,
            axes=axes,
            shards=shards,
            local_shards=tuple(sorted(groups[share])),
            share_index=share,
            share_count=len(groups),
            process_share=process_share,
            writer=process_share.index(share) == me,
        )

    @property
    def rows_sharding(self) -> jax.NamedSharding:
        """[rows, L] token arrays."""
        return jax.NamedSharding(self.mesh, jax.P(self.axes or None, None))

    @property
    def hidden_sharding(self) -> jax.NamedSharding:
        """[rows, L, D] hidden states."""
        return jax.NamedSharding(self.mesh, jax.P(self.axes or None, None, None))

    @property
    def scored_sharding(self) -> jax.NamedSharding:
        """[shards * C, D] hidden states at the scoring plan's entries."""
        return jax.NamedSharding(self.mesh, jax.P(self.axes or None, None))

    @property
    def plan_sharding(self) -> jax.NamedSharding:
        """[shards * C] scoring-plan arrays (each sub-batch's plan on its own rows' devices)."""
        return jax.NamedSharding(self.mesh, jax.P(self.axes or None))

    def global_array(self, local: np.ndarray, sharding: jax.NamedSharding) -> jax.Array:
        """The global array whose row blocks of ``local_shards`` are ``local`` (stacked in that order)."""
        blocks = len(self.local_shards)
        if local.shape[0] % blocks:
            raise ValueError(f"local rows {local.shape[0]} are not {blocks} equal sub-batches")
        global_shape = (local.shape[0] // blocks * self.shards,) + local.shape[1:]
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    def local_blocks(self, array: jax.Array) -> dict[int, np.ndarray]:
        """Sub-batch number -> host copy of that row block, for the blocks this process holds."""
        size = array.shape[0] // self.shards
        out = {}
        for shard in array.addressable_shards:
            s = (shard.index[0].start or 0) // size
            if s not in out:
                out[s] = np.asarray(shard.data)
        return out

    def describe(self) -> str:
        return (
            f"mesh {dict(self.mesh.shape)} over {self.mesh.devices.size} devices, rows split "
            f"{self.shards} ways on {self.axes or '()'}, share {self.share_index}/{self.share_count}"
            f"{'' if self.writer else ' (replica: not writing)'}"
        )
