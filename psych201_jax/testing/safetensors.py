"""A minimal safetensors writer for tests (the converter only reads them: model/hf_weights.py)."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping

import numpy as np

from psych201_jax.model.hf_weights import SAFETENSORS_DTYPES


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes ``tensors`` (numpy, bf16 via ml_dtypes allowed) as one safetensors file, tensor by tensor."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, x in tensors.items():
        header[name] = {"dtype": names[x.dtype], "shape": list(x.shape), "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        for x in tensors.values():
            fh.write(np.ascontiguousarray(x).tobytes())
