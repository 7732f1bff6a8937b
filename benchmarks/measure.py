"""Measurements shared by the maintainer scripts (benchmark, device check): matmul peak and model FLOPs."""

import time

import jax
import jax.numpy as jnp
import numpy as np


def peak_matmul_flops(dtype, n: int, repeats: int = 10) -> float:
    """FLOP/s of a jitted n x n matmul chain (the best of a few timed calls after compiling)."""
    x = jnp.ones((n, n), dtype) / n

    @jax.jit
    def chain(a):
        for _ in range(repeats):
            a = a @ x
        return a

    chain(x).block_until_ready()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        chain(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * repeats / best


def model_flops(spec, items) -> float:
    """Forward FLOPs of a Llama/Qwen-shaped decoder (others: an estimate): 2 x non-embedding parameters
    per token, plus causal attention (QK^T and PV); the head is not counted. This is the model's work as a
    full forward does it (the reference's), so it compares implementations; ``executed_flops`` is ours."""
    d, hq, hd = spec.hidden_size, spec.num_heads, spec.head_dim
    per_layer = 2 * d * hd * (2 * hq + 2 * spec.num_kv_heads) + mlp_flops(spec)
    tokens = sum(len(p.token_ids) for p in items)
    return per_layer * spec.num_layers * tokens + attention_flops(spec, items)


def mlp_flops(spec) -> float:
    """One token's MLP FLOPs in one layer: the dense gated MLP, or a mixture of experts' *active* work (the
    router, its top-k experts and a shared expert), so MFU counts active parameters only."""
    d = spec.hidden_size
    dense = 3 * 2 * d * spec.intermediate_size  # a mixture of experts: its shared expert (0 without)
    experts = getattr(spec, "num_experts", 0)
    if not experts:
        return dense
    routed = dense + 2 * d * experts + spec.num_experts_per_tok * 3 * 2 * d * spec.moe_intermediate_size
    plain = len(spec.dense_mlp_layers)  # dense layers of a mixture of experts: averaged over the layers
    return (routed * (spec.num_layers - plain) + 3 * 2 * d * spec.dense_intermediate_size * plain) / spec.num_layers


def executed_flops(spec, items) -> float:
    """``model_flops`` less what our scoring forward skips: its last layer runs queries, the output
    projection and the MLP only at scored positions (keys and values everywhere), and each such query
    attends to the keys before it. An estimate, like ``model_flops``: it takes the last layer to be a plain
    full-attention one (no window, no Gated DeltaNet, no output gate) and each batch to run once."""
    d, hq, hd = spec.hidden_size, spec.num_heads, spec.head_dim
    per_query = 2 * d * hd * 2 * hq + mlp_flops(spec)  # q and o projections, MLP
    skipped = 0.0
    for p in items:
        n = len(p.token_ids)
        scored = np.flatnonzero(np.asarray(p.response_index)[1:] >= 0)  # position t predicts t + 1
        kept = per_query * len(scored) + 2 * 2 * hq * hd * float((scored + 1).sum())
        skipped += per_query * n + 2 * 2 * hq * hd * n * n / 2 - kept
    return model_flops(spec, items) - skipped


def attention_flops(spec, items) -> float:
    """Causal attention FLOPs (QK^T and PV over each participant's causal half) of every layer."""
    per_layer = sum(2 * 2 * spec.num_heads * spec.head_dim * len(p.token_ids) ** 2 / 2 for p in items)
    return per_layer * spec.num_layers
