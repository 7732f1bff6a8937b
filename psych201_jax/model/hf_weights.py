"""HF checkpoint tensors -> our stacked parameter layout, one tensor at a time.

``SafetensorsReader`` parses safetensors headers itself (8-byte little-endian header length, JSON header,
raw little-endian data) and reads each tensor with a positioned file read into a fresh numpy buffer, so
bf16 works through ``ml_dtypes`` without torch and the page cache, not the process, holds file data.
``converted_params`` yields our parameters one at a time: a stacked [layers, ...] parameter of at most
``STREAM_BYTES`` as one array (per-layer HF tensors copied into it), a larger one as a ``StreamedStack`` that
builds one layer's slice on demand, so the checkpoint writer holds one layer of a mixture of experts' 19 GB
expert stack (or of a 70B model's MLP), not all of it. (Qwen3.5's fused q/k/v projection is read once for
each of the three parameters cut from it.)

Mixture-of-experts checkpoints hold their experts either one module per expert (``mlp.experts.{e}.gate_proj``,
Mixtral's ``block_sparse_moe.experts.{e}.w1``: what hub checkpoints and transformers' save_pretrained write) or
stacked (``mlp.experts.gate_up_proj`` [E, 2F, D] and ``down_proj`` [E, D, F]: transformers 5's module layout);
both fill the same stacked [L, E, ...] parameters, one source tensor at a time (``_expert_layer``).

Vision-language checkpoints keep their language model under a prefix that depends on the transformers
version that saved them (``checkpoint_layout``); their vision tower and projector, and Llama-3.2-Vision's
cross-attention layers, are never requested from the reader, so none of their bytes is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import ml_dtypes
import numpy as np

from psych201_jax import torch_pickle
from psych201_jax.errors import UserError
from psych201_jax.model.moe import EXPERT_PARAMS
from psych201_jax.model.params import param_layers, param_shapes
from psych201_jax.model.spec import HYBRID_FAMILIES, ModelSpec, NormPlacement

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
TARGET_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
# Buffers some older checkpoints store that carry no weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
INDEX = "model.safetensors.index.json"
# Where a vision-language wrapper keeps its language model: the transformers-5 module layout first, then
# the older hub layouts (Qwen2.5-VL: model.*; Llama-3.2-Vision: language_model.model.*). transformers 5
# still saves Qwen2.5-VL and Mllama in the older layouts (it reverts its key renaming on save).
VL_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
VL_LM_HEADS = ("lm_head.weight", "language_model.lm_head.weight")
# Vision towers and projectors of the wrappers, in both layouts: known, never read.
VISION_PREFIXES = (
    "visual.",
    "model.visual.",
    "vision_model.",
    "model.vision_model.",
    "vision_tower.",
    "model.vision_tower.",
    "multi_modal_projector.",
    "model.multi_modal_projector.",
)
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header
# Stacked parameters above this many bytes are yielded as a StreamedStack (built one layer at a time).
STREAM_BYTES = 256 << 20


class WeightsError(UserError, ValueError):
    """The checkpoint's tensors do not match what its config describes, or cannot be read safely."""


