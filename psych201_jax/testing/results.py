"""Fake results directories for the analysis tests: finished jobs' manifest and one chunk of row dicts,
written in the store's layout without running a model."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from typing import Any

from psych201_jax.analysis import metrics
from psych201_jax.runs import store


def write_rows(out_dir: str, manifest: dict, rows: Iterable[dict], *, chunk: str = "p00000-c000000") -> str:
    """Writes ``manifest`` and one chunk of plain row dicts (as ``store.row_of`` makes them) as a finished
    results directory (complete.json included)."""
    os.makedirs(os.path.join(out_dir, store.CHUNKS), exist_ok=True)
    store._atomic_write(os.path.join(out_dir, store.MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))
    final = os.path.join(out_dir, store.CHUNKS, chunk)
    tmp = os.path.join(out_dir, store.CHUNKS, f".tmp-{chunk}-{os.getpid()}")
    store._write_chunk(tmp, list(rows))
    os.rename(tmp, final)
    store.write_complete(out_dir, manifest.get("fingerprint", ""), 0.0)
    return out_dir


def write_results(
    path: str,
    hf_id: str,
    rows: Iterable[tuple],
    *,
    kind: str = "base",
    base_hf_id: str = "",
    family: str = "Fam",
    generation: str = "G1",
    size_b: float = 1.0,
    protocol: str = "reference",
    template: str = "none",
    persona: str = "none",
    persona_subset: bool = False,
    options: str = "none",
    model_sha256: dict | None = None,
) -> str:
    """A results directory as ``psych201_jax.cli.score`` writes it: manifest.json and one committed chunk.

    rows: (study, participant, nll list) or (study, participant, nll list, extra row fields).
    model_sha256: the scored weights' source hashes (file → sha256), written where a job's manifest holds them
    (``determinants.model_sources`` and ``model.provenance.sha256``); None writes neither."""
    config = {
        "model": f"/models/{hf_id}",
        "protocol": protocol,
        "template": template,
        "persona": persona,
        "persona_subset": persona_subset,
        "dtype": "float32",
        "data": "synthetic",
        "options": options,
        "model_info": {
            "hf_id": hf_id,
            "family": family,
            "generation": generation,
            "size_b": size_b,
            "kind": kind,
            "base_hf_id": base_hf_id,
        },
    }
    stored = []
    for study, participant, nll, *extra in rows:
        row: dict[str, Any] = {
            "study": study,
            "experiment": f"{study}/",
            "participant": participant,
            "status": "scored",
            "reason": "",
            "nll": [math.nan if x is None else x for x in nll],
            "argmax": [],
            "target": [],
        }
        row.update(extra[0] if extra else {})
        # Scored tokens per response: one each, the first response taking any extra tokens.
        extra_tokens = max(len(row["argmax"]) - len(nll), 0)
        row.setdefault("n_scored", [1 + extra_tokens] + [1] * (len(nll) - 1) if nll else [])
        stored.append(row)
    stored.append(
        {"study": "s1", "experiment": "s1/", "participant": "rejected-1", "status": "rejected", "reason": "empty"}
    )
    manifest: dict[str, Any] = {"fingerprint": hf_id, "config": config}
    if model_sha256 is not None:
        manifest["determinants"] = {"model_sources": model_sha256}
        manifest["model"] = {"provenance": {"sha256": model_sha256}}
    write_rows(path, manifest, stored)
    return path


def load(path: str) -> metrics.Run:
    """The results directory at ``path`` as a ``metrics.Run``."""
    return metrics.run_from_rows(store.read_manifest(path), store.iter_rows(path), path)


def tokens(argmax: list[int], target: list[int], option: list[int] | None = None) -> dict:
    """A row's per-token fields: argmax, target and (given) option_argmax."""
    extra = {"argmax": argmax, "target": target}
    if option is not None:
        extra["option_argmax"] = option
    return extra
