"""Converted checkpoints: HF directory -> orbax parameters + model spec + tokenizer + provenance, and back.

Layout of a converted directory::

    <out>/params/           orbax (v1 layout) PyTree checkpoint, the model's pure state dict
    <out>/model_spec.json   ModelSpec
    <out>/tokenizer/        the HF tokenizer files
    <out>/provenance.json   source path, sha256 and size of every source file, dtype, converter version, time, and
                            what was converted: the text family (model_type), the source config's own
                            model_type and architectures (a vision-language wrapper: its language model)

Conversion writes one parameter per orbax partial save, so the host holds one parameter at a time instead
of the whole model. A stacked parameter too large for that (``hf_weights.StreamedStack``: a mixture of experts'
expert stack is 19 GB) is saved by orbax as a zero-strided placeholder of its shape, stored in chunks of one
layer, and then written one layer at a time through tensorstore into the array orbax just created, so the
host holds about one layer of it and orbax still writes all metadata. Restoring reads straight into target
shardings given by an abstract state of ``jax.ShapeDtypeStruct(..., sharding=...)``, so no host ever
materialises a model that does not fit it.

``source_mismatch`` checks a converted checkpoint against the HF directory it claims to come from (the
conversion cache refuses an entry that fails it). Disk-full and other write failures of a conversion are one
``ConvertError`` naming the output; nothing half-written is kept.
"""

from __future__ import annotations

import datetime
import errno
import functools
import glob
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from absl import logging
from flax import nnx

from psych201_jax import hashing, locks
from psych201_jax.data.tokenizer import TOKENIZER_FILES
from psych201_jax.errors import UserError
from psych201_jax.model import hf_config
from psych201_jax.model import hf_weights as weights
from psych201_jax.model.axes import logical_to_spec
from psych201_jax.model.decoder import Decoder
from psych201_jax.model.spec import ModelSpec

try:  # orbax >= 0.12.9 exposes the v1 API at the top level; 0.12.8 under experimental.
    from orbax.checkpoint import v1 as ocp
except ImportError:
    from orbax.checkpoint.experimental import v1 as ocp

CONVERTER_VERSION = "1.1"  # 1.1: the tokenizer folder keeps config.json (tokenizer class)
PARAMS, SPEC, TOKENIZER, PROVENANCE = "params", "model_spec.json", "tokenizer", "provenance.json"
CHUNK_BYTES = 64 << 20


def save_params(
    params_dir: str,
    items: Iterable[tuple[tuple[str, ...], np.ndarray | weights.StreamedStack]],
    chunk_bytes: int = CHUNK_BYTES,
) -> None:
    """Writes (path, array) items into one orbax PyTree checkpoint, one partial save per item.

    Host arrays are not defensively copied (the items are not modified afterwards) and are stored in chunks
    of at most ``chunk_bytes``, which bounds compression buffers and lets sharded restores read only the
    chunks they need. A ``StreamedStack`` is written one layer at a time (``_save_by_layer``).
    """
    with _save_context(chunk_bytes):
        for path, array in items:
            if isinstance(array, weights.StreamedStack) and layer_writes_work():
                _save_by_layer(params_dir, path, array, chunk_bytes)
            else:
                if isinstance(array, weights.StreamedStack):
                    logging.warning(
                        "%s: this orbax-checkpoint (%s) saves in a layout the layer-by-layer writer does not know; "
                        "writing it whole (peak memory: the whole stacked parameter)",
                        ".".join(path),
                        importlib.metadata.version("orbax-checkpoint"),
                    )
                ocp.partial.save(params_dir, _tree(path, np.asarray(array)))
            del array
        ocp.partial.finalize(params_dir)


@functools.cache
def layer_writes_work() -> bool:
    """Whether ``_save_by_layer`` round-trips with the installed orbax and tensorstore: a small stack saved
    layer by layer, finalized and restored, equals its layers. It relies on how orbax lays out a partial
    save (one OCDBT database per save, zarr3 arrays, chunks of one layer), so a release that changes that
    makes the converter write stacks whole instead of writing a wrong checkpoint."""
    want = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    stack = weights.StreamedStack(want.shape, want.dtype, lambda i: want[i] + 0)
    with tempfile.TemporaryDirectory() as tmp:
        params_dir = os.path.join(tmp, PARAMS)
        try:
            with _save_context(CHUNK_BYTES):
                _save_by_layer(params_dir, ("layers", "probe"), stack, CHUNK_BYTES)
                ocp.partial.finalize(params_dir)
            one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract = {"layers": {"probe": jax.ShapeDtypeStruct(want.shape, want.dtype, sharding=one)}}
            got = restore_params(params_dir, abstract)
            return bool(np.array_equal(np.asarray(got["layers"]["probe"]), want))
        except Exception:  # any failure of the probe: fall back to whole-array saves
            return False


