"""The conversion cache: an HF checkpoint directory is converted once into a converted checkpoint.

An entry is found by a cheap key (the HF directory's name, its files' names, sizes and mtimes, the dtype) and,
before it is used, checked against the HF directory it claims to come from (``checkpoint.source_mismatch``:
dtype, file names and sizes, the hashes of every non-weight file, the tokenizer copy, the model spec). An
entry that fails is refused with one error line naming it, not reconverted: its content is not what its key
says, so something other than this cache wrote it (a shared or tampered ``cache_dir``); deleting it is the
user's call. The cache folder is created 0700.
"""

from __future__ import annotations

import os
import shutil

from absl import logging

from psych201_jax import hashing
from psych201_jax.data.cache_dirs import make_private_dirs
from psych201_jax.errors import UserError
from psych201_jax.model import checkpoint


def _dir_key(hf_dir: str, dtype: str) -> str:
    """Cheap identity of an HF directory (file names, sizes, mtimes) for the conversion cache."""
    listing = [dtype] + [
        f"{name}:{st.st_size}:{int(st.st_mtime)}"
        for name in sorted(os.listdir(hf_dir))
        for st in [os.stat(os.path.join(hf_dir, name))]
    ]
    return hashing.hash_json(listing)[:16]


class ModelNotFoundError(UserError, FileNotFoundError):
    """The model path is neither a converted nor an HF checkpoint directory."""


class ModelCacheError(UserError, RuntimeError):
    """The conversion cache cannot be created, or holds an entry that does not match its source."""


def resolve_model(path: str, cache_dir: str, dtype: str) -> str:
    """A converted checkpoint directory for ``path``: itself, or its conversion in ``cache_dir``.

    Jobs converting the same HF directory share one conversion: the second waits on the conversion lock,
    then uses the result. A failed conversion leaves nothing behind but the lock file.
    """
    if os.path.isfile(os.path.join(path, checkpoint.SPEC)):
        return path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelNotFoundError(
            f"{path!r} is neither a converted checkpoint (model_spec.json) nor an HF checkpoint directory (config.json)"
        )
    try:
        cache_dir = make_private_dirs(cache_dir)
    except OSError as err:
        raise ModelCacheError(
            f"cannot create the conversion cache {err.filename or cache_dir} ({err.strerror or err}); "
            "pass a writable --config.cache_dir"
        ) from None
    target = os.path.join(cache_dir, f"{os.path.basename(os.path.normpath(path))}-{_dir_key(path, dtype)}")
    with checkpoint.ConversionLock(target, wait=True):
        if os.path.isfile(os.path.join(target, checkpoint.PROVENANCE)):
            if why := checkpoint.source_mismatch(target, path, dtype):
                raise ModelCacheError(
                    f"converted cache entry {target} does not match {path}: {why}; it is not used. Delete it to "
                    "convert again, or pass another --config.cache_dir"
                )
            logging.info("using converted cache %s", target)
            return target
        shutil.rmtree(target, ignore_errors=True)  # half-written by an older version: ours to redo
        logging.info("converting %s → %s (%s)", path, target, dtype)
        try:
            checkpoint.convert(path, target, dtype)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
    return target
