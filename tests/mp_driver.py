"""Subprocess driver of the sharding tests (not collected by pytest): needs its own JAX device count.

  JAX_NUM_CPU_DEVICES=8 python tests/mp_driver.py meshes [--steady]   # one JSON report on the last line
  JAX_NUM_CPU_DEVICES=8 python tests/mp_driver.py options             # option_argmax, mesh vs one device

--steady also times a second, compiled pass of every configuration (1x1x1 vs the single-device path is
the mesh-path overhead on one device).

Scores the bundled sample with the bundled model on one device (the single-device path), then on every
mesh of MESHES (the mesh path), and reports per mesh the largest differences in per-response NLL, argmax
agreement, timings and compilations; plus the sharded abstract state of a Llama-3.1-70B config.
"""

import json
import sys
import time

import jax
import numpy as np

from psych201_jax import defaults
from psych201_jax.conditions import DEFAULT_TEMPERATURES
from psych201_jax.data import records, spans
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.model import checkpoint
from psych201_jax.model import decoder as model
from psych201_jax.model.spec import ModelSpec, RopeSpec
from psych201_jax.parallel import sharding
from psych201_jax.scoring import options as options_lib
from psych201_jax.scoring import scorer, stream
from psych201_jax.testing import memory
from psych201_jax.types import ParticipantResult

MESHES = ((1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 2, 4))  # data x fsdp x tensor
OPTION_MESHES = ((1, 1, 1), (2, 2, 2), (1, 2, 4))
ROW_LENGTHS = (2048, 4096)
TOKENS_PER_BATCH = 8192
# 3 argmax blocks of 128: the bundled vocabulary (4,096) and its tensor shards (2,048, 1,024) end with a
# shorter chunk (256 or 128 columns), so the head's chunk steps, its last step and its two-level argmax all
# run on every mesh (a last chunk that is no multiple of the block: tests/test_logprobs.py).
VOCAB_CHUNK = 384