def _save_context(chunk_bytes: int, *, layer_chunks: bool = False) -> ocp.Context:
    """The orbax context of the converter's saves; ``layer_chunks``: no chunk spans two layers (axis 0).
    OCDBT and zarr3 (orbax's defaults) are set explicitly: ``_save_by_layer`` writes into that layout."""
    ctx = ocp.Context()
    ctx.memory.deepcopy_host_arrays = False
    ctx.array.saving.use_ocdbt = True
    ctx.array.saving.use_zarr3 = True
    ctx.array.saving.storage_options.chunk_byte_size = chunk_bytes
    if layer_chunks:
        ctx.array.saving.storage_options.shard_axes = (0,)
    return ctx


def _tree(path: tuple[str, ...], leaf: np.ndarray) -> dict:
    """``{path[0]: {path[1]: ... leaf}}``: one leaf as an orbax PyTree."""
    tree: dict = {path[-1]: leaf}
    for key in reversed(path[:-1]):
        tree = {key: tree}
    return tree


def _save_by_layer(params_dir: str, path: tuple[str, ...], stack: weights.StreamedStack, chunk_bytes: int) -> None:
    """Saves a stacked parameter while holding one layer of it.

    Orbax saves a zero-strided all-zero placeholder of the full shape (no memory; its chunks are zeros,
    compressed to almost nothing) with chunks of one layer, in a partial save of its own and so in an OCDBT
    database of its own; each layer is then written over its chunks through tensorstore. Whole chunks are
    replaced, so nothing is read back, and ``finalize`` merges that database like any other.
    """
    pattern = glob.escape(params_dir.rstrip(os.sep)) + "*/**/ocdbt.process_*"
    before = set(glob.glob(pattern, recursive=True))
    with _save_context(chunk_bytes, layer_chunks=True):
        ocp.partial.save(params_dir, _tree(path, np.broadcast_to(np.zeros((), stack.dtype), stack.shape)))
    new = set(glob.glob(pattern, recursive=True)) - before
    if len(new) != 1:
        raise RuntimeError(f"orbax's partial save of {'.'.join(path)} made {len(new)} OCDBT databases, not one")
    base = {"driver": "ocdbt", "base": "file://" + os.path.abspath(new.pop())}
    keys = [k.decode() for k in ts.KvStore.open(base).result().list().result() if k.endswith(b"/zarr.json")]
    if len(keys) != 1:
        raise RuntimeError(f"orbax's partial save of {'.'.join(path)} holds arrays {keys}, not one")
    array = ts.open(
        {"driver": "zarr3", "kvstore": {**base, "path": keys[0].removesuffix("zarr.json")}}, open=True
    ).result()
    if array.shape != stack.shape or array.dtype.numpy_dtype != stack.dtype:
        raise RuntimeError(f"orbax saved {'.'.join(path)} as {array.dtype} {array.shape}, not {stack.shape}")
    chunk = array.chunk_layout.write_chunk.shape
    if not chunk or chunk[0] != 1:  # per-layer writes would rewrite each chunk once per layer
        raise RuntimeError(f"orbax's chunks of {'.'.join(path)} span layers: {chunk}")
    for i in range(stack.shape[0]):
        array[i].write(stack.layer(i)).result()


def restore_params(params_dir: str, abstract: dict) -> dict:
    """Restores the pure state dict into the shardings/dtypes of ``abstract`` (ShapeDtypeStruct leaves)."""
    return ocp.load(os.path.abspath(params_dir), abstract)  # orbax refuses a relative path


class ConvertError(UserError, RuntimeError):
    """A conversion cannot run: its output folder is taken, locked or left half-written."""


class ConversionLock:
    """An exclusive OS lock (``locks.FileLock`` on ``<out_dir>.lock``) while converting into ``out_dir``.

    ``wait``: block until a running conversion ends (the conversion cache); otherwise refuse at once. A
    crashed conversion never blocks the next. Re-entrant within one thread (the cache holds it around
    ``convert``, which takes it too).
    """

    def __init__(self, out_dir: str, *, wait: bool = False):
        self.out_dir = out_dir
        self._lock = locks.FileLock(os.path.abspath(out_dir).rstrip(os.sep) + ".lock", wait=wait, reentrant=True)

    def __enter__(self) -> ConversionLock:
        try:
            self._lock.__enter__()
        except locks.LockHeld as held:
            raise ConvertError(
                f"another conversion into {self.out_dir} is running ({held.holder}); wait for it"
            ) from None
        except UserError:
            raise
        except OSError as err:  # its folder is read-only, a file, or cannot be created
            raise ConvertError(
                f"cannot create the lock file {self._lock.path} for {self.out_dir}: {_os_error(err)}"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)


