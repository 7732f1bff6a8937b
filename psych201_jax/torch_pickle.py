"""Reads ``torch.save`` files (``.pth``, legacy pickle ``.bin`` checkpoints) into numpy without torch.

``load(path)`` rebuilds tensors as numpy arrays (dtype, shape, strides and storage offset as saved;
bfloat16 via ``ml_dtypes``), and dicts, ``OrderedDict``s, lists, tuples, numbers, strings, booleans and
None as themselves. Both of torch's formats are read:

  * zip (torch >= 1.6, the default): ``<archive>/data.pkl`` is the pickle, each storage is the raw
    bytes of ``<archive>/data/<key>`` (``<archive>/byteorder`` gives their byte order; little if absent);
  * legacy (``_use_new_zipfile_serialization=False``): four pickles in a row (magic number, protocol
    version, system info, the object), then a pickled list of storage keys and, per key, an int64
    element count followed by the storage's raw little-endian bytes.

The unpickler is restricted: a pickle can only name the globals in ``ALLOWED_GLOBALS`` (torch's tensor
rebuild functions, its storage classes and dtypes, ``collections.OrderedDict``), each mapped to a local
stand-in. Nothing from torch is imported and nothing the file names is ever looked up or called; any
other global, and so any ``__reduce__`` payload, is refused with ``TorchPickleError`` naming the file and
the global. Storage keys, element counts, offsets, sizes and strides are checked against the bytes present.

``save(path, obj)`` writes the zip format ``torch.load`` reads (also with ``weights_only=True``): dicts, lists,
tuples, numbers, strings, None and numpy arrays (as contiguous tensors of their dtype), without torch.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from psych201_jax.errors import UserError

__all__ = ["ALLOWED_GLOBALS", "TorchPickleError", "dumps", "load", "loads", "save"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# torch's storage classes and dtypes -> numpy dtypes
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
}


class TorchPickleError(UserError, ValueError):
    """A torch file that is refused: a global outside the allow-list, a malformed or truncated file."""


class _StorageType:
    """Stand-in for a torch storage class or dtype named by the pickle: only its numpy dtype."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage:
    """One storage: a flat numpy array of its elements (read from the file when first used)."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.array: np.ndarray | None = None


class _Rebuilder:
    """The tensor rebuild functions torch's pickles call, producing numpy arrays; bound to one file."""

    def __init__(self, path: str, fetch: Callable[[_Storage], np.ndarray], *, deferred: bool = False):
        self.path, self.fetch = path, fetch
        # Legacy files store the storages' bytes after the object pickle: tensors are then built as zeros of
        # the checked shape and filled by ``fill_deferred`` once the bytes are read.
        self.pending: list[tuple[np.ndarray, Callable[[], np.ndarray]]] | None = [] if deferred else None

    def fill_deferred(self) -> None:
        for out, build in self.pending or ():
            out[...] = build()

    def tensor(self, storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> np.ndarray:
        """``_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[,
        metadata])`` and ``_rebuild_tensor(storage, storage_offset, size, stride)``."""
        if not isinstance(storage, _Storage):
            raise TorchPickleError(f"{self.path}: a tensor without a storage ({type(storage).__name__})")
        return self._deferred(storage, storage.dtype, offset, size, stride)

    def tensor_v3(self, storage: Any, offset: Any, size: Any, stride: Any, _grad: Any, _hooks: Any, dtype: Any, *_):
        """``_rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
        metadata)``: the dtype is given apart from the storage."""
        if not isinstance(storage, _Storage) or not isinstance(dtype, _StorageType):
            raise TorchPickleError(f"{self.path}: malformed _rebuild_tensor_v3 arguments")
        return self._deferred(storage, dtype.dtype, offset, size, stride)

    def parameter(self, data: Any, *_: Any) -> Any:
        """``_rebuild_parameter(data, requires_grad, backward_hooks)``: the parameter's tensor."""
        if not isinstance(data, np.ndarray):
            raise TorchPickleError(f"{self.path}: a parameter whose data is not a tensor")
        return data

    def _deferred(self, storage: _Storage, dtype: np.dtype, offset: Any, size: Any, stride: Any) -> np.ndarray:
        out = self._view(storage, dtype, offset, size, stride)
        if self.pending is not None:
            self.pending.append((out, lambda: self._view(storage, dtype, offset, size, stride)))
        return out

    def _view(self, storage: _Storage, dtype: np.dtype, offset: Any, size: Any, stride: Any) -> np.ndarray:
        ints = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else None
        if ints is None or not all(type(v) is int for v in ints) or len(size) != len(stride):
            raise TorchPickleError(f"{self.path}: malformed tensor size {size!r} / stride {stride!r}")
        if offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride):
            raise TorchPickleError(f"{self.path}: negative tensor offset, size or stride")
        flat = self.fetch(storage)
        if dtype != storage.dtype:  # v3: the storage's bytes reinterpreted as the given dtype
            if flat.nbytes % dtype.itemsize:
                raise TorchPickleError(f"{self.path}: storage {storage.key} does not hold whole {dtype} elements")
            flat = flat.view(dtype)
        count = int(np.prod(size, dtype=np.int64)) if size else 1
        if count:
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= flat.size:
                raise TorchPickleError(
                    f"{self.path}: a tensor of storage {storage.key} reaches element {last}, past the storage's "
                    f"end ({flat.size} elements)"
                )
            view = np.lib.stride_tricks.as_strided(
                flat[offset:], shape=size, strides=[s * dtype.itemsize for s in stride], writeable=False
            )
            return np.array(view, dtype=dtype, copy=True)
        return np.zeros(size, dtype=dtype)


