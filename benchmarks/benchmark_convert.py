"""Benchmark: converter throughput and peak host memory on a ~1 GB random bf16 Llama-shaped checkpoint, and
forward compile time for 2 vs 24 layers (flat, thanks to scanned layers).

    python -m benchmarks.benchmark_convert [--size_gb=1.0] [--workdir=DIR] [--keep]

The checkpoint is written with our safetensors writer (no torch), sharded into two files plus
model.safetensors.index.json; the converter runs as ``python -m psych201_jax.cli.convert`` in a subprocess and its peak
RSS is the child's maximum resident set size (``getrusage(RUSAGE_CHILDREN)``).
"""

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from absl import app, flags

SIZE_GB = flags.DEFINE_float("size_gb", 1.0, "Approximate checkpoint size in GB (1e9 bytes).")
WORKDIR = flags.DEFINE_string("workdir", None, "Where to write the checkpoints (default: a temp dir).")
KEEP = flags.DEFINE_bool("keep", False, "Keep the generated and converted checkpoints.")

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama_tensors(num_layers: int) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of an untied Llama with the module's dimensions."""
    hd = HIDDEN // HEADS
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (HIDDEN,),
                p + "post_attention_layernorm.weight": (HIDDEN,),
                p + "self_attn.q_proj.weight": (HEADS * hd, HIDDEN),
                p + "self_attn.k_proj.weight": (KV_HEADS * hd, HIDDEN),
                p + "self_attn.v_proj.weight": (KV_HEADS * hd, HIDDEN),
                p + "self_attn.o_proj.weight": (HIDDEN, HEADS * hd),
                p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
                p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
            }
        )
    return shapes


def write_random_shard(path: str, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> int:
    """Streams N(0, 0.02) bf16 tensors into one safetensors file; returns its size in bytes."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for shape in shapes.values():
            n, chunk = int(np.prod(shape)), 1 << 24
            for start in range(0, n, chunk):
                m = min(chunk, n - start)
                fh.write((0.02 * rng.standard_normal(m, dtype=np.float32)).astype(ml_dtypes.bfloat16).tobytes())
    return os.path.getsize(path)


def write_checkpoint(hf_dir: str, size_bytes: float) -> int:
    """Llama-shaped random bf16 checkpoint of about ``size_bytes`` in two shards + index; returns bytes."""
    per_layer = sum(2 * int(np.prod(s)) for s in llama_tensors(1).values()) - 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    num_layers = max(2, round((size_bytes - 2 * (2 * VOCAB * HIDDEN + HIDDEN)) / per_layer))
    shapes = llama_tensors(num_layers)
    names = list(shapes)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    os.makedirs(hf_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    total = 0
    for fname, keys in shards.items():
        total += write_random_shard(os.path.join(hf_dir, fname), {k: shapes[k] for k in keys}, rng)
    index = {"metadata": {"total_size": total}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh)
    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=num_layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    with open(os.path.join(hf_dir, "config.json"), "w") as fh:
        json.dump(config, fh)
    return total


def child_baseline(hf_dir: str) -> tuple[int, float]:
    """(peak RSS in kB, wall seconds) of a child that only starts up like the converter: imports and reads
    the config through AutoConfig (which imports torch when it is installed)."""
    code = (
        "import resource, sys, psych201_jax.cli.convert; from psych201_jax.model import spec as modelspec; "
        "modelspec.from_hf_dir(sys.argv[1]); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, hf_dir], cwd=REPO, check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def compile_seconds(model_type: str, num_layers: int, seq_len: int = 2048) -> float:
    """Wall time to lower and compile the forward of a Llama/OLMo-shaped model from abstract parameters."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from transformers import AutoConfig

    from psych201_jax.model import checkpoint
    from psych201_jax.model import spec as modelspec

    config = AutoConfig.for_model(
        model_type,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=VOCAB,
        sliding_window=512,
        pad_token_id=None,
        eos_token_id=None,
        bos_token_id=None,
    )
    spec = modelspec.from_hf_config(config)
    graphdef, state = checkpoint.abstract_model(spec, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    fn = jax.jit(lambda state, a, b, c: nnx.merge(graphdef, state)(a, b, c))
    start = time.perf_counter()
    fn.lower(state, ids, ids, ids).compile()
    return time.perf_counter() - start


def main(argv):
    del argv
    work = WORKDIR.value or tempfile.mkdtemp(prefix="bench_convert_")
    hf_dir, out_dir = os.path.join(work, "hf"), os.path.join(work, "converted")
    shutil.rmtree(out_dir, ignore_errors=True)
    size = write_checkpoint(hf_dir, SIZE_GB.value * 1e9)
    print(f"checkpoint: {size / 1e6:.0f} MB bf16 in 2 shards at {hf_dir}")

    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "psych201_jax.cli.convert", f"--hf={hf_dir}", f"--out={out_dir}", "--dtype=bfloat16"],
        cwd=REPO,
        check=True,
    )
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    base_kb, base_seconds = child_baseline(hf_dir)
    print(
        f"convert: {seconds:.1f} s wall = {size / 1e6 / seconds:.0f} MB/s (sha256 of the sources and orbax "
        f"writes included); without the {base_seconds:.1f} s start-up: "
        f"{size / 1e6 / (seconds - base_seconds):.0f} MB/s"
    )
    print(
        f"converter peak RSS: {peak_kb / 1e3:.0f} MB = {peak_kb * 1e3 / size:.2f} x checkpoint size "
        f"(start-up alone {base_kb / 1e3:.0f} MB; above it {(peak_kb - base_kb) * 1e3 / size:.2f} x)"
    )

    for model_type in ("llama", "olmo3"):
        times = ", ".join(f"{n} layers {compile_seconds(model_type, n):.2f} s" for n in (2, 8, 24))
        print(f"forward compile ({model_type}, D=1024, T=2048, bf16): {times}")
    if not KEEP.value:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