def _header_entry(path: str, name: str, meta: object, data_bytes: int) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, checked fully: an object with a known ``dtype``, a
    ``shape`` of non-negative ints and ``data_offsets`` of two ints within the data, whose byte range holds
    exactly shape x dtype size. WeightsError naming the file and tensor otherwise."""

    def bad(what: str) -> WeightsError:
        return WeightsError(f"{path}: tensor {name!r}: {what}; the safetensors header is malformed")

    def is_int(x: object) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not isinstance(meta, dict):
        raise bad(f"its header entry is a {type(meta).__name__}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
    if missing:
        raise bad(f"its header entry lacks {', '.join(missing)}")
    dtype_name, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
        raise WeightsError(f"{path}: tensor {name} has unsupported dtype {dtype_name}")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(x) for x in offsets):
        raise bad(f"data_offsets {offsets!r} is not a pair of integers")
    start, end = offsets
    if not 0 <= start <= end <= data_bytes:
        raise WeightsError(f"{path}: tensor {name} lies outside the file (offsets {start}..{end})")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    if math.prod(shape) * dtype.itemsize != end - start:
        raise bad(
            f"shape {tuple(shape)} of {dtype_name} needs {math.prod(shape) * dtype.itemsize:,} bytes, "
            f"its data_offsets give {end - start:,}"
        )
    return dtype, tuple(shape), start, end


def read_safetensors_header(path: str) -> dict[str, tuple[np.dtype, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, absolute start offset, absolute end offset) of every tensor in one file; the
    header is checked fully (``_header_entry``); every problem is a WeightsError naming the file."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise WeightsError(
                    f"{path}: safetensors header claims {n:,} bytes in a {size:,}-byte file; refusing it"
                )
            raw = fh.read(n)
    except OSError as err:
        raise WeightsError(f"{path}: cannot read it ({err.strerror or err})") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise WeightsError(f"{path}: unreadable safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: safetensors header is not a JSON object")
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, start, end = _header_entry(path, name, meta, size - 8 - n)
        out[name] = (dtype, shape, 8 + n + start, 8 + n + end)
    return out


class SafetensorsReader:
    """All tensors of a checkpoint directory (single file, index + shards, or a set of shards)."""

    def __init__(self, hf_dir: str):
        index = os.path.join(hf_dir, INDEX)
        if os.path.isfile(index):
            try:
                with open(index) as fh:
                    files = sorted(set(json.load(fh)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise WeightsError(f"{index}: unreadable index ({type(err).__name__}: {err})") from None
            root = os.path.realpath(hf_dir)
            for f in files:
                if not isinstance(f, str) or os.path.dirname(os.path.realpath(os.path.join(root, f))) != root:
                    raise WeightsError(f"{index} points outside the model folder ({f!r}); refusing it")
        else:
            files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        if not files:
            raise WeightsError(f"no .safetensors weights in {hf_dir}")
        self.files = [os.path.join(hf_dir, f) for f in files]
        for path in self.files:
            if not os.path.isfile(path):
                raise WeightsError(f"{path}: weights file listed in {INDEX} is missing")
        self._tensors = {}
        for path in self.files:
            for name, (dtype, shape, start, end) in read_safetensors_header(path).items():
                self._tensors[name] = (path, dtype, shape, start, end)

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][2]

    def read(self, name: str) -> np.ndarray:
        """One tensor as a fresh numpy array (read with pread, no mmap)."""
        path, dtype, shape, start, end = self._tensors[name]
        buf = np.empty(end - start, np.uint8)
        # ndarray supports the buffer protocol; numpy's stubs declare __buffer__ only for Python >= 3.12
        view, done = memoryview(buf), 0  # type: ignore[arg-type]
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise WeightsError(f"{path}: cannot read tensor {name} ({err.strerror or err})") from None
        try:
            while done < len(buf):
                n = os.preadv(fd, [view[done:]], start + done)
                if n == 0:
                    raise WeightsError(f"{path}: truncated tensor {name}")
                done += n
        finally:
            os.close(fd)
        return buf.view(dtype).reshape(shape)


class PickleReader:
    """Tensors of ``pytorch_model*.bin`` files through the restricted, torch-free unpickler
    (``psych201_jax.torch_pickle``: tensors, dicts, lists and numbers only); only when allowed."""

    def __init__(self, hf_dir: str):
        self.files = sorted(
            os.path.join(hf_dir, f) for f in os.listdir(hf_dir) if f.startswith("pytorch_model") and f.endswith(".bin")
        )
        self._tensors: dict[str, np.ndarray] = {}
        for path in self.files:
            tensors = torch_pickle.load(path)
            if not isinstance(tensors, dict) or not all(isinstance(v, np.ndarray) for v in tensors.values()):
                raise WeightsError(f"{path}: expected a state dict of tensors, got {type(tensors).__name__}")
            self._tensors.update(tensors)

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def read(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self._tensors[name])


def open_weights(hf_dir: str, *, allow_pickle: bool = False) -> SafetensorsReader | PickleReader:
    """Reader over the checkpoint's weights; pickle ``.bin`` weights only with ``allow_pickle``."""
    files = os.listdir(hf_dir)
    if INDEX in files or any(f.endswith(".safetensors") for f in files):
        return SafetensorsReader(hf_dir)
    if any(f.startswith("pytorch_model") and f.endswith(".bin") for f in files):
        if not allow_pickle:
            raise WeightsError(
                f"{hf_dir} has only pickle (.bin) weights; pass allow_pickle (--allow_pickle) to read them with the "
                "restricted unpickler (tensors, dicts, lists and numbers only; nothing in the file is executed)"
            )
        try:
            return PickleReader(hf_dir)
        except torch_pickle.TorchPickleError as err:  # an object outside the allow-list, or a damaged file
            what = " ".join(str(err).split())
            raise WeightsError(
                f"{hf_dir}: its pickle .bin weights cannot be read safely ({what[:300]}); refusing to load them"
            ) from None
    raise WeightsError(f"no weights (.safetensors or pytorch_model*.bin) in {hf_dir}")