def _allowed(rebuild: _Rebuilder) -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): rebuild.tensor,
        ("torch._utils", "_rebuild_tensor"): rebuild.tensor,
        ("torch._utils", "_rebuild_tensor_v3"): rebuild.tensor_v3,
        ("torch._utils", "_rebuild_parameter"): rebuild.parameter,
    }
    out.update({("torch", name): _StorageType(name, dt) for name, dt in _STORAGE_DTYPES.items()})
    out.update({("torch", name): _StorageType(name, dt) for name, dt in _TORCH_DTYPES.items()})
    return out


# The globals a pickle may name (module, name), for documentation and tests.
ALLOWED_GLOBALS = frozenset(_allowed(_Rebuilder("", lambda s: np.zeros(0))))


def _load_build(self: Any) -> None:
    """BUILD, for the one use torch's files make of it: a state dict (an ``OrderedDict``) given its
    ``_metadata`` attribute. The state is checked and dropped; BUILD on anything else is refused."""
    state = self.stack.pop()
    inst = self.stack[-1]
    if type(inst) is not collections.OrderedDict or not isinstance(state, dict):
        raise TorchPickleError(f"{self._path}: refused pickle opcode BUILD on a {type(inst).__name__}")


class _Unpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """The pure-Python unpickler (its opcode table can be changed: BUILD) with the allow-listed globals."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
    dispatch[pickle.BUILD[0]] = _load_build

    def __init__(self, fh: BinaryIO, path: str, rebuild: _Rebuilder, storage: Callable[[tuple], _Storage]):
        super().__init__(fh)
        self._path = path
        self._globals = _allowed(rebuild)
        self._storage = storage

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._globals[(module, name)]
        except KeyError:
            raise TorchPickleError(
                f"{self._path}: refused global {module}.{name} (only tensors, dicts, lists, tuples, numbers, "
                f"strings and None are read)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise TorchPickleError(f"{self._path}: refused persistent id {pid!r:.80}")
        return self._storage(pid)


# Opcodes that build objects other than by calling an allowed global (INST / OBJ / NEWOBJ construct classes,
# EXT looks up the copyreg registry; PERSID and buffers are unused by torch): refused before a pickle is run.
# BUILD is allowed only on an OrderedDict (``_load_build``).
_REFUSED_OPCODES = frozenset(
    {"INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "PERSID", "NEXT_BUFFER", "READONLY_BUFFER"}
)


def _unpickle(fh: BinaryIO, path: str, rebuild: _Rebuilder, storage: Callable[[tuple], _Storage]) -> Any:
    """One pickle from ``fh``'s position: its opcodes checked first, then run with the restricted globals."""
    start = fh.tell()
    for op, _arg, _pos in pickletools.genops(fh):
        if op.name in _REFUSED_OPCODES:
            raise TorchPickleError(f"{path}: refused pickle opcode {op.name}")
    fh.seek(start)
    return _Unpickler(fh, path, rebuild, storage).load()


def _storage_of(path: str, pid: tuple, storages: dict[str, _Storage]) -> _Storage:
    """The storage a persistent id ``('storage', type, key, location, numel[, view_metadata])`` names."""
    if len(pid) not in (5, 6) or not isinstance(pid[1], _StorageType):
        raise TorchPickleError(f"{path}: malformed storage id {pid!r:.120}")
    _, kind, key, _location, numel = pid[:5]
    if len(pid) == 6 and pid[5] is not None:
        raise TorchPickleError(f"{path}: storage views (legacy view_metadata) are not supported")
    if not isinstance(key, str) or type(numel) is not int or numel < 0:
        raise TorchPickleError(f"{path}: malformed storage id {pid!r:.120}")
    if key not in storages:
        storages[key] = _Storage(key, kind.dtype, numel)
    elif storages[key].dtype != kind.dtype or storages[key].numel != numel:
        raise TorchPickleError(f"{path}: storage {key} is named with two dtypes or sizes")
    return storages[key]


