"""Experts on a mesh: 8 fake CPU devices (this file run as a subprocess) score like one device; each device
holds 1/n of the expert weights when they are split n ways; how tokens meet their experts (collectives).

  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=8 python tests/test_moe_sharding.py   # one JSON report on the last line

A tiny Qwen2-MoE (8 experts, top 2, a shared expert) converted from a random HF checkpoint, restored straight
into each mesh's shardings, scores the bundled sample (cut to 1,024 tokens) with the scorer on one device and
on 8x1x1 (rows over data, experts replicated), 2x2x2 (experts split 2 ways over fsdp, each expert's width
2 ways over tensor) and 1x8x1 (experts split 8 ways over fsdp). Tokens never move to their experts: each row
shard routes its own tokens and the layer's experts are all-gathered into it (no all-to-all in the compiled
forward, ``collectives``), as FSDP gathers dense weights. A tiny Qwen3.5-MoE (Gated DeltaNet hybrid, experts
and a shared expert) scores alike on 2x2x2 too.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ((8, 1, 1), (2, 2, 2), (1, 8, 1))  # data x fsdp x tensor
COLLECTIVES_OF = "1x8x1"  # the mesh whose compiled forward's collectives are counted
HYBRID_MESHES = ((2, 2, 2),)  # the Qwen3.5-MoE model's: experts over fsdp, widths and delta-rule heads over tensor
EXPERT_PARAMS = ("e_gate", "e_up", "e_down")


def _report() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    sys.path.insert(0, os.path.join(REPO, "tests"))
    import mp_driver

    from psych201_jax import defaults
    from psych201_jax.data import records, spans
    from psych201_jax.data.tokenizer import TokenizerInfo
    from psych201_jax.model import checkpoint
    from psych201_jax.parallel import sharding
    from psych201_jax.scoring import scorer, stream
    from psych201_jax.testing import memory
    from psych201_jax.testing.tiny_models import make_tiny_hf_checkpoint

    assert jax.device_count() == 8, jax.devices()
    root = tempfile.mkdtemp()
    hf = make_tiny_hf_checkpoint("qwen2_moe", os.path.join(root, "hf"), defaults.DEFAULT_TOKENIZER)
    converted = os.path.join(root, "f32")
    checkpoint.convert(hf, converted, "float32")
    tok = TokenizerInfo(defaults.DEFAULT_TOKENIZER)
    items = list(
        spans.tokenize_records(
            records.iter_records(defaults.SAMPLE_DATA), tok, spans.SpanRules("robust", token_budget=1024)
        )
    )

    def score(model, mesh=None, rules=None):
        sc = scorer.Scorer(model, mesh=mesh, rules=rules)
        return {r.key: r for r in stream.score_spans(items, sc, row_lengths=(1024,), tokens_per_batch=4096)}

    def mesh_of(shape):
        return sharding.make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])

    hybrid_hf = make_tiny_hf_checkpoint("qwen3_5_moe_text", os.path.join(root, "hf35"), defaults.DEFAULT_TOKENIZER)
    hybrid = os.path.join(root, "f32_35")
    checkpoint.convert(hybrid_hf, hybrid, "float32")
    one, hybrid_spec = checkpoint.load_model(hybrid, attention_backend="xla")
    hybrid_ref = score(one)
    hybrid_report = {}
    for shape in HYBRID_MESHES:
        mesh = mesh_of(shape)
        rules = sharding.rules_for(hybrid_spec, mesh)
        model, _ = checkpoint.load_model(hybrid, mesh=mesh, rules=rules, attention_backend="xla")
        hybrid_report["x".join(map(str, shape))] = mp_driver._compare(score(model, mesh, rules), hybrid_ref)

    base, spec = checkpoint.load_model(converted, attention_backend="xla")
    ref = score(base)
    report: dict = {"participants": len(items), "meshes": {}, "qwen3_5_moe": hybrid_report}
    for shape in MESHES:
        mesh = mesh_of(shape)
        rules = sharding.rules_for(spec, mesh)
        model, _ = checkpoint.load_model(converted, mesh=mesh, rules=rules, attention_backend="xla")
        state = nnx.state(model)
        experts = [getattr(model.layers, name)[...] for name in EXPERT_PARAMS]
        per_device = memory.state_bytes_per_device(experts)
        split = int(np.prod([mesh.shape[a] for a in ("fsdp", "tensor")]))
        entry = dict(
            mp_driver._compare(score(model, mesh, rules), ref),
            expert_bytes_total=memory.state_bytes(experts),
            expert_bytes_max_device=max(per_device.values()),
            expert_bytes_min_device=min(per_device.values()),
            expert_split=split,
            all_bytes_max_device=max(memory.state_bytes_per_device(jax.tree.leaves(state)).values()),
            shardings={n: str(getattr(model.layers, n).sharding.spec) for n in (*EXPERT_PARAMS, "router", "wq")},
        )
        report["meshes"]["x".join(map(str, shape))] = entry
        if entry is not report["meshes"].get(COLLECTIVES_OF):
            continue
        # How a row shard's tokens meet experts held elsewhere: the collectives of one compiled forward.
        tokens = jnp.zeros((8, 256), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (8, 256))
        rows = jax.NamedSharding(mesh, jax.P(sharding.row_axes(rules) or None, None))
        graphdef = nnx.graphdef(model)

        def forward(state, tokens, positions, segments, graphdef=graphdef, rules=rules):
            with nnx.logical_axis_rules(rules):
                return nnx.merge(graphdef, state)(tokens, positions, segments)

        with jax.set_mesh(mesh):
            args = [jax.device_put(x, rows) for x in (tokens, positions, jnp.ones_like(tokens))]
            text = jax.jit(forward).lower(state, *args).compile().as_text()
        entry["collectives"] = {
            op: text.count(f" {op}(") + text.count(f" {op}-start(")
            for op in ("all-gather", "all-to-all", "all-reduce", "reduce-scatter", "collective-permute")
        }
    return report


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["x".join(map(str, m)) for m in MESHES])
def test_meshes_score_like_one_device(report, mesh):
    r = report["meshes"][mesh]
    assert r["max_per_token"] <= 1e-5 and r["max_rel"] <= 1e-5, r
    assert r["argmax_equal"], r


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["x".join(map(str, m)) for m in HYBRID_MESHES])
def test_qwen3_5_moe_meshes_score_like_one_device(report, mesh):
    """Within 1e-5 relative; per token within 3e-5, the float32 noise of a random Gated DeltaNet model's own
    (HF float32 against float64: ~3e-5, the Qwen3.5 parity rows), which split reductions reorder."""
    r = report["qwen3_5_moe"][mesh]
    assert r["max_per_token"] <= 3e-5 and r["max_rel"] <= 1e-5, r
    assert r["argmax_equal"], r


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["x".join(map(str, m)) for m in MESHES])
def test_each_device_holds_its_share_of_the_experts(report, mesh):
    """Experts split over fsdp, each expert's width over tensor: each device holds 1/n of the expert weights
    (n = fsdp x tensor; data replicas a whole copy each), within 0.1%."""
    r = report["meshes"][mesh]
    share = r["expert_bytes_total"] / r["expert_split"]
    assert abs(r["expert_bytes_max_device"] - share) <= 1e-3 * share, r
    assert r["expert_bytes_min_device"] == r["expert_bytes_max_device"], r
    assert r["shardings"]["e_gate"] == "P(None, 'fsdp', None, 'tensor')", r["shardings"]
    assert r["shardings"]["e_down"] == "P(None, 'fsdp', 'tensor', None)", r["shardings"]
    assert r["shardings"]["wq"] == "P(None, 'fsdp', 'tensor', None)", r["shardings"]  # dense: the usual rules


@pytest.mark.slow
def test_tokens_stay_on_their_row_shard(report):
    """With experts split over fsdp, the forward gathers the weights (all-gather) and moves no tokens."""
    r = report["meshes"][COLLECTIVES_OF]["collectives"]
    assert r["all-gather"] > 0 and r["all-to-all"] == 0, r


if __name__ == "__main__":
    print(json.dumps(_report()))
