r"""One-device steady state of the scoring path: tokens/s of warm passes over the same participants.

  python -m benchmarks.benchmark_steady [--data=$PSYCH201_DATA] [--repeats=3] [--out=steady.json]

A Qwen3-shaped random model (4 layers, width 256, vocabulary 32,768) scores 6 participants of each of 5
studies (robust protocol, 8,000-token budget) on the 1 x 1 x 1 mesh; the first pass includes compilation,
the steady number is the best of ``--repeats`` further passes. A ratio tracker, not a GPU prediction.
"""

import itertools
import json
import os
import tempfile
import time

from absl import app, flags

from psych201_jax import console, defaults
from psych201_jax.data import records, spans
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.model import checkpoint
from psych201_jax.scoring import packing, scorer, stream
from psych201_jax.testing import tiny_models

_DATA = flags.DEFINE_string(
    "data",
    os.environ.get("PSYCH201_DATA", os.path.join("tests", "data", "psych201")),
    "Psych-201 studies (the full corpus: set PSYCH201_DATA).",
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Warm passes; the best is reported.")
_OUT = flags.DEFINE_string("out", "", "Optional JSON file for the numbers.")
STUDIES = (
    "thoma2025riskychoice",
    "guenther2024substitutions",
    "busch2024_stroop",
    "xu2023augmenting",
    "franke2024bayesian",
)


def main(argv):
    del argv
    console.quiet_libraries()
    tok = TokenizerInfo(defaults.DEFAULT_TOKENIZER)
    recs = [r for s in STUDIES for r in itertools.islice(records.iter_records(os.path.join(_DATA.value, s)), 6)]
    items = list(spans.tokenize_records(recs, tok, spans.SpanRules("robust", token_budget=8000)))
    tokens = sum(len(p.token_ids) for p in items if isinstance(p, spans.ParticipantSpans))
    with tempfile.TemporaryDirectory() as tmp:
        hf = tiny_models.make_tiny_hf_checkpoint(
            "qwen3",
            os.path.join(tmp, "hf"),
            defaults.DEFAULT_TOKENIZER,
            vocab_size=32768,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=8192,
        )
        checkpoint.convert(hf, os.path.join(tmp, "conv"), "float32")
        model, _ = checkpoint.load_model(os.path.join(tmp, "conv"), dtype="float32")
    sc = scorer.Scorer(model)
    kw = dict(row_lengths=packing.choose_row_lengths(16384, 2048), tokens_per_batch=16384, max_tokens=8192)
    start = time.perf_counter()
    list(stream.score_spans(items, sc, **kw))
    first = time.perf_counter() - start
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        list(stream.score_spans(items, sc, **kw))
        times.append(time.perf_counter() - start)
    out = {
        "tokens": tokens,
        "participants": len(items),
        "first_s": first,
        "steady_s": min(times),
        "tokens_per_s": tokens / min(times),
        "compilations": sc.compilations(),
    }
    print(json.dumps(out, indent=2))
    if _OUT.value:
        with open(_OUT.value, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    app.run(main)