def _checked(path: str, storage: _Storage, data: bytes, dtype: np.dtype) -> np.ndarray:
    expected = storage.numel * storage.dtype.itemsize
    if len(data) != expected:
        raise TorchPickleError(
            f"{path}: storage {storage.key} holds {len(data)} bytes, its id says {storage.numel} elements "
            f"({expected} bytes)"
        )
    return np.frombuffer(data, dtype=dtype).astype(storage.dtype, copy=True)


def _load_zip(path: str, zf: zipfile.ZipFile) -> Any:
    names = set(zf.namelist())
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise TorchPickleError(f"{path}: a torch zip file holds exactly one <archive>/data.pkl; found {len(pickles)}")
    prefix = pickles[0][: -len("data.pkl")]
    order = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
    if order not in ("little", "big"):
        raise TorchPickleError(f"{path}: unknown byteorder {order!r:.40}")
    storages: dict[str, _Storage] = {}

    def fetch(storage: _Storage) -> np.ndarray:
        if storage.array is None:
            name = f"{prefix}data/{storage.key}"
            if name not in names:
                raise TorchPickleError(f"{path}: storage {storage.key} is missing ({name})")
            size, expected = zf.getinfo(name).file_size, storage.numel * storage.dtype.itemsize
            if size != expected:  # checked before reading (a deflated entry could expand to anything)
                raise TorchPickleError(
                    f"{path}: storage {storage.key} holds {size} bytes, its id says {storage.numel} elements "
                    f"({expected} bytes)"
                )
            dtype = storage.dtype.newbyteorder(">") if order == "big" else storage.dtype
            storage.array = _checked(path, storage, zf.read(name), dtype)
        return storage.array

    data = io.BytesIO(zf.read(pickles[0]))
    return _unpickle(data, path, _Rebuilder(path, fetch), lambda pid: _storage_of(path, pid, storages))


def _load_legacy(path: str, fh: BinaryIO) -> Any:
    storages: dict[str, _Storage] = {}

    file_size = fh.seek(0, io.SEEK_END)
    fh.seek(0)

    def fetch(storage: _Storage) -> np.ndarray:
        # Before the bytes are read: zeros of the id's size, enough to check offsets, sizes and strides.
        if storage.array is not None:
            return storage.array
        if storage.numel * storage.dtype.itemsize > file_size:
            raise TorchPickleError(f"{path}: storage {storage.key} claims {storage.numel} elements, more than the file")
        return np.zeros(storage.numel, dtype=storage.dtype)

    rebuild = _Rebuilder(path, fetch, deferred=True)

    def unpickle() -> Any:
        return _unpickle(fh, path, rebuild, lambda pid: _storage_of(path, pid, storages))

    header = [unpickle() for _ in range(3)]
    if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL or not isinstance(header[2], dict):
        raise TorchPickleError(f"{path}: not a torch file (neither a zip archive nor torch's legacy pickle)")
    if header[2].get("little_endian") is False:
        raise TorchPickleError(f"{path}: a big-endian legacy file is not supported")
    result = unpickle()
    keys = unpickle()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TorchPickleError(f"{path}: malformed storage key list")
    for key in keys:
        if key not in storages:
            raise TorchPickleError(f"{path}: storage {key} is listed but not used")
        storage = storages[key]
        head = fh.read(8)
        if len(head) != 8:
            raise TorchPickleError(f"{path}: truncated before storage {key}")
        (numel,) = struct.unpack("<q", head)
        if numel != storage.numel:
            raise TorchPickleError(f"{path}: storage {key} holds {numel} elements, its id says {storage.numel}")
        storage.array = _checked(path, storage, fh.read(numel * storage.dtype.itemsize), storage.dtype)
    missing = sorted(set(storages) - set(keys))
    if missing:
        raise TorchPickleError(f"{path}: storages {missing[:5]} are used but not stored")
    rebuild.fill_deferred()
    return result


