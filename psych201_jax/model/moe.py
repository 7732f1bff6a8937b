"""The mixture-of-experts MLP (Qwen2-MoE, Qwen3-MoE, Qwen3.5-MoE, Mixtral, OLMoE): dropless top-k routing and
grouped matmuls.

Each token's router picks its top-k experts (softmax over the router logits in float32, top-k, optionally
renormalised, as HF's ``*TopKRouter``); every chosen (token, expert) pair is computed: no capacity factor, so
no token is ever dropped. The pairs are sorted by expert and each expert's gated MLP runs as one grouped
matmul over its contiguous rows (``jax.lax.ragged_dot``: XLA's ragged dot on TPU and GPU; on XLA:CPU, where jax
would expand it into a dense product over every expert, a loop over row tiles of one expert each), never as a
dense [tokens, experts, ...] product.
Padding positions (segment 0, or invalid gathered entries) are routed nowhere: they sort past the last
group, cost no expert compute, and their output is exactly zero.

On a mesh the routing runs per row shard (``jax.shard_map`` over the row axes, manual; tensor stays
automatic): a shard's tokens never leave its devices, and the expert weights (split over ``fsdp`` on their
expert axis) are all-gathered per layer into the shard, as FSDP gathers dense weights. Within the shard
each expert's MLP width stays split over ``tensor``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax.core.spmd import get_logical_axis_rules

from psych201_jax.model.axes import ACT_BATCH, logical_to_spec, mesh_axes_of
from psych201_jax.model.layers import activate, mlp_block
from psych201_jax.model.spec import ModelSpec

# Stacked layer parameters of a routed MLP (the shared expert reuses the dense MLP's w_gate / w_up / w_down).
EXPERT_PARAMS = ("router", "e_gate", "e_up", "e_down")
# Rows per tile of the CPU grouped matmul at most (``tiled_expert_mlp``).
TILE = 128


def route(x: jnp.ndarray, router: jnp.ndarray, spec: ModelSpec) -> tuple[jnp.ndarray, jnp.ndarray]:
    """x [N, D] -> (top-k expert ids int32 [N, k], their weights [N, k]) as HF's router computes them: logits in
    the activation dtype, softmax in float32, top-k, renormalised with ``norm_topk_prob``; the weights in
    float32 (Mixtral, ``moe_weights_fp32``) or cast to the activation dtype."""
    logits = jnp.einsum("nd,de->ne", x, router.astype(x.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, spec.num_experts_per_tok)
    if spec.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return experts.astype(jnp.int32), weights.astype(jnp.float32 if spec.moe_weights_fp32 else x.dtype)


def routed_experts(p: dict[str, jnp.ndarray], x: jnp.ndarray, valid: jnp.ndarray, *, spec: ModelSpec) -> jnp.ndarray:
    """The routed experts' weighted sum on x [N, D] (``valid`` bool [N]: False routes nowhere) -> [N, D].

    The N * k (token, expert) pairs are sorted by expert (padding last, in no group), gathered, run through
    three grouped matmuls and scattered back; the k contributions of a token are summed in float32 and
    cast once (HF's grouped_mm experts: weight product in the weights' dtype, then a sum over k)."""
    n, d = x.shape
    k, e = spec.num_experts_per_tok, spec.num_experts
    dt = x.dtype
    experts, weights = route(x, p["router"], spec)
    flat = jnp.where(valid[:, None], experts, e).reshape(-1)  # padding -> e: past every group
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=e + 1)[:e].astype(jnp.int32)
    rows = jnp.take(x, order // k, axis=0)
    weights_dt = {name: p[name].astype(dt) for name in ("e_gate", "e_up", "e_down")}
    grouped = tiled_expert_mlp if jax.default_backend() == "cpu" else ragged_expert_mlp
    out = grouped(rows, weights_dt, sizes, spec=spec)
    out = jnp.where((jnp.take(flat, order) < e)[:, None], out, 0)  # rows past the groups are unspecified
    weighted = out.astype(weights.dtype) * jnp.take(weights.reshape(-1), order)[:, None]
    back = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=order.dtype))  # inverse permutation
    pairs = jnp.take(weighted, back, axis=0).reshape(n, k, d)
    return jnp.sum(pairs.astype(jnp.float32), axis=1).astype(dt)


def ragged_expert_mlp(rows: jnp.ndarray, p: dict[str, jnp.ndarray], sizes: jnp.ndarray, *, spec: ModelSpec):
    """Each expert's gated MLP on its contiguous rows (``sizes`` [E] rows per expert, in order; rows past them
    unspecified) as three ``jax.lax.ragged_dot`` grouped matmuls: XLA's native ragged dot on TPU and GPU."""
    gate = jax.lax.ragged_dot(rows, p["e_gate"], sizes)
    up = jax.lax.ragged_dot(rows, p["e_up"], sizes)
    return jax.lax.ragged_dot(activate(gate, spec.activation) * up, p["e_down"], sizes)


