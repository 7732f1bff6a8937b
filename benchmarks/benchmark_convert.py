"""Benchmark: converter throughput and peak host memory on a ~1 GB random bf16 Llama-shaped checkpoint, and
forward compile time for 2 vs 24 layers (flat, thanks to scanned layers); with ``--moe``, peak host memory on
a Qwen3-MoE-shaped checkpoint (64 experts, one tensor per expert, shards of ``--shard_mb``) as a multiple of
its largest shard and of its largest stacked parameter (an expert stack, written one layer at a time).

    python -m benchmarks.benchmark_convert [--size_gb=1.0] [--workdir=DIR] [--keep]
    python -m benchmarks.benchmark_convert --moe [--size_gb=1.7] [--shard_mb=400]

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
MOE = flags.DEFINE_bool("moe", False, "Convert a Qwen3-MoE-shaped checkpoint instead (peak memory only).")
SHARD_MB = flags.DEFINE_integer("shard_mb", 400, "--moe: shard size in MB (1e6 bytes), as hub checkpoints shard.")

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def outer_tensors(hidden: int) -> dict[str, tuple[int, ...]]:
    """The embedding, final norm and untied output projection."""
    return {
        "model.embed_tokens.weight": (VOCAB, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (VOCAB, hidden),
    }


def attention_tensors(p: str, hidden: int, head_dim: int) -> dict[str, tuple[int, ...]]:
    """One layer's norms and attention projections under ``p`` (``model.layers.{i}.``)."""
    return {
        p + "input_layernorm.weight": (hidden,),
        p + "post_attention_layernorm.weight": (hidden,),
        p + "self_attn.q_proj.weight": (HEADS * head_dim, hidden),
        p + "self_attn.k_proj.weight": (KV_HEADS * head_dim, hidden),
        p + "self_attn.v_proj.weight": (KV_HEADS * head_dim, hidden),
        p + "self_attn.o_proj.weight": (hidden, HEADS * head_dim),
    }