def _load_file(fh: BinaryIO, path: str) -> Any:
    try:
        zipped = fh.read(4) == b"PK\x03\x04"
        fh.seek(0)
        if zipped:
            with zipfile.ZipFile(fh) as zf:  # storages are read one at a time, not the whole file
                return _load_zip(path, zf)
        return _load_legacy(path, fh)
    except TorchPickleError:
        raise
    except (
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        EOFError,
        KeyError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        struct.error,
        UnicodeDecodeError,
    ) as err:
        raise TorchPickleError(f"{path}: unreadable torch file ({type(err).__name__}: {err})") from None


def loads(data: bytes, path: str = "<bytes>") -> Any:
    """``load`` of a file's bytes; ``path`` names it in errors."""
    return _load_file(io.BytesIO(data), path)


def load(path: str | os.PathLike) -> Any:
    """The object ``torch.save`` wrote to ``path``, tensors as numpy arrays (see the module docstring)."""
    path = os.fspath(path)
    with open(path, "rb") as fh:
        return _load_file(fh, path)


# ----------------------------------------------------------------------------------------------- writer

_STORAGE_NAMES = {dt: name for name, dt in _STORAGE_DTYPES.items()}


class _Writer:
    """Protocol-2 pickle opcodes for the object, the tensors' bytes collected as storages "0", "1", ..."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.storages: list[bytes] = []

    def global_(self, module: str, name: str) -> None:
        self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def obj(self, x: Any) -> None:
        w = self.out.write
        if x is None:
            w(b"N")
        elif isinstance(x, bool):
            w(b"\x88" if x else b"\x89")
        elif isinstance(x, int):
            if -(2**31) <= x < 2**31:
                w(b"J" + struct.pack("<i", x))
            else:
                data = pickle.encode_long(x)  # type: ignore[attr-defined]
                w(
                    b"\x8a" + bytes([len(data)]) + data
                    if len(data) < 256
                    else b"\x8b" + struct.pack("<i", len(data)) + data
                )
        elif isinstance(x, float):
            w(b"G" + struct.pack(">d", x))
        elif isinstance(x, str):
            data = x.encode("utf-8", "surrogatepass")
            w(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(x, tuple):
            w(b"(")
            for item in x:
                self.obj(item)
            w(b"t")
        elif isinstance(x, list):
            w(b"](")
            for item in x:
                self.obj(item)
            w(b"e")
        elif isinstance(x, dict):
            w(b"}(")
            for k, v in x.items():
                self.obj(k)
                self.obj(v)
            w(b"u")
        elif isinstance(x, np.ndarray):
            self.tensor(x)
        else:
            raise TypeError(f"cannot write a {type(x).__name__} to a torch file")

    def tensor(self, a: np.ndarray) -> None:
        dtype = a.dtype.newbyteorder("=")
        if dtype not in _STORAGE_NAMES:
            raise TypeError(f"cannot write a {a.dtype} array to a torch file")
        data = np.ascontiguousarray(a, dtype=dtype.newbyteorder("<"))
        key = str(len(self.storages))
        self.storages.append(data.tobytes())
        strides = tuple(int(np.prod(a.shape[i + 1 :], dtype=np.int64)) for i in range(a.ndim))
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out.write(b"((")
        self.obj("storage")
        self.global_("torch", _STORAGE_NAMES[dtype])
        for part in (key, "cpu", int(a.size)):
            self.obj(part)
        self.out.write(b"tQ")  # the persistent id tuple
        for arg in (0, tuple(int(n) for n in a.shape), strides, False):
            self.obj(arg)
        self.global_("collections", "OrderedDict")
        self.out.write(b")Rt")  # backward_hooks = OrderedDict(); the argument tuple
        self.out.write(b"R")


def dumps(obj: Any, archive: str = "archive") -> bytes:
    """The bytes of ``save``: a zip of ``<archive>/data.pkl`` and ``<archive>/data/<key>`` storages."""
    writer = _Writer()
    writer.out.write(b"\x80\x02")
    writer.obj(obj)
    writer.out.write(b".")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{archive}/data.pkl", writer.out.getvalue())
        zf.writestr(f"{archive}/.format_version", "1")
        zf.writestr(f"{archive}/byteorder", "little")
        for key, data in enumerate(writer.storages):
            zf.writestr(f"{archive}/data/{key}", data)
        zf.writestr(f"{archive}/version", "3\n")
    return buf.getvalue()


def save(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` (dicts, lists, tuples, numbers, strings, None, numpy arrays) as ``torch.save`` would."""
    path = os.fspath(path)
    archive = os.path.splitext(os.path.basename(path))[0] or "archive"
    data = dumps(obj, "".join(c if c.isalnum() or c in "_-." else "_" for c in archive))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
