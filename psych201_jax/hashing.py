"""The one way files and configurations are hashed (model sources, tokenizers, results fingerprints)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

_BLOCK = 1 << 23


def hash_file(path: str) -> str:
    """sha256 hex digest of one file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def hash_files(directory: str, names: Iterable[str]) -> str:
    """sha256 over (name, content digest) of those ``names`` that exist in ``directory``, in the given order."""
    h = hashlib.sha256()
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            h.update(f"{name}:{hash_file(path)}\n".encode())
    return h.hexdigest()


def hash_json(value) -> str:
    """sha256 of a JSON-serialisable value (keys sorted): the fingerprint of a configuration."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def half_of(key: tuple[str, str, str], seed: int) -> int:
    """0 or 1: a participant's cross-fitting half, from a seeded hash of (study, experiment, participant); the
    calibration control fits a temperature on one half and applies it to the other (scoring and sampling)."""
    digest = hashlib.sha256(f"{seed}\x1f{key[0]}\x1f{key[1]}\x1f{key[2]}".encode()).digest()
    return digest[0] & 1