def llama_tensors(num_layers: int) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of an untied Llama with the module's dimensions."""
    shapes = outer_tensors(HIDDEN)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes.update(attention_tensors(p, HIDDEN, HIDDEN // HEADS))
        shapes.update(
            {
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


def write_shards(hf_dir: str, shapes: dict[str, tuple[int, ...]], shards: dict[str, list[str]]) -> tuple[int, int]:
    """Writes each shard file's tensors (random, one generator in order) and the index; returns (bytes, largest
    shard's bytes)."""
    os.makedirs(hf_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [write_random_shard(os.path.join(hf_dir, f), {k: shapes[k] for k in ks}, rng) for f, ks in shards.items()]
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh)
    return sum(sizes), max(sizes)


def write_config(hf_dir: str, **fields) -> None:
    """config.json: ``fields`` and what both benchmark shapes share (heads, vocabulary, untied, bf16)."""
    common = dict(
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    with open(os.path.join(hf_dir, "config.json"), "w") as fh:
        json.dump({**common, **fields}, fh)


def write_checkpoint(hf_dir: str, size_bytes: float) -> int:
    """Llama-shaped random bf16 checkpoint of about ``size_bytes`` in two shards + index; returns bytes."""
    per_layer = sum(2 * int(np.prod(s)) for s in llama_tensors(1).values()) - 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    num_layers = max(2, round((size_bytes - 2 * (2 * VOCAB * HIDDEN + HIDDEN)) / per_layer))
    shapes = llama_tensors(num_layers)
    names = list(shapes)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    total, _ = write_shards(hf_dir, shapes, shards)
    write_config(
        hf_dir,
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=num_layers,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
    )
    return total


# A Qwen3-MoE-like shape: Qwen3-30B-A3B's expert width, fewer and narrower experts and layers.
MOE_HIDDEN, MOE_WIDTH, MOE_EXPERTS, MOE_HEAD_DIM = 1024, 768, 64, 128


def moe_tensors(num_layers: int) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes of an untied Qwen3-MoE with one tensor per expert (as the hub stores them)."""
    shapes = outer_tensors(MOE_HIDDEN)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes.update(attention_tensors(p, MOE_HIDDEN, MOE_HEAD_DIM))
        shapes[p + "self_attn.q_norm.weight"] = shapes[p + "self_attn.k_norm.weight"] = (MOE_HEAD_DIM,)
        shapes[p + "mlp.gate.weight"] = (MOE_EXPERTS, MOE_HIDDEN)
        for e in range(MOE_EXPERTS):
            q = f"{p}mlp.experts.{e}."
            shapes[q + "gate_proj.weight"] = shapes[q + "up_proj.weight"] = (MOE_WIDTH, MOE_HIDDEN)
            shapes[q + "down_proj.weight"] = (MOE_HIDDEN, MOE_WIDTH)
    return shapes


def write_moe_checkpoint(hf_dir: str, size_bytes: float, shard_bytes: int) -> tuple[int, int, int]:
    """Qwen3-MoE-shaped random bf16 checkpoint of about ``size_bytes`` in shards of at most ``shard_bytes``
    (in tensor order, as save_pretrained shards) + index; returns (bytes, largest shard, largest stack)."""
    outer = 2 * (2 * VOCAB * MOE_HIDDEN + MOE_HIDDEN)
    per_layer = sum(2 * int(np.prod(s)) for s in moe_tensors(1).values()) - outer
    num_layers = max(2, round((size_bytes - outer) / per_layer))
    shapes = moe_tensors(num_layers)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    shards = {f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors": keys for k, keys in enumerate(groups)}
    total, largest = write_shards(hf_dir, shapes, shards)
    write_config(
        hf_dir,
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        hidden_size=MOE_HIDDEN,
        intermediate_size=3 * MOE_HIDDEN,
        moe_intermediate_size=MOE_WIDTH,
        num_experts=MOE_EXPERTS,
        num_experts_per_tok=8,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        num_hidden_layers=num_layers,
        head_dim=MOE_HEAD_DIM,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
    )
    return total, largest, 2 * num_layers * MOE_EXPERTS * MOE_HIDDEN * MOE_WIDTH


def run_moe(work: str) -> None:
    """Converts the MoE checkpoint; prints peak RSS against its largest shard and largest stacked parameter."""
    hf_dir, out_dir = os.path.join(work, "hf_moe"), os.path.join(work, "converted_moe")
    shutil.rmtree(out_dir, ignore_errors=True)
    size, shard, stack = write_moe_checkpoint(hf_dir, SIZE_GB.value * 1e9, SHARD_MB.value * 10**6)
    print(
        f"MoE checkpoint: {size / 1e6:.0f} MB bf16, largest shard {shard / 1e6:.0f} MB, largest stacked "
        f"parameter (an expert stack) {stack / 1e6:.0f} MB, at {hf_dir}"
    )
    seconds = run_converter(hf_dir, out_dir)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1e3
    base = child_baseline(hf_dir)[0] * 1e3
    print(f"convert: {seconds:.1f} s wall = {size / 1e6 / seconds:.0f} MB/s")
    print(
        f"converter peak RSS: {peak / 1e6:.0f} MB = {peak / shard:.2f} x largest shard = {peak / stack:.2f} x "
        f"largest stacked parameter (start-up alone {base / 1e6:.0f} MB; above it {(peak - base) / shard:.2f} x "
        f"largest shard, {(peak - base) / stack:.2f} x largest stacked parameter)"
    )


def run_converter(hf_dir: str, out_dir: str) -> float:
    """Wall seconds of ``python -m psych201_jax.cli.convert`` to bf16 in a child process."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "psych201_jax.cli.convert", f"--hf={hf_dir}", f"--out={out_dir}", "--dtype=bfloat16"],
        cwd=REPO,
        check=True,
    )
    return time.perf_counter() - start


def child_baseline(hf_dir: str) -> tuple[int, float]:
    """(peak RSS in kB, wall seconds) of a child that only starts up like the converter: imports and reads
    the config through AutoConfig (which imports torch when it is installed)."""
    code = (
        "import resource, sys, psych201_jax.cli.convert; from psych201_jax.model import hf_config; "
        "hf_config.from_hf_dir(sys.argv[1]); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
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

    from psych201_jax.model import checkpoint, hf_config

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
    spec = hf_config.from_hf_config(config)
    graphdef, state = checkpoint.abstract_model(spec, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    fn = jax.jit(lambda state, a, b, c: nnx.merge(graphdef, state)(a, b, c))
    start = time.perf_counter()
    fn.lower(state, ids, ids, ids).compile()
    return time.perf_counter() - start


def main(argv):
    del argv
    work = WORKDIR.value or tempfile.mkdtemp(prefix="bench_convert_")
    if MOE.value:
        run_moe(work)
        if not KEEP.value:
            shutil.rmtree(work, ignore_errors=True)
        return
    hf_dir, out_dir = os.path.join(work, "hf"), os.path.join(work, "converted")
    shutil.rmtree(out_dir, ignore_errors=True)
    size = write_checkpoint(hf_dir, SIZE_GB.value * 1e9)
    print(f"checkpoint: {size / 1e6:.0f} MB bf16 in 2 shards at {hf_dir}")

    seconds = run_converter(hf_dir, out_dir)
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