LLAMA31_70B = ModelSpec(
    model_type="llama",
    vocab_size=128256,
    hidden_size=8192,
    intermediate_size=28672,
    num_layers=80,
    num_heads=64,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    qkv_bias=False,
    o_bias=False,
    mlp_bias=False,
    qk_norm="none",
    norm_placement="pre",
    norm_weight_fp32=False,
    rope_fp32=False,
    layer_types=("full_attention",) * 80,
    sliding_window=None,
    rope=(
        (
            "full_attention",
            RopeSpec(
                "llama3",
                500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
    ),
    max_position_embeddings=131072,
)


def _score(items, model_, mesh=None, rules=None, steady=False):
    sc = scorer.Scorer(model_, vocab_chunk=VOCAB_CHUNK, mesh=mesh, rules=rules, temperatures=DEFAULT_TEMPERATURES)
    kw = dict(row_lengths=ROW_LENGTHS, tokens_per_batch=TOKENS_PER_BATCH)
    start = time.perf_counter()
    first = {r.key: r for r in stream.score_spans(items, sc, **kw)}
    timing = {"seconds_incl_compile": time.perf_counter() - start}
    if steady:
        start = time.perf_counter()
        again = {r.key: r for r in stream.score_spans(items, sc, **kw)}
        timing["seconds_steady"] = time.perf_counter() - start
        assert all(np.array_equal(first[k].nll, again[k].nll, equal_nan=True) for k in first)
    return first, timing, sc.compilations()


def _compare(got, ref):
    assert got.keys() == ref.keys()
    worst = per_token = relative = 0.0
    argmax_equal = True
    calib: dict[str, float] = {}
    for k, r in ref.items():
        g = got[k]
        assert isinstance(g, ParticipantResult) and len(g.nll) == len(r.nll)
        assert np.array_equal(np.isnan(g.nll), np.isnan(r.nll)) and np.array_equal(g.n_scored, r.n_scored)
        d = np.nan_to_num(np.abs(g.nll - r.nll))
        worst = max(worst, float(d.max(initial=0.0)))
        per_token = max(per_token, float((d / np.maximum(r.n_scored, 1)).max(initial=0.0)))
        relative = max(relative, float((d / np.maximum(np.nan_to_num(np.abs(r.nll)), 1.0)).max(initial=0.0)))
        argmax_equal &= bool(np.array_equal(g.argmax, r.argmax) and np.array_equal(g.target, r.target))
        for name in ("nll_t", "entropy", "option_mass"):  # calibration statistics: relative to each response
            a, b = getattr(g, name), getattr(r, name)
            if b is not None:
                scale = np.maximum(np.nan_to_num(np.abs(b)), 1.0)
                calib[name] = max(calib.get(name, 0.0), float(np.nan_to_num(np.abs(a - b) / scale).max(initial=0.0)))
    return {
        "max_abs": worst,
        "max_per_token": per_token,
        "max_rel": relative,
        "argmax_equal": argmax_equal,
        "calibration_max_rel": calib,
    }


def meshes(steady: bool = False) -> dict:
    assert jax.device_count() == 8, jax.devices()
    tok = TokenizerInfo(defaults.DEFAULT_TOKENIZER)
    items = list(
        spans.tokenize_records(
            records.iter_records(defaults.SAMPLE_DATA), tok, spans.SpanRules("robust", token_budget=max(ROW_LENGTHS))
        )
    )
    report = {"participants": len(items), "tokens": int(sum(len(p.token_ids) for p in items)), "meshes": {}}
    # "auto" attention runs "xla" on a multi-device mesh and the native kernel on one device: the baseline
    # runs "xla" too, so that the comparison isolates sharding (the kernel has its own tests).
    base, spec = checkpoint.load_model(defaults.DEFAULT_MODEL, dtype="float32", attention_backend="xla")
    ref, timing, comps = _score(items, base, steady=steady)
    report["single_device"] = dict(timing, compilations=comps)
    for shape in MESHES:
        mesh = sharding.make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
        rules = sharding.rules_for(spec, mesh)
        m, _ = checkpoint.load_model(
            defaults.DEFAULT_MODEL, dtype="float32", mesh=mesh, rules=rules, attention_backend="xla"
        )
        shardings = {name: str(getattr(m.layers, name).sharding.spec) for name in ("wq", "wk", "w_up")}
        shardings["embed"] = str(m.embed.sharding.spec)
        got, timing, comps = _score(items, m, mesh, rules, steady=steady)
        report["meshes"]["x".join(map(str, shape))] = dict(
            _compare(got, ref),
            **timing,
            compilations=comps,
            rules=[list(r) if not isinstance(r[1], tuple) else [r[0], list(r[1])] for r in rules],
            shardings=shardings,
        )
    report["llama70b"] = abstract_70b()
    return report


def options() -> dict:
    """option_argmax on every mesh of OPTION_MESHES vs the single-device path (the bundled sample cut to
    2,048 tokens). The options are the sample's plus 40 made-up ids for one study, so its batches need
    K = 64 and the others K = 32 (a step takes the largest K of its sub-batches)."""
    assert jax.device_count() == 8, jax.devices()
    tok = TokenizerInfo(defaults.DEFAULT_TOKENIZER)
    items = list(
        spans.tokenize_records(
            records.iter_records(defaults.SAMPLE_DATA), tok, spans.SpanRules("robust", token_budget=2048)
        )
    )
    opts = options_lib.collect_options(items)
    opts["guenther2024substitutions"] = np.union1d(opts["guenther2024substitutions"], np.arange(1000, 1040)).astype(
        np.int32
    )

    def score(model_, mesh=None, rules=None):
        sc = scorer.Scorer(
            model_, vocab_chunk=VOCAB_CHUNK, mesh=mesh, rules=rules, options=opts, temperatures=DEFAULT_TEMPERATURES
        )
        out = stream.score_spans(items, sc, row_lengths=(2048,), tokens_per_batch=4096)
        return {r.key: r for r in out}, sc.compilations()

    base, spec = checkpoint.load_model(defaults.DEFAULT_MODEL, dtype="float32", attention_backend="xla")  # see meshes()
    ref, comps = score(base)
    chosen = np.concatenate([r.option_argmax for r in ref.values()])
    report = {
        "tokens": int(chosen.size),
        "with_option": int((chosen >= 0).sum()),
        "made_up_chosen": int((chosen >= 1000).sum()),
        "single_device": comps,
        "meshes": {},
    }
    for shape in OPTION_MESHES:
        mesh = sharding.make_mesh(*shape, devices=jax.devices()[: int(np.prod(shape))])
        rules = sharding.rules_for(spec, mesh)
        m, _ = checkpoint.load_model(
            defaults.DEFAULT_MODEL, dtype="float32", mesh=mesh, rules=rules, attention_backend="xla"
        )
        got, comps = score(m, mesh, rules)
        report["meshes"]["x".join(map(str, shape))] = dict(
            _compare(got, ref),
            compilations=comps,
            option_equal=all(np.array_equal(got[k].option_argmax, r.option_argmax) for k, r in ref.items()),
        )
    return report


def abstract_70b() -> dict:
    out = {}
    live = len(jax.live_arrays())
    for shape in ((1, 8, 1), (1, 2, 4), (1, 4, 2), (1, 1, 8), (2, 4, 1)):
        mesh = sharding.make_mesh(*shape)
        _, state = checkpoint.abstract_model(
            LLAMA31_70B,
            dtype="bfloat16",
            param_dtype="bfloat16",
            mesh=mesh,
            rules=sharding.rules_for(LLAMA31_70B, mesh),
        )
        per_device = memory.state_bytes_per_device(state)
        total = memory.state_bytes(state)
        out["x".join(map(str, shape))] = {
            "total_bytes": total,
            "max_device_bytes": max(per_device.values()),
            "devices": len(per_device),
            "ratio_to_total_over_8": max(per_device.values()) / (total / 8),
        }
    out["live_arrays_added"] = len(jax.live_arrays()) - live
    out["params"] = sum(int(np.prod(s)) for s in model.param_shapes(LLAMA31_70B).values())
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["options"]:
        print(json.dumps(options()))
        sys.exit(0)
    if sys.argv[1:2] != ["meshes"] or not set(sys.argv[2:]) <= {"--steady"}:
        sys.exit(f"usage: {sys.argv[0]} meshes [--steady]")
    print(json.dumps(meshes(steady="--steady" in sys.argv)))