class Source(NamedTuple):
    """Where one stacked parameter comes from in each HF layer.

    ``suffix``: the HF key under ``<prefix>layers.{i}.``. ``n_in``: for linear weights, how many leading
    axes of our per-layer shape are the HF input side (the HF [out, in] weight is transposed, then
    reshaped); None for vectors (norm weights, biases), only reshaped. ``rows``: a [start, stop) slice of
    the HF output rows (Qwen3.5's fused q/k/v projection and conv). ``conv``: an HF Conv1d weight
    [channels, 1, kernel], read as a [channels, kernel] linear weight.
    """

    suffix: str
    n_in: int | None
    rows: tuple[int, int] | None = None
    conv: bool = False


def layer_sources(spec: ModelSpec) -> dict[str, Source]:
    """Our stacked layer param -> its ``Source`` in each HF layer that has it."""
    attn = "self_attn."
    src = {
        "wq": Source(attn + "q_proj.weight", 1),
        "wk": Source(attn + "k_proj.weight", 1),
        "wv": Source(attn + "v_proj.weight", 1),
        "wo": Source(attn + "o_proj.weight", 2),
        "w_gate": Source("mlp.gate_proj.weight", 1),
        "w_up": Source("mlp.up_proj.weight", 1),
        "w_down": Source("mlp.down_proj.weight", 1),
        "bq": Source(attn + "q_proj.bias", None),
        "bk": Source(attn + "k_proj.bias", None),
        "bv": Source(attn + "v_proj.bias", None),
        "bo": Source(attn + "o_proj.bias", None),
        "b_gate": Source("mlp.gate_proj.bias", None),
        "b_up": Source("mlp.up_proj.bias", None),
        "b_down": Source("mlp.down_proj.bias", None),
        "q_norm": Source(attn + "q_norm.weight", None),
        "k_norm": Source(attn + "k_norm.weight", None),
    }
    if spec.norm_placement == NormPlacement.PRE:
        src.update(
            attn_in_norm=Source("input_layernorm.weight", None),
            mlp_in_norm=Source("post_attention_layernorm.weight", None),
        )
    else:  # POST (OLMo) and SANDWICH (Gemma: and the norms before each sublayer)
        src.update(
            attn_out_norm=Source("post_attention_layernorm.weight", None),
            mlp_out_norm=Source("post_feedforward_layernorm.weight", None),
            attn_in_norm=Source("input_layernorm.weight", None),
            mlp_in_norm=Source("pre_feedforward_layernorm.weight", None),
        )
    if spec.linear_num_value_heads:
        lin = "linear_attn."
        kd = spec.linear_num_key_heads * spec.linear_key_head_dim
        vd = spec.linear_num_value_heads * spec.linear_value_head_dim
        # HF's in_proj_qkv (and the depthwise conv over its output) stacks q, k, v channels in that order.
        parts = {"q": (0, kd), "k": (kd, 2 * kd), "v": (2 * kd, 2 * kd + vd)}
        for part, rows in parts.items():
            src[f"lin_w{part}"] = Source(lin + "in_proj_qkv.weight", 1, rows)
            src[f"lin_conv_{part}"] = Source(lin + "conv1d.weight", 1, rows, conv=True)
        src.update(
            lin_wz=Source(lin + "in_proj_z.weight", 1),
            lin_wb=Source(lin + "in_proj_b.weight", 1),
            lin_wa=Source(lin + "in_proj_a.weight", 1),
            lin_dt_bias=Source(lin + "dt_bias", None),
            lin_a_log=Source(lin + "A_log", None),
            lin_norm=Source(lin + "norm.weight", None),
            lin_wo=Source(lin + "out_proj.weight", 2),
        )
    if spec.num_experts:  # w_*: the shared expert (routed layers); d_*: the MLP of dense_mlp_layers
        src.update(
            w_gate=Source("mlp.shared_expert.gate_proj.weight", 1),
            w_up=Source("mlp.shared_expert.up_proj.weight", 1),
            w_down=Source("mlp.shared_expert.down_proj.weight", 1),
            shared_gate=Source("mlp.shared_expert_gate.weight", 1),
            # a mixture of experts' dense layers (dense_mlp_layers): a plain MLP where the routed one would be
            d_gate=Source("mlp.gate_proj.weight", 1),
            d_up=Source("mlp.up_proj.weight", 1),
            d_down=Source("mlp.down_proj.weight", 1),
        )
    shapes = param_shapes(spec)
    return {name: src[name] for name in shapes if name in src}


