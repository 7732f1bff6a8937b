"""Logical axis names of the model's parameters and activations, and how names become shardings.

The decoder tags every parameter with these names (``out_sharding`` metadata, never applied eagerly) and
passes activations through ``constrain``, a no-op without a mesh. ``parallel/sharding.py`` maps the names
to mesh axes (its ``RULES`` table, a ``Rules``) and applies them with ``logical_to_spec``. Both import this
module, so the names are stated once and imports flow model -> parallel.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax.core.spmd import get_logical_axis_rules

# Logical axis -> mesh axes (one name, several, or None: replicated); the first matching rule whose mesh
# axes are still free wins.
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Logical axis names of parameters.
VOCAB = "vocab"
# Rows of an input embedding longer than the output vocabulary (Llama-3.2-Vision's image tokens): a name of
# its own, so a vocabulary sharding that divides vocab_size is never applied to a table it need not divide.
EMBED_VOCAB = "embed_vocab"
EMBED = "embed"
LAYERS = "layers"
Q_HEADS = "q_heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
NORM = "norm"
QUERY_GATE = "query_gate"  # query and its output gate side by side per head (Qwen3.5: 2 * head_dim)
LIN_K_HEADS = "linear_k_heads"
LIN_V_HEADS = "linear_v_heads"
LIN_K_DIM = "linear_k_dim"
LIN_V_DIM = "linear_v_dim"
CONV = "conv"
EXPERT = "expert"  # the experts of a mixture-of-experts layer (model/moe.py)
EXPERT_MLP = "expert_mlp"  # the MLP width within one expert
DENSE_MLP = "dense_mlp"  # the MLP width of a mixture-of-experts model's dense layers (``dense_mlp_layers``)
ROUTER = "router"  # the router's output (one logit per expert): small, never sharded

# Logical axis names of activations.
ACT_BATCH = "activation_batch"
ACT_LENGTH = "activation_length"
ACT_EMBED = "activation_embed"
ACT_Q_HEADS = "activation_q_heads"
ACT_KV_HEADS = "activation_kv_heads"
ACT_HEAD_DIM = "activation_head_dim"
ACT_MLP = "activation_mlp"
ACT_VOCAB = "activation_vocab"
ACT_LIN_K_HEADS = "activation_linear_k_heads"
ACT_LIN_V_HEADS = "activation_linear_v_heads"


def mesh_axes_of(mesh_axes: str | Sequence[str] | None) -> tuple[str, ...]:
    """A rule's mesh axes as a tuple (one name, several, or none)."""
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())


def logical_to_spec(names: Sequence[str | None], rules: Sequence[tuple[str, str | tuple[str, ...] | None]]) -> jax.P:
    """PartitionSpec for logical ``names`` under ``rules`` [(logical, mesh axes or None)]; first match wins,
    a mesh axis is used at most once, unmatched names are replicated."""
    table: dict[str | None, list] = {}  # a None name matches no rule
    for logical, mesh_axes in rules:
        table.setdefault(logical, []).append(mesh_axes)
    used: set[str] = set()
    out = []
    for name in names:
        choice = None
        for mesh_axes in table.get(name, []):
            axes = mesh_axes_of(mesh_axes)
            if axes and not used.intersection(axes):
                choice = mesh_axes
                used.update(axes)
                break
        out.append(choice)
    return jax.P(*out)


def constrain(x: jnp.ndarray, names: Sequence[str | None]) -> jnp.ndarray:
    """Sharding constraint by logical names under the active ``nnx.logical_axis_rules``; no-op without a mesh."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, get_logical_axis_rules()))
