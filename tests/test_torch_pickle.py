"""psych201_jax.torch_pickle: torch.save files read into numpy without torch, hostile pickles refused."""

import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from psych201_jax import torch_pickle

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.quick


def _np(t) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def _assert_same(ours, theirs, where="obj"):
    if isinstance(theirs, torch.Tensor):
        expected = _np(theirs)
        assert isinstance(ours, np.ndarray), where
        assert ours.dtype == expected.dtype and ours.shape == expected.shape, where
        assert np.array_equal(ours, expected, equal_nan=True), where
    elif isinstance(theirs, dict):
        assert type(ours) is type(theirs) and list(ours) == list(theirs), where
        for k in theirs:
            _assert_same(ours[k], theirs[k], f"{where}[{k!r}]")
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _assert_same(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs and type(ours) is type(theirs), where


def _tensors():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    shared = torch.linspace(-3, 3, 10, dtype=torch.float64)
    return {
        "float32": torch.randn(3, 5),
        "bfloat16": torch.randn(7).to(torch.bfloat16),
        "float16": torch.randn(2, 2).half(),
        "int64": torch.arange(-5, 5),
        "int32": torch.tensor([1, -2, 3], dtype=torch.int32),
        "bool": torch.tensor([True, False]),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8),
        "transposed": base.t(),  # non-contiguous view
        "strided": base[1:, ::2],  # offset and strides
        "shared_a": shared[2:5],  # two views of one storage
        "shared_b": shared[::3],
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "nan": torch.tensor([float("nan"), float("inf")]),
    }


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_round_trip_of_tensors_and_containers(tmp_path, zipped):
    from collections import OrderedDict

    obj = {
        **_tensors(),
        "nested": {"list": [1, 2.5, None, "text", True], "tuple": (torch.ones(2), -(2**40))},
        "ordered": OrderedDict([("b", torch.arange(3)), ("a", 1)]),
        7: "int key",
    }
    path = tmp_path / "x.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    _assert_same(torch_pickle.load(path), obj)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_the_study_eval_files(tmp_path, zipped):
    """eval.py: {participant_reindexed (str): torch.stack of bf16 0-d sums}, an empty float tensor for a participant
    without a span; eval_accuracy.py: {key: float32 0/1 per token}; a state dict of parameters (legacy .bin)."""
    nll = {
        "0": torch.stack([torch.tensor(1.25, dtype=torch.bfloat16), torch.tensor(0.5, dtype=torch.bfloat16)]),
        "1": torch.empty(0, device="cpu"),
        "2": torch.stack([torch.tensor(3.0)]).detach().cpu(),
    }
    logits, labels = torch.randn(6, 11), torch.tensor([-100, 3, 4, -100, 5, 1])
    mask = labels != -100
    acc = {"0": (logits.argmax(dim=-1)[mask] == labels[mask]).float().cpu()}
    state = torch.nn.Linear(3, 2).state_dict()
    params = {"w": torch.nn.Parameter(torch.randn(2, 2))}
    for i, obj in enumerate((nll, acc, state, params)):
        path = tmp_path / f"{i}.pth"
        torch.save(obj, path, _use_new_zipfile_serialization=zipped)
        ours = torch_pickle.load(path)
        _assert_same(ours, type(obj)((k, v.detach()) for k, v in obj.items()))


def test_save_is_read_by_torch(tmp_path):
    obj = {
        "0": np.array([1.5, np.nan], np.float64),
        "1": np.zeros(0, np.float32),
        "b": np.array([1, 2], ml_dtypes.bfloat16),
        "t": np.arange(6).reshape(2, 3).T,  # written contiguous
        "l": [1, 2**40, None, "é", (1, 2.5), True],
    }
    path = tmp_path / "w.pth"
    torch_pickle.save(path, obj)
    for weights_only in (True, False):
        loaded = torch.load(path, weights_only=weights_only)
        for k in ("0", "1", "b", "t"):
            assert np.array_equal(_np(loaded[k]), obj[k], equal_nan=True)
            assert _np(loaded[k]).dtype == obj[k].dtype
        assert loaded["l"] == obj["l"]
    back = torch_pickle.load(path)
    assert all(np.array_equal(back[k], obj[k], equal_nan=True) for k in ("0", "1", "b", "t"))


# ------------------------------------------------------------------------------------------- hostile


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _zip_with(data_pkl: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")
    return buf.getvalue()


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_reduce_payload_runs_nothing(tmp_path, zipped):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"x": torch.ones(2), "evil": _Payload(marker)}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(torch_pickle.TorchPickleError, match=r"evil\.pth.*refused global posix\.system"):
        torch_pickle.load(path)
    assert not marker.exists()


