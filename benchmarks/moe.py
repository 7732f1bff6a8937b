"""Benchmark: one mixture-of-experts layer's routed MLP at real widths on this machine (issue 31's CPU row).

    python -m benchmarks.moe [--config=tests/data/hub_configs/Qwen3-30B-A3B.json] [--tokens=2048] [--json=PATH]

Builds one layer's router and experts at the config's real widths (Qwen3-30B-A3B: 128 experts, top 8,
hidden 2,048, expert width 768) with random float32 weights, routes ``--tokens`` random hidden states and
times, in one process: a dense matmul of the experts' total shape ([tokens x k, D] x [D, F], the machine's
matmul rate), the grouped expert MLP this machine runs (``moe.tiled_expert_mlp`` on CPU), jax's
``ragged_dot`` (on CPU a masked product over every expert; only at <= ``--ragged_max`` tokens), and the whole
routed MLP with the router's share of it. Achieved FLOP/s count useful work only: 3 matmuls of
[tokens x k, D] x [D, F] (gate, up, down).
"""

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from transformers import AutoConfig

from psych201_jax.model import moe
from psych201_jax.model.hf_config import from_hf_config

CONFIG = flags.DEFINE_string("config", "tests/data/hub_configs/Qwen3-30B-A3B.json", "An MoE model's HF config.json.")
TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens routed through the layer.")
RAGGED_MAX = flags.DEFINE_integer("ragged_max", 256, "Time jax's ragged_dot only up to this many tokens.")
REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats after one warm-up.")
JSON = flags.DEFINE_string("json", "", "Write the numbers here too.")


def timed(fn, *args, repeats: int) -> float:
    """Seconds per call, after one compiling call."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats


def measure(config_path: str, tokens: int, repeats: int, ragged_max: int) -> dict:
    with open(config_path) as fh:
        hf = json.load(fh)
    spec = from_hf_config(AutoConfig.for_model(hf.pop("model_type"), **hf))
    d, f, e, k = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts, spec.num_experts_per_tok
    keys = jax.random.split(jax.random.key(0), 5)
    p = {
        "router": jax.random.normal(keys[0], (d, e)) / d**0.5,
        "e_gate": jax.random.normal(keys[1], (e, d, f)) / d**0.5,
        "e_up": jax.random.normal(keys[2], (e, d, f)) / d**0.5,
        "e_down": jax.random.normal(keys[3], (e, f, d)) / f**0.5,
    }
    x = jax.random.normal(keys[4], (tokens, d))
    valid = jnp.ones(tokens, bool)
    useful = 2 * 3 * tokens * k * d * f
    experts, _ = moe.route(x, p["router"], spec)
    flat = experts.reshape(-1)
    order = jnp.argsort(flat)
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    rows = x[order // k]
    weights = {name: p[name] for name in ("e_gate", "e_up", "e_down")}
    a, b = jnp.ones((tokens * k, d)), jnp.ones((d, f))
    dense = timed(jax.jit(lambda a, b: a @ b), a, b, repeats=repeats)
    tiled = timed(
        jax.jit(lambda r, s, w: moe.tiled_expert_mlp(r, w, s, spec=spec)), rows, sizes, weights, repeats=repeats
    )
    ragged = None
    if tokens <= ragged_max:
        fn = jax.jit(lambda r, s, w: moe.ragged_expert_mlp(r, w, s, spec=spec))
        ragged = timed(fn, rows, sizes, weights, repeats=1)
    whole = timed(jax.jit(lambda p, x: moe.routed_experts(p, x, valid, spec=spec)), p, x, repeats=repeats)
    router = timed(jax.jit(lambda p, x: moe.route(x, p["router"], spec)[1]), p, x, repeats=repeats)
    return {
        "config": config_path,
        "platform": jax.devices()[0].platform,
        "tokens": tokens,
        "experts": e,
        "top_k": k,
        "hidden": d,
        "expert_width": f,
        "dense_gflops": 2 * tokens * k * d * f / dense / 1e9,
        "tiled_gflops": useful / tiled / 1e9,
        "tiled_vs_dense": (useful / tiled) / (2 * tokens * k * d * f / dense),
        "ragged_gflops": None if ragged is None else useful / ragged / 1e9,
        "routed_mlp_ms": whole * 1e3,
        "router_share": router / whole,
    }


def main(argv):
    del argv
    r = measure(CONFIG.value, TOKENS.value, REPEATS.value, RAGGED_MAX.value)
    ragged = "not timed" if r["ragged_gflops"] is None else f"{r['ragged_gflops']:.1f} GFLOP/s"
    print(
        f"{r['platform']}: {r['tokens']} tokens, {r['experts']} experts, top {r['top_k']}, D {r['hidden']}, "
        f"F {r['expert_width']}\n"
        f"  dense matmul {r['dense_gflops']:.1f} GFLOP/s; grouped experts {r['tiled_gflops']:.1f} GFLOP/s "
        f"({r['tiled_vs_dense']:.2f}x dense); ragged_dot {ragged}\n"
        f"  routed MLP {r['routed_mlp_ms']:.0f} ms, router {r['router_share']:.1%} of it"
    )
    if JSON.value:
        with open(JSON.value, "w") as fh:
            json.dump(r, fh, indent=2)


if __name__ == "__main__":
    app.run(main)
