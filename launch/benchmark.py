r"""Scoring benchmark: one run, same weights and data, ratios against baselines measured in-process.

  python -m launch.benchmark --data=../shared/data/psych201 [--participants=24] [--out=bench.json]

Reports
1. tokens/s of our packed scorer vs a faithful HF PyTorch implementation of the reference algorithm
   (batch 1, full logits, per-token Python loop) on a tiny Qwen3-shaped model with the real 151,936-token
   vocabulary, float32, and the largest |ΔNLL| per response between the two;
2. packing efficiency (real / computed tokens) over all studies under ``--data`` as the job packs them;
3. the number of compiled programs of the run;
4. compiled temp memory of the log-prob step vs full logits + log_softmax at 16K tokens.
CPU numbers are ratios for regression tracking, not GPU predictions. No timed assertions anywhere.
"""

import itertools
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from psych201_jax import defaults
from psych201_jax.data import records, spans
from psych201_jax.model import checkpoint
from psych201_jax.scoring import packing, scorer, stream
from psych201_jax.testing import oracle, tiny_models, torch_reference

FLAGS = flags.FLAGS
flags.DEFINE_string("data", os.path.join("..", "shared", "data", "psych201"), "Psych-201 studies.")
flags.DEFINE_integer("per_study", 1, "Participants per study in the end-to-end comparison.")
flags.DEFINE_string("studies", "", "Comma list of studies for the end-to-end comparison (default: all).")
flags.DEFINE_integer("vocab", 151936, "Model vocabulary (the tokenizer's ids are a prefix of it).")
flags.DEFINE_string("out", "", "Optional JSON file for the numbers.")

TOKENS_PER_BATCH, CHUNK_TOKENS = 131072, 1 << 22  # the job's defaults (configs/score.py)
QWEN3_TINY = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
)


def end_to_end(data_root: str, studies: list[str], per_study: int, vocab: int) -> dict:
    """The first ``per_study`` participants of every study (a scored fraction close to the corpus's)."""
    tok = spans.TokenizerInfo(defaults.DEFAULT_TOKENIZER)
    recs = []
    for study in studies:
        recs.extend(itertools.islice(records.iter_records(os.path.join(data_root, study)), per_study))
    items = list(spans.tokenize_records(recs, tok, spans.Protocol("reference")))
    tokens = sum(len(p.token_ids) for p in items)
    scored = sum(int((p.response_index[1:] >= 0).sum()) for p in items)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = tiny_models.make_tiny_hf_checkpoint(
            "qwen3", os.path.join(tmp, "hf"), defaults.DEFAULT_TOKENIZER, vocab_size=vocab, **QWEN3_TINY
        )
        conv = os.path.join(tmp, "conv")
        checkpoint.convert(hf_dir, conv, "float32")
        model, spec = checkpoint.load_model(conv, dtype="float32")
        torch_model = torch_reference.load_hf_model(hf_dir)

    ours = scorer.Scorer(model)
    row_lengths = packing.choose_row_lengths(max(spec.max_position_embeddings, TOKENS_PER_BATCH))
    kwargs = dict(row_lengths=row_lengths, tokens_per_batch=TOKENS_PER_BATCH, max_tokens=spec.max_position_embeddings)
    start = time.perf_counter()
    first = {r.key: r for r in stream.score_spans(items, ours, **kwargs)}
    with_compile = time.perf_counter() - start
    start = time.perf_counter()
    steady = {r.key: r for r in stream.score_spans(items, ours, **kwargs)}
    ours_s = time.perf_counter() - start

    start = time.perf_counter()
    reference = {
        p.key: torch_reference.reference_response_nll(torch_model, p.token_ids, p.response_index) for p in items
    }
    ref_s = time.perf_counter() - start
    diff = max(float(np.max(np.abs(steady[k].nll - reference[k]), initial=0.0)) for k in reference)
    rel = max(
        float(np.max(np.abs(steady[k].nll - reference[k]) / np.maximum(np.abs(reference[k]), 1.0), initial=0.0))
        for k in reference
    )
    assert all(np.array_equal(first[k].nll, steady[k].nll) for k in first)
    return {
        "participants": len(items),
        "studies": len(studies),
        "tokens": tokens,
        "scored_fraction": scored / tokens,
        "max_rel_delta_nll": rel,
        "ours_tokens_per_s": tokens / ours_s,
        "ours_tokens_per_s_incl_compile": tokens / with_compile,
        "reference_tokens_per_s": tokens / ref_s,
        "speedup": ref_s / ours_s,
        "speedup_incl_compile": ref_s / with_compile,
        "max_abs_delta_nll": diff,
        "compilations": ours.compilations(),
    }