def test_plain_pickle_payload_and_other_globals_refused(tmp_path):
    marker = tmp_path / "pwned"
    for obj, name in (
        (_Payload(marker), "posix.system"),
        ({"a": np.ones(2)}, "numpy"),  # numpy's own reconstructors are not on the list either
        ({"s": {1, 2}}, "__builtin__.set"),
    ):
        data = _zip_with(pickle.dumps(obj, protocol=2))
        with pytest.raises(torch_pickle.TorchPickleError, match=f"bad.pth: refused global {name}"):
            torch_pickle.loads(data, "bad.pth")
        with pytest.raises(torch_pickle.TorchPickleError, match="refused global"):  # the same as a legacy stream
            torch_pickle.loads(pickle.dumps(obj, protocol=2), "bad.pth")
    assert not marker.exists()


def test_build_only_on_a_state_dict(tmp_path):
    """BUILD sets state on an object (an ndarray's __setstate__, a class's attributes): allowed only as torch uses
    it, a state dict's _metadata, and the state is dropped."""
    ok = torch_pickle.loads(_zip_with(b"\x80\x02ccollections\nOrderedDict\n)R}b."), "b.pth")
    assert ok == {}
    with pytest.raises(torch_pickle.TorchPickleError, match="refused pickle opcode BUILD on a list"):
        torch_pickle.loads(_zip_with(b"\x80\x02]}b."), "b.pth")
    with pytest.raises(torch_pickle.TorchPickleError, match="refused pickle opcode BUILD"):
        torch_pickle.loads(_zip_with(b"\x80\x02ccollections\nOrderedDict\n}b."), "b.pth")  # on the class
    with pytest.raises(torch_pickle.TorchPickleError, match="refused pickle opcode NEWOBJ"):
        torch_pickle.loads(_zip_with(b"\x80\x02ccollections\nOrderedDict\n)\x81."), "b.pth")


def test_truncated_zip(tmp_path):
    path = tmp_path / "x.pth"
    torch.save({"x": torch.ones(100)}, path)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 30):
        with pytest.raises(torch_pickle.TorchPickleError, match="cut.pth"):
            torch_pickle.loads(data[:cut], "cut.pth")
    legacy = tmp_path / "l.pth"
    torch.save({"x": torch.ones(100)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(torch_pickle.TorchPickleError, match="cut.pth"):
        torch_pickle.loads(legacy.read_bytes()[:-20], "cut.pth")


def _tensor_pickle(offset: int, size: tuple, stride: tuple, numel: int) -> bytes:
    """A hand-written data.pkl: {"x": _rebuild_tensor_v2(storage "0" of ``numel`` floats, offset, size, stride)}."""

    def tup(xs):
        return b"(" + b"".join(b"J" + int(x).to_bytes(4, "little", signed=True) for x in xs) + b"t"

    return (
        b"\x80\x02}(X\x01\x00\x00\x00x"
        b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
        b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ" + numel.to_bytes(4, "little") + b"tQ"
        b"J" + offset.to_bytes(4, "little", signed=True) + tup(size) + tup(stride) + b"\x89"
        b"ccollections\nOrderedDict\n)RtRu."
    )


def test_storage_bounds():
    storage = {"0": np.arange(10, dtype=np.float32).tobytes()}
    ok = torch_pickle.loads(_zip_with(_tensor_pickle(2, (2, 3), (3, 1), 10), storage), "ok.pth")
    assert np.array_equal(ok["x"], np.arange(2, 8, dtype=np.float32).reshape(2, 3))
    for offset, size, stride in (
        (8, (3,), (1,)),  # offset + size past the end
        (10, (1,), (1,)),  # offset at the end
        (0, (2, 3), (8, 1)),  # strides past the end
    ):
        with pytest.raises(torch_pickle.TorchPickleError, match="past the storage's end"):
            torch_pickle.loads(_zip_with(_tensor_pickle(offset, size, stride, 10), storage), "big.pth")
    with pytest.raises(torch_pickle.TorchPickleError, match="negative"):
        torch_pickle.loads(_zip_with(_tensor_pickle(-1, (2,), (1,), 10), storage), "neg.pth")
    # The id claims more elements than the storage's bytes hold.
    with pytest.raises(torch_pickle.TorchPickleError, match="holds 40 bytes"):
        torch_pickle.loads(_zip_with(_tensor_pickle(0, (12,), (1,), 12), storage), "short.pth")
    with pytest.raises(torch_pickle.TorchPickleError, match="missing"):
        torch_pickle.loads(_zip_with(_tensor_pickle(0, (2,), (1,), 10)), "nostorage.pth")


def test_allow_list_is_small():
    modules = {m for m, _ in torch_pickle.ALLOWED_GLOBALS}
    assert modules == {"collections", "torch", "torch._utils"}
    assert ("torch", "load") not in torch_pickle.ALLOWED_GLOBALS
