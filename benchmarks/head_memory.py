"""Benchmark: peak memory of the scoring head (``scoring.head.score_head``) at a Gemma-sized vocabulary.

    python -m benchmarks.head_memory [--tokens=8192] [--vocab=262144] [--dim=2304] [--chunks=1024,8192]

Compiles the head alone (one device, no vocabulary split) for C scored tokens against a [V, D] bf16
unembedding (``--dtype``), with the default temperature grid, 64 option ids and Gemma 2's final-logit soft cap (30), and
prints XLA's memory analysis of the compiled program: its arguments (the unembedding dominates), outputs,
and temporaries (what the vocabulary chunks cost), against the [C, V] float32 logits a full head would hold.
Nothing is allocated: the inputs are shapes only, so it runs on a laptop for any V.

Measured on XLA:CPU (2 cores, jax 0.10.2), C = 8,192, V = 262,144, D = 2,304 (full logits: 8,192 MiB):
float32, temporaries 136 MiB at chunk 1,024 and 1,030 MiB at 8,192; bfloat16, 2,440 and 3,334 MiB, of
which 2,304 MiB is a float32 copy of the whole bf16 unembedding that XLA:CPU makes to slice it (its bf16
dynamic-slice is normalised to float32 and hoisted out of the loop; a CPU run of a 262K-vocabulary model
in bf16 pays it once per head, in every family). The soft cap adds one [C, chunk] float32 buffer (36 MiB at
1,024, 254 MiB at 8,192).
"""

import jax
import jax.numpy as jnp
from absl import app, flags

from psych201_jax.conditions import DEFAULT_TEMPERATURES
from psych201_jax.scoring.head import score_head

TOKENS = flags.DEFINE_integer("tokens", 8192, "Scored tokens C (plan entries) of one head call.")
VOCAB = flags.DEFINE_integer("vocab", 262_144, "Vocabulary V (Gemma 3: 262,144 output rows; Gemma 2: 256,000).")
DIM = flags.DEFINE_integer("dim", 2304, "Hidden size D (Gemma 2 2B: 2304).")
CHUNKS = flags.DEFINE_list("chunks", ["1024", "8192"], "Vocabulary chunks to compile (CPU default, accelerators).")
OPTIONS = flags.DEFINE_integer("options", 64, "Option ids K (0: no option head).")
SOFTCAP = flags.DEFINE_float("softcap", 30.0, "Final-logit soft cap (0: none).")
DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Hidden states' and unembedding's dtype.")

MIB = 1 << 20


def head_memory(
    tokens: int, vocab: int, dim: int, chunk: int, options: int, softcap: float | None, dtype: str = "bfloat16"
) -> dict:
    """Bytes of the compiled head's arguments, outputs and temporaries (XLA's memory analysis)."""
    c = tokens
    args = [
        jax.ShapeDtypeStruct((c, dim), dtype),  # hidden states at the scored positions
        jax.ShapeDtypeStruct((vocab, dim), dtype),  # unembedding
        jax.ShapeDtypeStruct((c,), jnp.int32),  # target
        jax.ShapeDtypeStruct((c,), jnp.bool_),  # valid
        jax.ShapeDtypeStruct((c,), jnp.int32),  # slot
    ]
    if options:
        args += [jax.ShapeDtypeStruct((options,), jnp.int32), jax.ShapeDtypeStruct((c, options), jnp.bool_)]

    def head(*a):
        return score_head(
            *a,
            vocab_axes=(),
            axis_sizes={},
            vocab_chunk=chunk,
            temperatures=DEFAULT_TEMPERATURES,
            softcap=softcap,
        )

    analysis = jax.jit(head).lower(*args).compile().memory_analysis()
    if analysis is None:
        raise SystemExit("memory_analysis() is not available on this backend")
    return dict(
        arguments=analysis.argument_size_in_bytes,
        outputs=analysis.output_size_in_bytes,
        temporaries=analysis.temp_size_in_bytes,
    )


def main(argv):
    del argv
    c, v, d = TOKENS.value, VOCAB.value, DIM.value
    softcap = SOFTCAP.value or None
    print(
        f"head: C={c:,} scored tokens, V={v:,}, D={d}, {DTYPE.value} unembedding, "
        f"{len(DEFAULT_TEMPERATURES)} temperatures, {OPTIONS.value} options, final soft cap {softcap}; "
        f"platform {jax.default_backend()}"
    )
    print(f"full [C, V] float32 logits would be {c * v * 4 / MIB:,.0f} MiB")
    print(f"{'chunk':>6} {'arguments MiB':>14} {'outputs MiB':>12} {'temporaries MiB':>16} {'peak MiB':>9}")
    for chunk in (int(x) for x in CHUNKS.value):
        m = head_memory(c, v, d, chunk, OPTIONS.value, softcap, DTYPE.value)
        peak = sum(m.values())
        print(
            f"{chunk:>6} {m['arguments'] / MIB:>14,.1f} {m['outputs'] / MIB:>12,.1f} "
            f"{m['temporaries'] / MIB:>16,.1f} {peak / MIB:>9,.1f}"
        )


if __name__ == "__main__":
    app.run(main)