def tiled_expert_mlp(rows: jnp.ndarray, p: dict[str, jnp.ndarray], sizes: jnp.ndarray, *, spec: ModelSpec):
    """``ragged_expert_mlp`` for XLA:CPU, where jax expands ``ragged_dot`` into a dense masked product over every
    expert (E times the FLOPs): each expert's rows are padded to whole tiles (rows / E rounded down to a power
    of two, 8 to ``TILE``) and a loop over the tiles runs one expert's MLP per tile: (rows + E * tile) x the
    expert FLOPs at most."""
    m, d = rows.shape
    e = sizes.shape[0]
    # about one tile per expert when the rows are few (padding costs up to a tile per expert), TILE at most
    tile = min(TILE, m, max(8, 1 << max(m // e, 1).bit_length() - 1))
    tiles = -(-m // tile) + e  # each expert's last tile may be partial
    padded = (sizes + tile - 1) // tile * tile
    ends, padded_ends = jnp.cumsum(sizes), jnp.cumsum(padded)
    index = jnp.arange(m, dtype=sizes.dtype)
    group = jnp.searchsorted(ends, index, side="right")  # e: past every group
    start = jnp.take(ends - sizes, group, mode="fill", fill_value=0)
    padded_start = jnp.take(padded_ends - padded, group, mode="fill", fill_value=0)
    slot = jnp.where(group < e, padded_start + index - start, tiles * tile)  # past the end: dropped
    xs = jnp.zeros((tiles * tile, d), rows.dtype).at[slot].set(rows, mode="drop").reshape(tiles, tile, d)
    expert = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(tiles) * tile, side="right"), e - 1)

    def one(args):
        x, j = args
        gate, up = x @ p["e_gate"][j], x @ p["e_up"][j]
        return (activate(gate, spec.activation) * up) @ p["e_down"][j]

    out = jax.lax.map(one, (xs, expert)).reshape(tiles * tile, d)
    return jnp.take(out, slot, axis=0, mode="fill", fill_value=0)


def _row_axes(batch: int) -> tuple[str, ...]:
    """Mesh axes (of size > 1) the activation batch is split over under the active rules, if they divide
    ``batch``; () without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    spec = logical_to_spec((ACT_BATCH,), get_logical_axis_rules())
    axes = tuple(a for a in (mesh_axes_of(spec[0]) if len(spec) else ()) if mesh.shape[a] > 1)
    return axes if axes and batch % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def moe_block(p: dict[str, jnp.ndarray], x: jnp.ndarray, valid: jnp.ndarray, *, spec: ModelSpec) -> jnp.ndarray:
    """A routed MLP layer on x [B, T, D] (``valid`` bool [B, T]) -> [B, T, D]: the routed experts, plus the
    shared expert scaled by sigmoid(x . shared_gate) where the spec has one (Qwen2-MoE, Qwen3.5-MoE), added
    after (HF's order)."""
    b, t, d = x.shape
    params = {name: p[name] for name in EXPERT_PARAMS}

    def local(params, x, valid):
        rows = x.shape[0] * x.shape[1]
        return routed_experts(params, x.reshape(rows, d), valid.reshape(rows), spec=spec).reshape(x.shape)

    axes = _row_axes(b)
    if axes:  # each row shard routes its own tokens; the experts' weights are gathered into it
        rows = jax.P(axes)
        local = jax.shard_map(
            local,
            in_specs=(jax.tree.map(lambda _: jax.P(), params), rows, rows),
            out_specs=rows,
            axis_names=set(axes),
            check_vma=False,
        )
    out = local(params, x, valid)
    if spec.intermediate_size:
        gate = jax.nn.sigmoid(jnp.einsum("btd,d->bt", x, p["shared_gate"].astype(x.dtype)))[..., None]
        out = out + gate * mlp_block(p, x, spec=spec)
    return out