# Where a routed MLP lives in an HF layer (Mixtral's hub checkpoints: block_sparse_moe; the rest, and
# transformers 5's module layout of Mixtral: mlp), and each expert's projections in the per-expert layout.
MOE_MODULES = ("mlp.", "block_sparse_moe.")
EXPERT_PROJECTIONS = {
    "mlp.": {"e_gate": "gate_proj", "e_up": "up_proj", "e_down": "down_proj"},
    "block_sparse_moe.": {"e_gate": "w1", "e_up": "w3", "e_down": "w2"},
}


def _expert_keys(available: set[str], layer_key: str, name: str, experts: int) -> tuple[list[str], bool]:
    """(source tensor keys, whether they are transformers 5's stacked experts) of one layer's ``router`` or
    expert weights under ``layer_key`` (``<prefix>layers.{i}.``); WeightsError where neither layout is there."""
    found = [m for m in MOE_MODULES if layer_key + m + "gate.weight" in available]
    if len(found) != 1:
        raise WeightsError(f"{layer_key}: expected one router ({' or '.join(m + 'gate.weight' for m in MOE_MODULES)})")
    module = layer_key + found[0]
    if name == "router":
        return [module + "gate.weight"], False
    stacked = module + ("experts.down_proj" if name == "e_down" else "experts.gate_up_proj")
    if stacked in available:
        return [stacked], True
    proj = EXPERT_PROJECTIONS[found[0]][name]
    keys = [f"{module}experts.{e}.{proj}.weight" for e in range(experts)]
    for key in keys:
        if key not in available:
            raise WeightsError(f"tensor {key} missing from the checkpoint (and no stacked {stacked})")
    return keys, False