def packing_efficiency(data_root: str, context: int = 32768) -> dict:
    """Real/computed tokens when the job packs every study (its default chunks, batches and rows)."""
    tok = spans.TokenizerInfo(defaults.DEFAULT_TOKENIZER)
    row_lengths = packing.choose_row_lengths(max(context, TOKENS_PER_BATCH))
    real = computed = 0
    shapes = set()
    chunk, chunk_tokens = [], 0

    def flush():
        nonlocal real, computed
        stats = packing.packing_stats(packing.pack(chunk, row_lengths, tokens_per_batch=TOKENS_PER_BATCH))
        real += stats["real_tokens"]
        computed += stats["computed_tokens"]
        shapes.update(stats["shapes"])
        chunk.clear()

    for item in spans.tokenize_records(records.iter_records(data_root), tok, spans.Protocol("reference")):
        if isinstance(item, spans.ParticipantSpans):
            chunk.append(item)
            chunk_tokens += len(item.token_ids)
            if chunk_tokens >= CHUNK_TOKENS:
                flush()
                chunk_tokens = 0
    if chunk:
        flush()
    return {
        "real_tokens": real,
        "computed_tokens": computed,
        "efficiency": real / computed,
        "distinct_shapes": len(shapes),
    }


def logprob_memory(tokens: int = 16384, d: int = 256, vocab: int = 151936, scored: float = 0.05) -> dict:
    """Compiled temp bytes of the chunked kernel vs full logits + log_softmax (+ argmax) at ``tokens``."""
    c = int(tokens * scored)
    hidden = jax.ShapeDtypeStruct((1, tokens, d), jnp.float32)
    w = jax.ShapeDtypeStruct((vocab, d), jnp.float32)
    idx = jax.ShapeDtypeStruct((c,), jnp.int32)
    valid = jax.ShapeDtypeStruct((c,), jnp.bool_)

    def full(hidden, w, idx, target, valid):
        logp = jax.nn.log_softmax(hidden[0] @ w.T, axis=-1)
        nll = -jnp.take_along_axis(logp[idx], target[:, None], axis=1)[:, 0]
        return jnp.where(valid, nll, 0.0), jnp.argmax(logp[idx], axis=-1)

    def temp(fn):
        analysis = jax.jit(fn).lower(hidden, w, idx, idx, valid).compile().memory_analysis()
        return None if analysis is None else analysis.temp_size_in_bytes

    ours = temp(lambda *a: oracle.masked_logprobs(*a))
    baseline = temp(full)
    return {
        "tokens": tokens,
        "scored": c,
        "ours_temp_bytes": ours,
        "full_logits_temp_bytes": baseline,
        "ratio": (ours / baseline) if ours and baseline else None,
    }


def head_cost(vocab: int = 151936, d: int = 1024, capacity: int = 1024, repeats: int = 5) -> dict:
    """Steady time of the head (one device, float32) without and with the default temperature grid (17
    temperatures, entropy): the ratio is the cost of the calibration statistics."""
    import functools

    from psych201_jax.conditions import DEFAULT_TEMPERATURES
    from psych201_jax.scoring import head

    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(1, capacity, d)), jnp.float32)
    unembedding = jnp.asarray(rng.normal(size=(vocab, d)) / np.sqrt(d), jnp.float32)
    index = jnp.arange(capacity, dtype=jnp.int32)
    target = jnp.asarray(rng.integers(0, vocab, capacity), jnp.int32)
    valid = jnp.ones(capacity, bool)
    slot = index // 4
    out = {"vocab": vocab, "d": d, "capacity": capacity}
    for name, temps in (("no_grid_s", ()), ("grid_s", DEFAULT_TEMPERATURES)):
        f = jax.jit(
            functools.partial(
                head.score_head, vocab_axes=(), axis_sizes={}, vocab_chunk=8192, temperatures=tuple(temps)
            )
        )
        jax.block_until_ready(f(hidden, unembedding, index, target, valid, slot))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(f(hidden, unembedding, index, target, valid, slot))
            times.append(time.perf_counter() - start)
        out[name] = min(times)
    out["grid_over_no_grid"] = out["grid_s"] / out["no_grid_s"]
    return out


def main(argv):
    del argv
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__}
    studies = (
        FLAGS.studies.split(",")
        if FLAGS.studies
        else sorted(d for d in os.listdir(FLAGS.data) if os.path.isdir(os.path.join(FLAGS.data, d)))
    )
    out["end_to_end"] = end_to_end(FLAGS.data, studies, FLAGS.per_study, FLAGS.vocab)
    print("end to end:", json.dumps(out["end_to_end"], indent=1))
    out["logprob_memory"] = logprob_memory()
    print("log-prob memory:", json.dumps(out["logprob_memory"], indent=1))
    out["head_cost"] = head_cost()
    print("head cost of the temperature grid:", json.dumps(out["head_cost"], indent=1))
    out["packing"] = packing_efficiency(FLAGS.data)
    print("packing:", json.dumps(out["packing"], indent=1))
    if FLAGS.out:
        with open(FLAGS.out, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    app.run(main)