def convert(hf_dir: str, out_dir: str, dtype: str = "bfloat16", *, allow_pickle: bool = False) -> ModelSpec:
    """Converts a local HF checkpoint directory into ``out_dir`` (see module docstring); returns its spec.

    Under a ``ConversionLock``, into ``<out_dir>.tmp-<pid>`` renamed into place at the end, so ``out_dir``
    is either absent or complete; a failed conversion removes its temporary copy, and the temporary copies
    of killed conversions are removed by the next one.
    """
    if dtype not in weights.TARGET_DTYPES:
        raise ConvertError(f"dtype must be one of {tuple(weights.TARGET_DTYPES)}, got {dtype!r}")
    out_dir = os.path.abspath(out_dir).rstrip(os.sep)
    with ConversionLock(out_dir):
        if os.path.isdir(out_dir) and os.listdir(out_dir):
            if os.path.isfile(os.path.join(out_dir, PROVENANCE)):
                raise ConvertError(f"{out_dir} already holds a converted checkpoint; convert into a fresh directory")
            raise ConvertError(
                f"{out_dir} holds an incomplete conversion (no {PROVENANCE}); delete it and convert again"
            )
        for stale in glob.glob(glob.escape(out_dir) + ".tmp-*"):  # left by killed conversions (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = f"{out_dir}.tmp-{os.getpid()}"
        try:
            spec = _convert_into(hf_dir, tmp, dtype, allow_pickle)
            if os.path.isdir(out_dir):
                os.rmdir(out_dir)  # empty
            os.replace(tmp, out_dir)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, UserError) or not _is_io_failure(err):
                raise
            raise ConvertError(f"converting {hf_dir} into {out_dir} failed: {_write_failure(err)}") from err
    return spec


def _is_io_failure(err: BaseException) -> bool:
    """An OSError, or tensorstore's report of one (a ValueError naming the failed write)."""
    if isinstance(err, OSError):
        return True
    text = str(err)
    return isinstance(err, ValueError) and any(
        s in text for s in ("RESOURCE_EXHAUSTED", "No space left", "Error writing")
    )


def _os_error(err: OSError) -> str:
    return f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")


def _write_failure(err: BaseException) -> str:
    """One line on a failed conversion read or write; the disk-full case says what to do."""
    text = " ".join(str(err).split())
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        s in text for s in ("No space left", "RESOURCE_EXHAUSTED", "Disk quota")
    ):
        return "the disk is full; nothing was kept, free space and convert again"
    return _os_error(err) if isinstance(err, OSError) else f"{type(err).__name__}: {text[:300]}"