def _expert_layer(read, keys: list[str], stacked: bool, name: str, out: np.ndarray) -> None:
    """Fills ``out``, one layer's ``router`` [D, E] or expert weights [E, D, F] / [E, F, D], from the source
    tensors ``_expert_keys`` gave, one at a time."""
    shape = out.shape
    if name == "router":
        out[...] = _to_ours(read(keys[0]), shape, Source("", 1), keys[0])
        return
    experts, f = shape[0], shape[1] if name == "e_down" else shape[2]
    if stacked:
        x = read(keys[0])
        want = (experts, shape[2], f) if name == "e_down" else (experts, 2 * f, shape[1])
        if x.shape != want:
            raise WeightsError(f"{keys[0]}: shape {x.shape}, expected {want} from the config")
        if name != "e_down":  # [gate; up] along the output rows (HF chunks it in that order)
            x = x[:, :f] if name == "e_gate" else x[:, f:]
        out[...] = np.swapaxes(x, 1, 2)
        return
    for e, key in enumerate(keys):
        out[e] = _to_ours(read(key), shape[1:], Source("", 1), key)


def _to_ours(x: np.ndarray, shape: tuple[int, ...], source: Source, key: str) -> np.ndarray:
    """HF tensor -> our per-layer shape (a view when possible); checks the HF shape exactly."""
    n_in = source.n_in
    if source.conv:
        if x.ndim != 3 or x.shape[1] != 1:
            raise WeightsError(f"{key}: shape {x.shape}, expected a depthwise conv weight [channels, 1, kernel]")
        x = x.reshape(x.shape[0], x.shape[2])
    if source.rows is not None:
        lo, hi = source.rows
        if x.ndim < 1 or x.shape[0] < hi:
            raise WeightsError(f"{key}: shape {x.shape}, expected at least {hi} rows from the config")
        x = x[lo:hi]
    expected: tuple[int, ...]
    if n_in is None:
        expected = (math.prod(shape),)
    else:
        expected = (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
    if x.shape != expected:
        raise WeightsError(f"{key}: shape {x.shape}, expected {expected} from the config")
    return (x if n_in is None else x.T).reshape(shape)


class Layout(NamedTuple):
    """Tensor names of the language model in one checkpoint."""

    prefix: str  # before embed_tokens / norm / layers.{i}
    lm_head: tuple[str, ...]  # candidate output-projection names (the first present one is used)
    ignored: tuple[str, ...]  # name prefixes of tensors that are known and never read


def checkpoint_layout(names: set[str], spec: ModelSpec) -> Layout:
    """Where ``spec``'s tensors live among the checkpoint's tensor ``names``."""
    # Qwen3.5 checkpoints carry a multi-token-prediction head (mtp.*) that HF skips on load, as do we.
    extra = ("mtp.",) if spec.model_type in HYBRID_FAMILIES else ()
    if not spec.wrapper:
        return Layout("model.", ("lm_head.weight",), extra + (("model.visual.",) if extra else ()))
    found = [p for p in VL_TEXT_PREFIXES if p + "embed_tokens.weight" in names]
    if not found:
        raise WeightsError(
            f"{spec.wrapper} checkpoint has no language-model embedding (looked for "
            f"{', '.join(p + 'embed_tokens.weight' for p in VL_TEXT_PREFIXES)})"
        )
    if len(found) > 1:
        raise WeightsError(f"{spec.wrapper} checkpoint has a language model under several prefixes: {found}")
    prefix = found[0]
    skipped = tuple(f"{prefix}layers.{i}." for i in spec.skipped_layers)
    return Layout(prefix, VL_LM_HEADS, VISION_PREFIXES + skipped + extra)


@dataclass(frozen=True)
class StreamedStack:
    """A stacked parameter [layers, ...] too large to hold at once: ``layer(i)`` reads and converts layer
    i's slice (a fresh array of ``shape[1:]``), so a writer can store it one layer at a time."""

    shape: tuple[int, ...]
    dtype: np.dtype
    layer: Callable[[int], np.ndarray]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole stack in memory (for tests and small consumers; the writer never calls this)."""
        out = np.empty(self.shape, self.dtype)
        for i in range(self.shape[0]):
            out[i] = self.layer(i)
        return out if dtype is None else out.astype(dtype)


Param = np.ndarray | StreamedStack


def converted_params(
    reader, spec: ModelSpec, dtype: str, *, stream_bytes: int | None = STREAM_BYTES
) -> Iterator[tuple[tuple[str, ...], Param]]:
    """Yields (path in the model's state dict, array in ``dtype``) for every parameter, one at a time; a
    stacked parameter of more than ``stream_bytes`` (None: never) as a ``StreamedStack``.

    Raises WeightsError for missing tensors, shape mismatches and unexpected tensors (a sign that the
    config does not describe the weights); a missing tensor of a ``StreamedStack`` before it is yielded, a
    wrong shape when its layer is built. Only the language model's tensors are read.
    """
    target = TARGET_DTYPES[dtype]
    shapes = param_shapes(spec)
    available = reader.names()
    layout = checkpoint_layout(available, spec)
    used = set()

    def read(key):
        if key not in available:
            raise WeightsError(f"tensor {key} missing from the checkpoint")
        used.add(key)
        return reader.read(key)

    def whole(key, name):
        x = read(key)
        if x.shape != shapes[name]:
            raise WeightsError(f"{key}: shape {x.shape}, expected {shapes[name]} from the config")
        return (name,), x.astype(target, copy=False)

    def stacked(name: str, fill: Callable[[int, np.ndarray], None]) -> tuple[tuple[str, ...], Param]:
        shape = shapes[name]
        if stream_bytes is not None and math.prod(shape) * target.itemsize > stream_bytes:

            def layer(i: int) -> np.ndarray:
                out = np.empty(shape[1:], target)
                fill(i, out)
                return out

            return ("layers", name), StreamedStack(shape, target, layer)
        out = np.empty(shape, target)
        for i in range(shape[0]):
            fill(i, out[i])
        return ("layers", name), out

    prefix = layout.prefix
    yield whole(prefix + "embed_tokens.weight", "embed")
    yield whole(prefix + "norm.weight", "final_norm")
    heads = [k for k in layout.lm_head if k in available]
    if not spec.tie_word_embeddings:
        yield whole(heads[0] if heads else layout.lm_head[0], "lm_head")
    else:
        used.update(heads)  # tied: HF ignores a stored copy as well
    hf_layers = spec.hf_layer_indices()
    # Every source key is looked up (and counted as used) before its parameter is yielded, so a StreamedStack
    # fails early on a missing tensor and the check for unexpected tensors does not depend on it being built.
    for name in EXPERT_PARAMS if spec.num_experts else ():
        experts = shapes[name][1]
        sources = [
            _expert_keys(available, f"{prefix}layers.{hf_layers[layer]}.", name, experts)
            for layer in param_layers(spec, name)
        ]
        used.update(k for keys, _ in sources for k in keys)

        def fill_experts(i: int, out: np.ndarray, name=name, sources=sources) -> None:
            keys, stacked_layout = sources[i]
            _expert_layer(read, keys, stacked_layout, name, out)

        yield stacked(name, fill_experts)
    for name, source in layer_sources(spec).items():
        keys = [f"{prefix}layers.{hf_layers[layer]}.{source.suffix}" for layer in param_layers(spec, name)]
        for key in keys:
            if key not in available:
                raise WeightsError(f"tensor {key} missing from the checkpoint")
        used.update(keys)

        def fill(i: int, out: np.ndarray, keys=keys, name=name, source=source) -> None:
            out[...] = _to_ours(read(keys[i]), shapes[name][1:], source, keys[i])

        yield stacked(name, fill)
    unexpected = sorted(
        k for k in available - used if not k.endswith(IGNORED_SUFFIXES) and not k.startswith(layout.ignored)
    )
    if unexpected:
        raise WeightsError(
            f"checkpoint has tensors the {spec.wrapper or spec.model_type} config does not describe: "
            f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
