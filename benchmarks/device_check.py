r"""Accelerator check: attention backends, scorer throughput and the HF PyTorch reference, in one JSON.

  OUT=DIR bash launch/device_check.sh [--dry_run]      (the script calls this module)

Writes ``--out`` (JSON) with:
- ``backends``: every attention backend runnable here against ``xla`` on packed rows (three segments and
  padding, GQA, with and without a sliding window, and soft-capped where the backend has the cap): max
  |difference| and the leakage check (changing one segment's keys/values moves no other segment's output);
- ``peak_matmul_tflops``: this device's measured dense matmul peak (bf16 on accelerators, f32 on CPU);
- ``models``: one random model per family, shaped as a released one (real widths; the depths in ``layers``,
  reduced to fit the time limit; ``--models`` picks some), bf16: our scorer's tokens/s on packed real
  transcripts, model FLOP/s as a fraction of the measured peak (MFU), peak device memory, the batch-1 HF
  PyTorch reference (bf16, on the GPU when torch sees one) on the same weights and data, the speed-up, the
  largest relative |dNLL| between the two, and tokens/s with the mesh on and off;
- ``simulate``: slot sampling (``psych201_jax.sampling``) on ``--simulate_model``'s shape (bf16): our
  sampler's decode tokens/s, slots/s and peak device memory against HF ``generate`` (KV cache,
  ``num_return_sequences=k``, on the GPU when torch sees one) on the same weights and slots of real
  transcripts (``benchmarks/sampling.py``: what is counted and how); run before the models, so the device's
  peak bytes are its own, and with ``--models`` only in the call that includes its shape.
``--dry_run`` runs the same code paths on tiny shapes (CPU is fine; a temporary JAX compile cache) and writes
the same keys. The JSON is rewritten after each stage (``complete``/``ok`` false until the end); a model or
stage that fails records its error.
"""

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import measure
from benchmarks import sampling as sampling_bench
from psych201_jax import defaults
from psych201_jax.data import records, spans
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.model import attention, checkpoint
from psych201_jax.model.spec import HYBRID_FAMILIES
from psych201_jax.parallel import sharding
from psych201_jax.runs import compilation
from psych201_jax.scoring import packing, scorer, stream
from psych201_jax.testing import tiny_models

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "device_check.json", "JSON output path.")
flags.DEFINE_bool("dry_run", False, "Tiny shapes: exercise every code path quickly (CPU is fine).")
flags.DEFINE_string("data", os.path.join("tests", "data", "psych201"), "Psych-201 studies (vendored corpus).")
flags.DEFINE_integer("participants", 48, "Participants scored per model (dry run: 2).")
flags.DEFINE_list("models", [], "Model shapes to check (default: all of MODELS), e.g. to split the check over calls.")
flags.DEFINE_string("simulate_model", "qwen3_0.6b", "Model shape of the simulate stage (one of MODELS).")
flags.DEFINE_integer("simulate_slots", 64, "Slots the simulate stage samples (0: skip the stage; dry run: 4).")
flags.DEFINE_integer("simulate_samples", 8, "k: samples per slot in the simulate stage.")
flags.DEFINE_integer("simulate_max_new_tokens", 16, "M: most tokens per sample in the simulate stage (dry run: 4).")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# family, HF config overrides (real widths), layers used, full depth. Vocabulary: the bundled Qwen3
# tokenizer's 151,936 for both (its ids must fit; Llama 3.1's own is 128,256).
MODELS = {
    "qwen3_0.6b": (
        "qwen3",
        dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128),
        28,
        28,
    ),
    "llama3.1_8b": (
        "llama",
        dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
        8,
        32,
    ),
    # One shape per family added since: OLMo 2 7B (post-norm, full-width QK-norm) and Mistral 7B v0.1 (its
    # 4,096-token sliding window at full size), 4 of 32 layers each to keep the check within its budget.
    "olmo2_7b": (
        "olmo2",
        dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
        4,
        32,
    ),
    "mistral_7b": (
        "mistral",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            sliding_window=4096,
        ),
        4,
        32,
    ),
    # Gemma 2 9B (attention and final-logit soft caps 50 / 30, 4,096-token window on every other layer,
    # 256,000-token vocabulary) and Gemma 3 4B's language model (five 1,024-token window layers to one
    # global; 262,208-token vocabulary: the head's memory at Gemma's vocabulary).
    "gemma2_9b": (
        "gemma2",
        dict(
            hidden_size=3584,
            intermediate_size=14336,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            vocab_size=256000,
        ),
        4,
        42,
    ),
    "gemma3_4b": (
        "gemma3_text",
        dict(
            hidden_size=2560,
            intermediate_size=10240,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=1024,
            vocab_size=262208,
        ),
        6,
        34,
    ),
    # Qwen3-30B-A3B at 4 of 48 layers: 128 experts of width 768, top 8 (dropless grouped matmuls,
    # ragged_dot on the accelerator); MFU counts the active parameters (measure.mlp_flops).
    "qwen3_30b_a3b": (
        "qwen3_moe",
        dict(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
        ),
        4,
        48,
    ),
    # Qwen3.5-35B-A3B's language model at 4 of 40 layers (3 Gated DeltaNet, 1 gated attention): 256 experts of
    # width 512, top 8, and a 512-wide shared expert (the vocabulary is the bundled tokenizer's, not 248,320).
    "qwen3_5_35b_a3b": (
        "qwen3_5_moe_text",
        dict(
            hidden_size=2048,
            moe_intermediate_size=512,
            shared_expert_intermediate_size=512,
            num_experts=256,
            num_experts_per_tok=8,
            num_attention_heads=16,
            num_key_value_heads=2,
            head_dim=256,
            linear_num_key_heads=16,
            linear_num_value_heads=32,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
        ),
        4,
        40,
    ),
}
DRY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def backend_checks(t: int, dtype) -> dict:
    """Each runnable backend vs xla: parity (with/without window) and leakage on one packed batch."""
    rng = np.random.default_rng(0)
    b, hq, hk, d = 2, 8, 2, 64
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), dtype) for h in (hq, hk, hk))
    seg = np.zeros((b, t), np.int32)
    cuts = [0, t // 3, t // 2, (7 * t) // 8]
    for i in range(3):
        seg[:, cuts[i] : cuts[i + 1]] = i + 1
    seg = jnp.asarray(seg)
    other = seg != 1
    k2 = jnp.where((seg == 1)[..., None, None], k[::-1], k)  # change segment 1's keys/values only
    v2 = jnp.where((seg == 1)[..., None, None], v[::-1], v)
    out = {}
    for name in attention.runnable_backends():
        entry: dict = {}
        try:
            for window in (None, t // 4):
                ref = attention.attention(q, k, v, seg, sliding_window=window, backend="xla").astype(jnp.float32)
                got = attention.attention(q, k, v, seg, sliding_window=window, backend=name).astype(jnp.float32)
                entry["max_abs_vs_xla" + ("_window" if window else "")] = float(jnp.abs(got - ref).max())
            if name in attention.SOFTCAP_BACKENDS:  # Gemma 2's attention-logit soft cap (others refuse it)
                ref = attention.attention(q, k, v, seg, softcap=5.0, backend="xla").astype(jnp.float32)
                got = attention.attention(q, k, v, seg, softcap=5.0, backend=name).astype(jnp.float32)
                entry["max_abs_vs_xla_softcap"] = float(jnp.abs(got - ref).max())
            moved = attention.attention(q, k2, v2, seg, backend=name).astype(jnp.float32)
            base = attention.attention(q, k, v, seg, backend=name).astype(jnp.float32)
            entry["leak_max_abs"] = float(jnp.where(other[..., None, None], jnp.abs(moved - base), 0).max())
            tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
            entry["ok"] = entry["leak_max_abs"] == 0.0 and all(
                v <= tol for key, v in entry.items() if key.startswith("max_abs_vs_xla")
            )
        except Exception as err:  # a backend that cannot run here is reported, not fatal
            entry = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        out[name] = entry
    return out


def _participants(tokenizer_dir: str, data: str, n: int, max_tokens: int = 0) -> list:
    """n participants, round-robin over studies (a realistic mix of lengths); with ``max_tokens``, only
    transcripts that short (the dry run: the batch-1 full-logit reference dominates its time on CPU)."""
    studies = sorted(s for s in os.listdir(data) if os.path.isdir(os.path.join(data, s)))
    per_study = [list(records.iter_records(os.path.join(data, s))) for s in studies]
    tokenizer, rules, kept = TokenizerInfo(tokenizer_dir), spans.SpanRules("reference"), []
    for i in range(max(map(len, per_study))):
        for got in per_study:
            if i < len(got) and len(kept) < n:
                kept += [
                    p
                    for p in spans.tokenize_records([got[i]], tokenizer, rules)
                    if isinstance(p, spans.ParticipantSpans) and (not max_tokens or len(p.token_ids) <= max_tokens)
                ]
    return kept


def _hf_reference(hf_dir: str, items: list, dry: bool = False) -> tuple[dict, float, str]:
    """The reference algorithm (batch 1, full logits) in bf16 on the GPU when torch has one; the dry run on
    a CPU computes in float32 on the same bf16 weights (torch's bf16 CPU matmuls took 12 s a model there)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if dry and device == "cpu" else torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa")
    except ValueError:  # no SDPA where attention is soft-capped (Gemma 2): HF's eager attention
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager")
    model = model.to(device).eval()
    out = {}
    start = time.perf_counter()
    with torch.inference_mode():
        for p in items:
            ids = torch.as_tensor(np.asarray(p.token_ids, np.int64), device=device)[None]
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").double().cpu().numpy()
            labelled = np.asarray(p.response_index)[1:] >= 0
            runs, current = [], None
            for i, flag in enumerate(labelled):  # sums over maximal labelled runs, as eval.py
                if flag:
                    current = nll[i] if current is None else current + nll[i]
                elif current is not None:
                    runs.append(current)
                    current = None
            if current is not None:
                runs.append(current)
            out[p.key] = np.asarray(runs)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start, device


def _checkpoint(family: str, widths: dict, layers: int, tmp: str) -> tuple[str, str]:
    """A random bf16 HF checkpoint of the shape under ``tmp`` and its conversion: (hf_dir, converted dir)."""
    hf_dir = tiny_models.make_tiny_hf_checkpoint(
        family,
        os.path.join(tmp, "hf"),
        defaults.DEFAULT_TOKENIZER,
        dtype="bfloat16",
        num_hidden_layers=layers,
        max_position_embeddings=32768,
        **{"vocab_size": 151936, **widths},  # at least the bundled Qwen3 tokenizer's ids
    )
    conv = os.path.join(tmp, "conv")
    checkpoint.convert(hf_dir, conv, "bfloat16")
    return hf_dir, conv


def model_check(family: str, widths: dict, layers: int, full: int, items: list, peak: float, tmp: str) -> dict:
    """Scorer vs the HF reference on one shape; its checkpoint under ``tmp`` (made there when missing)."""
    if not os.path.isdir(os.path.join(tmp, "conv")):
        _checkpoint(family, widths, layers, tmp)
    hf_dir, conv = os.path.join(tmp, "hf"), os.path.join(tmp, "conv")
    reference, ref_s, torch_device = _hf_reference(hf_dir, items, FLAGS.dry_run)
    rows, tpb = packing.choose_row_lengths(32768), 65536
    shapes = {(b.tokens.shape, b.score_index.shape) for b in packing.pack(items, rows, tokens_per_batch=tpb)}
    runs = {}
    for mode in ("on", "off"):
        model, spec = checkpoint.load_model(conv, mesh=None)
        mesh = sharding.mesh_for(mode)
        ours = scorer.Scorer(model, mesh=mesh)
        kwargs = dict(row_lengths=rows, tokens_per_batch=tpb, max_tokens=32768)
        start = time.perf_counter()
        list(stream.score_spans(items, ours, **kwargs))  # compiles every batch shape
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        results = {r.key: r for r in stream.score_spans(items, ours, **kwargs)}
        runs[mode] = (time.perf_counter() - start, results, first_s)
        del ours, model
    tokens = sum(len(p.token_ids) for p in items)
    ours_s, results, first_s = runs["on"]
    rel = max(
        float(np.max(np.abs(results[k].nll - reference[k]) / np.maximum(np.abs(reference[k]), 1.0), initial=0.0))
        for k in reference
    )
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "family": family,
        "layers": layers,
        "full_depth_layers": full,
        "participants": len(items),
        "tokens": tokens,
        "ours_tokens_per_s": tokens / ours_s,
        "first_pass_s": first_s,  # the same pass with every batch shape compiling
        "batch_shapes": len(shapes),
        "mfu": measure.model_flops(spec, items) / ours_s / peak,  # the full forward's FLOPs (comparable)
        "mfu_executed": measure.executed_flops(spec, items) / ours_s / peak,  # the FLOPs we run
        "peak_memory_bytes": stats.get("peak_bytes_in_use"),
        "hf_reference_tokens_per_s": tokens / ref_s,
        "hf_reference_device": torch_device,
        "speedup_vs_hf_batch1": ref_s / ours_s,
        "max_rel_delta_nll_vs_hf_bf16": rel,
        "mesh_on_tokens_per_s": tokens / runs["on"][0],
        "mesh_off_tokens_per_s": tokens / runs["off"][0],
        "mesh_on_equals_off": all(np.array_equal(runs["on"][1][k].nll, runs["off"][1][k].nll) for k in reference),
    }


def _shape(name: str, dry: bool) -> tuple:
    """(family, widths, layers used, full depth) of a MODELS shape; the dry run's tiny widths and 2 layers
    (a mixture of experts keeps 8 experts, top 2, of width 32; a Gated DeltaNet hybrid its 4-layer pattern,
    with the tiny model's linear-attention widths)."""
    family, widths, layers, full = MODELS[name]
    if not dry:
        return family, widths, layers, full
    moe = "num_experts" in widths
    dry_layers = 4 if family in HYBRID_FAMILIES else 2
    return (
        family,
        DRY | (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32) if moe else {}),
        dry_layers,
        full,
    )


def simulate_check(name: str, data: str, dry: bool, tmp: str) -> dict:
    """Slot sampling on ``name``'s shape (bf16; dry run: tiny): ours against HF ``generate`` on the same
    weights and slots (``benchmarks.sampling.compare``), HF on the GPU when torch sees one. The checkpoint
    is made under ``tmp`` (the model check of the same shape reuses it)."""
    import torch

    family, widths, layers, full = _shape(name, dry)
    tokenizer = TokenizerInfo(defaults.DEFAULT_TOKENIZER)
    k, per = FLAGS.simulate_samples, 4  # per: slots per participant
    max_new = min(FLAGS.simulate_max_new_tokens, 4) if dry else FLAGS.simulate_max_new_tokens
    cfg = sampling_bench.config(tokenizer, k, max_new, k * per)
    slots = min(FLAGS.simulate_slots, 4) if dry else FLAGS.simulate_slots
    cuts, slots_of = sampling_bench.choose_slots(data, tokenizer, slots, per, 256 if dry else 2048)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, hf_model = sampling_bench.load(*_checkpoint(family, widths, layers, tmp), "bfloat16", device)
    result = sampling_bench.compare(
        model, hf_model, cuts, slots_of, cfg, hf_batch=4 if dry else 8, rows_per_batch=1 if dry else 8
    )
    print(sampling_bench.table(result), flush=True)
    return {"model": name, "family": family, "layers": layers, "full_depth_layers": full, **result}


def main(argv):
    del argv
    start = time.perf_counter()
    cache = tempfile.TemporaryDirectory(prefix="device_check_jax_")
    if FLAGS.dry_run:  # CI's time: the mesh-off pass loads the mesh-on pass's programs (one device, same HLO)
        compilation.enable_compile_cache(cache.name)
    accel = jax.default_backend() != "cpu"
    dtype = jnp.bfloat16 if accel else jnp.float32
    out: dict = {
        "dry_run": FLAGS.dry_run,
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
    }
    out["peak_matmul_tflops"] = measure.peak_matmul_flops(dtype, 512 if FLAGS.dry_run else 8192) / 1e12
    out["backends"] = backend_checks(256 if FLAGS.dry_run else 4096, dtype)
    _write(out, start)
    unknown = sorted(set(FLAGS.models + [FLAGS.simulate_model]) - set(MODELS))
    if unknown:
        raise app.UsageError(f"--models / --simulate_model: unknown shapes {unknown}; known: {sorted(MODELS)}")
    shared = tempfile.TemporaryDirectory(prefix="device_check_")  # the simulate shape's checkpoint, reused
    # Before the models (the device's peak bytes are this stage's own); with --models, in the call that
    # checks --simulate_model's shape only.
    if FLAGS.simulate_slots > 0 and (not FLAGS.models or FLAGS.simulate_model in FLAGS.models):
        try:
            data = os.path.join(REPO, FLAGS.data)
            out["simulate"] = simulate_check(FLAGS.simulate_model, data, FLAGS.dry_run, shared.name)
        except Exception as err:  # reported, not fatal: the models' numbers still come
            out["simulate"] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
        print("simulate", json.dumps(out["simulate"]), flush=True)
        _write(out, start)
    n = 2 if FLAGS.dry_run else FLAGS.participants
    items = _participants(defaults.DEFAULT_TOKENIZER, os.path.join(REPO, FLAGS.data), n, 800 if FLAGS.dry_run else 0)
    out["models"] = {}
    for name in MODELS:
        if FLAGS.models and name not in FLAGS.models:
            continue
        family, widths, layers, full = _shape(name, FLAGS.dry_run)
        reuse = name == FLAGS.simulate_model and os.path.isdir(os.path.join(shared.name, "conv"))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                peak = out["peak_matmul_tflops"] * 1e12
                out["models"][name] = model_check(
                    family, widths, layers, full, items, peak, shared.name if reuse else tmp
                )
        except Exception as err:  # one model failing (memory, a kernel) must not lose the other's numbers
            out["models"][name] = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
        if reuse:
            shared.cleanup()
        print(name, json.dumps(out["models"][name]), flush=True)
        _write(out, start)
    shared.cleanup()
    out["complete"] = True
    out["ok"] = all(b.get("ok") for b in out["backends"].values()) and not any(
        "error" in m for m in [*out["models"].values(), out.get("simulate", {})]
    )
    _write(out, start)
    print(json.dumps(out, indent=1))
    cache.cleanup()


def _write(out: dict, start: float) -> None:
    """Writes the JSON so far (atomically): a run cut short by its time limit still leaves its numbers,
    marked ``complete: false`` and ``ok: false`` until the end."""
    out.setdefault("complete", False)
    out.setdefault("ok", False)
    out["wall_s"] = time.perf_counter() - start
    with open(FLAGS.out + ".tmp", "w") as fh:
        json.dump(out, fh, indent=2)
    os.replace(FLAGS.out + ".tmp", FLAGS.out)


if __name__ == "__main__":
    app.run(main)