def _convert_into(hf_dir: str, out_dir: str, dtype: str, allow_pickle: bool) -> ModelSpec:
    raw_config = hf_config.read_raw_config(hf_dir)
    spec = hf_config.from_hf_dir(hf_dir)
    reader = weights.open_weights(hf_dir, allow_pickle=allow_pickle)
    params_dir = os.path.join(out_dir, PARAMS)
    os.makedirs(out_dir)
    save_params(params_dir, weights.converted_params(reader, spec, dtype))
    spec.save(os.path.join(out_dir, SPEC))

    tok_dir = os.path.join(out_dir, TOKENIZER)
    os.makedirs(tok_dir, exist_ok=True)
    # config.json too: transformers 5 picks the tokenizer class by the config's model_type, and some classes
    # rebuild the pipeline in code (Qwen3_5Tokenizer: NFC and its own pre-tokenizer regex, not tokenizer.json's),
    # so without it the converted tokenizer would split text differently from the checkpoint's own.
    for name in (*TOKENIZER_FILES, "config.json"):
        if os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copy2(os.path.join(hf_dir, name), tok_dir)

    source_files = _source_files(hf_dir)
    # Every file read is inside hf_dir (the readers refuse index entries pointing elsewhere), so hashing the
    # folder's files covers the weights actually used.
    provenance = {
        "source": os.path.abspath(hf_dir),
        "sha256": {f: hashing.hash_file(os.path.join(hf_dir, f)) for f in source_files},
        "bytes": {f: os.path.getsize(os.path.join(hf_dir, f)) for f in source_files},
        "dtype": dtype,
        "converter_version": CONVERTER_VERSION,
        "model_type": spec.model_type,
        "source_model_type": raw_config.get("model_type"),
        "architectures": raw_config.get("architectures"),
        "wrapper": spec.wrapper or None,  # a vision-language checkpoint: only its language model was converted
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    with open(os.path.join(out_dir, PROVENANCE), "w") as fh:
        json.dump(provenance, fh, indent=2)
    return spec


def _source_files(hf_dir: str) -> list[str]:
    """The files of an HF directory that its provenance records (every regular file at its top level)."""
    return sorted(f for f in os.listdir(hf_dir) if os.path.isfile(os.path.join(hf_dir, f)))


# Source files matched by name and size only when a converted checkpoint is checked against its source: hashing
# a model's weights again would cost every job a full read of them. Every other file is hashed.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


def source_mismatch(converted_dir: str, hf_dir: str, dtype: str) -> str:
    """Why ``converted_dir`` was not converted from ``hf_dir`` to ``dtype``, or "" where it matches.

    Checked: the recorded dtype; the recorded source files against the HF directory's (names; sizes where
    recorded; the sha256 of every file but the weights, ``WEIGHT_SUFFIXES``); the copied tokenizer files
    against the recorded hashes; the model spec against the one the HF config gives. Not checked: the
    converted parameters themselves (that would cost a full read of the weights) -- an entry forged with
    matching provenance, spec and tokenizer passes, which is why the cache folder is private (0700).
    """
    try:
        with open(os.path.join(converted_dir, PROVENANCE)) as fh:
            provenance = json.load(fh)
        recorded = provenance["sha256"]
        if not isinstance(recorded, dict):
            raise TypeError("its sha256 is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {PROVENANCE} is unreadable ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
    if provenance.get("dtype") != dtype:
        return f"it holds {provenance.get('dtype')!r} parameters, not {dtype!r}"
    files = _source_files(hf_dir)
    if sorted(recorded) != files:
        differ = sorted(set(recorded) ^ set(files))
        return f"it was made from other files (differing: {differ[:5]}{' ...' if len(differ) > 5 else ''})"
    sizes = provenance.get("bytes")
    for name in files:
        path = os.path.join(hf_dir, name)
        if isinstance(sizes, dict) and sizes.get(name) != os.path.getsize(path):
            return f"it was made from a {name} of another size"
        if not name.endswith(WEIGHT_SUFFIXES) and hashing.hash_file(path) != recorded[name]:
            return f"it was made from another {name} (sha256 differs)"
    tok_dir = os.path.join(converted_dir, TOKENIZER)
    for name in sorted(os.listdir(tok_dir)) if os.path.isdir(tok_dir) else []:
        if recorded.get(name) != hashing.hash_file(os.path.join(tok_dir, name)):
            return f"its tokenizer file {name} is not the source's"
    try:
        spec = ModelSpec.load(os.path.join(converted_dir, SPEC))
    except (OSError, ValueError, TypeError, KeyError) as err:
        return f"its {SPEC} is unreadable ({type(err).__name__})"
    if spec != hf_config.from_hf_dir(hf_dir):
        return f"its {SPEC} is not what the source's config.json gives"
    return ""


def abstract_model(
    spec: ModelSpec,
    *,
    dtype,
    param_dtype,
    mesh: jax.sharding.Mesh | None = None,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] | None = None,
    attention_backend: str = "auto",
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of ShapeDtypeStruct-with-sharding variables) of a Decoder, without allocating it.

    With a mesh, each parameter's logical axes are mapped through ``rules``; without one, every parameter
    goes to the first local device.
    """
    model = nnx.eval_shape(
        lambda: Decoder(
            spec, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0), attention_backend=attention_backend
        )
    )
    graphdef, state = nnx.split(model)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(var):
        sharding = (
            device
            if mesh is None
            else jax.NamedSharding(mesh, logical_to_spec(var.get_metadata()["out_sharding"], rules or ()))
        )
        return var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding))

    return graphdef, jax.tree.map(leaf, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def load_model(
    converted_dir: str,
    *,
    dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    rules: Sequence[tuple[str, str | tuple[str, ...] | None]] | None = None,
    attention_backend: str = "auto",
) -> tuple[Decoder, ModelSpec]:
    """Restores a converted checkpoint as (Decoder, spec).

    ``dtype``: parameter and activation dtype (default: the dtype it was converted to); parameters are cast
    on restore. ``mesh``/``rules``: target shardings (default: one device).
    """
    spec = ModelSpec.load(os.path.join(converted_dir, SPEC))
    if dtype is None:
        with open(os.path.join(converted_dir, PROVENANCE)) as fh:
            dtype = json.load(fh)["dtype"]
    dtype = jnp.dtype(dtype)
    graphdef, state = abstract_model(
        spec, dtype=dtype, param_dtype=dtype, mesh=mesh, rules=rules, attention_backend=attention_backend
    )
    nnx.replace_by_pure_dict(state, restore_params(os.path.join(converted_dir, PARAMS), nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state), spec
