"""Stage 7: the results directory of one scoring job.

Layout:
  manifest.json                  provenance: model, tokenizer hash, protocol, config, code version, and
                                 the fingerprint of everything that determines the numbers.
  parts/part-PPPPP-NNNNNN.jsonl  one line per participant (scored or rejected), written by process P;
                                 each part is committed atomically (write to a temp file, then rename),
                                 so a killed job leaves only whole parts behind.

A job restarted with the same fingerprint skips the participants already in committed parts; a
different fingerprint is refused unless the caller asks for a fresh run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator

import numpy as np

from psych201_jax.records import Rejected
from psych201_jax.scorer import ParticipantResult

MANIFEST = "manifest.json"
PARTS = "parts"


class ResultsError(RuntimeError):
    """The results directory cannot be used for this job."""


def code_version() -> str:
    """Package version plus the git commit of the checkout when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("psych201_jax")
    except PackageNotFoundError:
        ver = "unknown"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"{ver}+{commit}{'.dirty' if dirty else ''}" if commit else ver


def fingerprint(determinants: dict) -> str:
    return hashlib.sha256(json.dumps(determinants, sort_keys=True).encode()).hexdigest()


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def result_row(item: ParticipantResult | Rejected) -> dict:
    """The JSON line of one participant."""
    if isinstance(item, Rejected):
        return {"study": item.study, "experiment": item.experiment, "participant": item.participant,
                "status": "rejected", "reason": item.reason, "source": item.source, "line": item.line}
    s = item.spans
    return {
        "study": s.study, "experiment": s.experiment, "participant": s.participant, "status": "scored",
        "reason": "; ".join(s.warnings), "source": s.source, "line": s.line,
        "nll": [None if math.isnan(x) else float(x) for x in item.nll],
        "n_tokens": item.n_scored.tolist(), "argmax": item.argmax.tolist(), "target": item.target.tolist(),
        "responses_text": s.responses_text, "responses_scored": s.responses_scored,
        "lost_truncation": s.lost_truncation, "missed": s.missed, "runaway": s.runaway, "merged": s.merged,
        "straddle": s.straddle, "tokens": int(len(s.token_ids)),
    }


class ResultsWriter:
    """Opens (or resumes) a results directory and commits parts atomically."""

    def __init__(self, out_dir: str, manifest: dict, *, fresh: bool = False, process_index: int = 0):
        self.out_dir = out_dir
        self.process_index = process_index
        path = os.path.join(out_dir, MANIFEST)
        if os.path.exists(path):
            old = read_manifest(out_dir)
            if fresh:
                if process_index == 0:
                    shutil.rmtree(os.path.join(out_dir, PARTS), ignore_errors=True)
            elif old.get("fingerprint") != manifest["fingerprint"]:
                changed = sorted(k for k in set(old.get("determinants", {})) | set(manifest["determinants"])
                                 if old.get("determinants", {}).get(k) != manifest["determinants"].get(k))
                raise ResultsError(f"{out_dir} holds results of a different configuration (changed: "
                                   f"{', '.join(changed) or 'unknown'}); pass a new --config.out or "
                                   f"--config.fresh=True to overwrite")
        os.makedirs(os.path.join(out_dir, PARTS), exist_ok=True)
        if process_index == 0:
            _atomic_write(path, json.dumps(manifest, indent=2, sort_keys=True))
        self.done = completed_keys(out_dir)
        mine = glob.glob(os.path.join(out_dir, PARTS, f"part-{process_index:05d}-*.jsonl"))
        self.next_part = 1 + max((int(os.path.basename(p)[11:17]) for p in mine), default=-1)

    def commit(self, items: Iterable[ParticipantResult | Rejected]) -> str | None:
        """Writes one part; returns its path (None when ``items`` is empty)."""
        lines = [json.dumps(result_row(item)) for item in items]
        if not lines:
            return None
        path = os.path.join(self.out_dir, PARTS, f"part-{self.process_index:05d}-{self.next_part:06d}.jsonl")
        _atomic_write(path, "\n".join(lines) + "\n")
        self.next_part += 1
        return path


def read_manifest(out_dir: str) -> dict:
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise ResultsError(f"{path}: unreadable manifest ({err})") from err


def iter_rows(out_dir: str) -> Iterator[dict]:
    """Every committed participant row, part by part (temp files of a killed job are ignored)."""
    for path in sorted(glob.glob(os.path.join(out_dir, PARTS, "part-*.jsonl"))):
        with open(path) as fh:
            for line in fh:
                yield json.loads(line)


def completed_keys(out_dir: str) -> set[tuple[str, str, str]]:
    return {(r["study"], r["experiment"], r["participant"]) for r in iter_rows(out_dir)}


def nll_array(row: dict) -> np.ndarray:
    return np.asarray([np.nan if x is None else x for x in row.get("nll", [])], dtype=np.float64)
