"""Stage 7: the results store of one scoring job.

Layout:
  manifest.json                 provenance: model (spec, source hashes), tokenizer hash, protocol,
                                template, persona, dtype, mesh, code version, config, and the
                                fingerprint of everything that determines the numbers.
  chunks/pPPPPP-cNNNNNN/        one committed chunk of participants from process P:
      participants.jsonl        participant + audit table: one line per input participant (scored or
                                rejected) with its counts and its offsets into the arrays below;
      nll/ n_scored/            zarr arrays (tensorstore) [responses]: summed NLL, scored tokens;
      argmax/ target/           zarr arrays [scored tokens]: the model's top token, the human token;
      response_offsets/ token_offsets/   zarr int64 [participants + 1].
      slots.jsonl               a simulation's chunk: one line per sampled participant (its table row's
                                ``sample_index``): every response slot's human response and samples.
  complete.json                 written when the job finished (totals, timing).
  .lock                         an OS file lock (flock) held by the job writing here, with its pid.

A chunk is written into a hidden temporary directory and renamed into place, so a job killed at any
moment (kill -9 included) leaves only whole chunks; a restart with the same fingerprint skips the
participants those chunks hold. A different fingerprint is refused unless the caller asks for a fresh
run. A failed write (full disk) removes its temporary directory and leaves earlier chunks intact.
A first write interrupted before ``manifest.json`` was in place (full disk, SIGTERM, kill -9) leaves only
``.lock``, an empty ``chunks/`` and ``manifest.json.tmp-<pid>``: such a directory is a fresh start, cleaned
and reused with a log line. Every path is normalised (``paths.normalize``: absolute, no ``..``) where it
enters the store, before tensorstore or a lock sees it.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator

import numpy as np
import tensorstore as ts
from absl import logging

from psych201_jax import hashing, locks, paths
from psych201_jax.conditions import Protocol
from psych201_jax.errors import UserError
from psych201_jax.types import ParticipantResult, ParticipantSamples, Rejected, input_id

MANIFEST = "manifest.json"
CHUNKS = "chunks"
COMPLETE = "complete.json"
SLOTS = "slots.jsonl"
SIMULATE = "simulate"  # a simulation's section of the manifest's determinants


class ResultsError(UserError, RuntimeError):
    """The results directory cannot be used for this job."""


class ResultsInUse(ResultsError):
    """Another job holds the results directory's lock."""


LOCK = ".lock"


class ResultsLock:
    """An exclusive OS lock (``locks.FileLock`` on ``<out_dir>/.lock``) held for a job's life: a second job
    on the same directory is refused up front; a crashed job's lock file never blocks."""

    def __init__(self, out_dir: str, *, fresh: bool = False):
        self.out_dir = out_dir = paths.normalize(out_dir)
        self.fresh = fresh
        self._lock = locks.FileLock(os.path.join(out_dir, LOCK))

    def __enter__(self) -> ResultsLock:
        _refuse_foreign(self.out_dir, self.fresh)
        try:
            self._lock.__enter__()
        except locks.LockHeld as held:
            raise ResultsInUse(
                f"{self.out_dir} is in use by another job ({held.holder}); wait for it to finish or choose "
                f"another --config.out"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)


def _refuse_foreign(out_dir: str, fresh: bool) -> None:
    """A non-empty directory that is not a results directory is never written into (unless fresh); the
    leftovers of an interrupted first write (``_first_write_leftovers``) are not foreign."""
    foreign = os.path.isdir(out_dir) and not os.path.exists(os.path.join(out_dir, MANIFEST))
    if foreign and set(os.listdir(out_dir)) - {LOCK} and not fresh and _first_write_leftovers(out_dir) is None:
        raise ResultsError(
            f"{out_dir} exists, is not empty and is not a results directory; choose another --config.out"
        )


def _first_write_leftovers(out_dir: str) -> list[str] | None:
    """The temporary manifests of a first write that stopped before ``manifest.json`` was in place, when
    ``out_dir`` holds nothing else than them, ``.lock`` and an empty ``chunks/`` (None otherwise)."""
    try:
        names = set(os.listdir(out_dir))
        chunks = os.path.join(out_dir, CHUNKS)
        if CHUNKS in names and (not os.path.isdir(chunks) or os.path.islink(chunks) or os.listdir(chunks)):
            return None
    except OSError:
        return None
    temps = sorted(n for n in names if n.startswith(f"{MANIFEST}.tmp-"))
    if names - {LOCK, CHUNKS} - set(temps) or not all(os.path.isfile(os.path.join(out_dir, n)) for n in temps):
        return None
    return temps


def _clean_first_write(out_dir: str) -> None:
    """Removes what an interrupted first write left (see ``_first_write_leftovers``), with a log line."""
    temps = _first_write_leftovers(out_dir)
    if temps is None or not (temps or CHUNKS in os.listdir(out_dir)):
        return
    logging.warning(
        "%s holds only what an interrupted first write left (%s); starting afresh",
        out_dir,
        ", ".join([f"{CHUNKS}/ (empty)"] * os.path.isdir(os.path.join(out_dir, CHUNKS)) + temps),
    )
    for name in temps:
        _remove(os.path.join(out_dir, name))


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """How far a results directory got: complete (complete.json written), participants committed, and
    the input participants the job set out to score (None when unknown: a streamed dataset)."""

    complete: bool
    n_done: int
    n_input: int | None

    def describe(self) -> str:
        total = "?" if self.n_input is None else str(self.n_input)
        return "complete" if self.complete else f"incomplete: {self.n_done} of {total} participants committed"


def code_version() -> str:
    """Package version plus the git commit of the checkout when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("psych201_jax")
    except PackageNotFoundError:
        ver = "unknown"
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"{ver}+{commit}{'.dirty' if dirty else ''}" if commit else ver


def fingerprint(determinants: dict) -> str:
    return hashing.hash_json(determinants)


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_array(path: str, values: np.ndarray, dtype) -> None:
    store = ts.open(
        {"driver": "zarr", "kvstore": {"driver": "file", "path": path}},
        create=True,
        dtype=dtype,
        shape=list(values.shape),
        chunk_layout=ts.ChunkLayout(chunk_shape=[max(1, n) for n in values.shape]),
    ).result()
    if values.size:
        store.write(values).result()


def _read_array(path: str) -> np.ndarray:
    return ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": path}}).result().read().result()


RESPONSE_FIELDS = ("nll", "n_scored")  # one value per response: summed NLL, scored tokens
# Per response too, stored when every scored row of a chunk has them: NLL per temperature [R, nT] (2-D
# array), summed entropy and option mass (calibration statistics of the head).
CALIBRATION_FIELDS = ("nll_t", "entropy", "option_mass")
TOKEN_FIELDS = ("argmax", "target", "option_argmax")  # one value per scored token (option_argmax optional)
PER_RESPONSE = RESPONSE_FIELDS + CALIBRATION_FIELDS
ALL_ARRAYS = PER_RESPONSE + TOKEN_FIELDS + ("response_offsets", "token_offsets")
REQUIRED_ARRAYS = ("nll", "n_scored", "response_offsets", "token_offsets")  # written for every chunk
_DTYPES = {"nll": ts.float64, "n_scored": ts.int32, "argmax": ts.int32, "target": ts.int32, "option_argmax": ts.int32}
_DTYPES.update({name: ts.float64 for name in CALIBRATION_FIELDS})


SAMPLED = "sampled"  # the status of a simulated participant


def slot_dict(slot) -> dict:
    """The stored (and exported) form of one ``SlotDraws``: plain lists, slots in text order."""
    return {
        "response": slot.response,
        "human": slot.human,
        "human_tokens": np.asarray(slot.human_tokens).tolist(),
        "temperature": slot.temperature,
        "samples": [
            {
                "tokens": np.asarray(g.tokens).tolist(),
                "text": g.text,
                "logprob": g.logprob,
                "stopped": g.stopped,
                "stop": g.stop,
            }
            for g in slot.samples
        ],
    }


def row_of(item: ParticipantResult | ParticipantSamples | Rejected) -> dict:
    """The stored form of one participant: table fields plus per-response / per-token arrays (scored) or
    its slots (sampled)."""
    if isinstance(item, Rejected):
        return {
            "study": item.study,
            "experiment": item.experiment,
            "participant": item.participant,
            "status": "rejected",
            "reason": item.reason,
            "source": item.source,
            "line": item.line,
        }
    s = item.spans
    row = {
        "study": s.study,
        "experiment": s.experiment,
        "participant": s.participant,
        "status": SAMPLED if isinstance(item, ParticipantSamples) else "scored",
        "reason": "; ".join(s.warnings),
        "source": s.source,
        "line": s.line,
    }
    row.update(s.counters())
    if isinstance(item, ParticipantSamples):
        return row | {"tokens": int(len(s.token_ids)), "slots": [slot_dict(slot) for slot in item.slots]}
    row.update(
        tokens=int(len(s.token_ids)), nll=item.nll, n_scored=item.n_scored, argmax=item.argmax, target=item.target
    )
    if item.option_argmax is not None:
        row["option_argmax"] = item.option_argmax
    for name in CALIBRATION_FIELDS:
        if getattr(item, name) is not None:
            row[name] = getattr(item, name)
    return row


class ResultsWriter:
    """Opens (or resumes) a results directory and commits chunks atomically."""

    def __init__(self, out_dir: str, manifest: dict, *, fresh: bool = False, process_index: int = 0):
        self.out_dir = out_dir = paths.normalize(out_dir)
        self.process_index = process_index
        chunks = os.path.join(out_dir, CHUNKS)
        if os.path.exists(os.path.join(out_dir, MANIFEST)):
            old = read_manifest(out_dir)
            if fresh:
                if process_index == 0:
                    shutil.rmtree(chunks, ignore_errors=True)
                    _remove(os.path.join(out_dir, COMPLETE))
            elif old.get("fingerprint") != manifest["fingerprint"]:
                before, now = old.get("determinants", {}), manifest["determinants"]
                changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
                if "data_sources" in changed:
                    a, b = before.get("data_sources") or {}, now["data_sources"]
                    files = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
                    changed[changed.index("data_sources")] = f"data_sources ({', '.join(files)})"
                raise ResultsError(
                    f"{out_dir} holds results of a different configuration (changed: "
                    f"{', '.join(changed) or 'unknown'}); pass a new --config.out or "
                    f"--config.fresh=True to rescore"
                )
        else:
            _refuse_foreign(out_dir, fresh)
            if process_index == 0 and os.path.isdir(out_dir):
                _clean_first_write(out_dir)
        try:
            os.makedirs(chunks, exist_ok=True)
            if process_index == 0:
                _atomic_write(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))
        except OSError as err:
            raise ResultsError(f"cannot write the results directory {out_dir}: {err}") from err
        for stale in glob.glob(os.path.join(chunks, f".tmp-p{process_index:05d}-*")):
            shutil.rmtree(stale, ignore_errors=True)
        self.done = completed_inputs(out_dir)  # (source, line) of every committed input line
        mine = glob.glob(os.path.join(chunks, f"p{process_index:05d}-c*"))
        self.next_chunk = 1 + max((int(os.path.basename(p)[8:]) for p in mine), default=-1)

    def commit(self, items: Iterable[ParticipantResult | ParticipantSamples | Rejected]) -> str | None:
        """Writes one chunk atomically; returns its path (None when ``items`` is empty)."""
        items = list(items)
        if not items:
            return None
        name = f"p{self.process_index:05d}-c{self.next_chunk:06d}"
        final = os.path.join(self.out_dir, CHUNKS, name)
        tmp = os.path.join(self.out_dir, CHUNKS, f".tmp-{name}-{os.getpid()}")
        try:
            _write_chunk(tmp, [row_of(item) for item in items])
            os.rename(tmp, final)
        except (OSError, ValueError, RuntimeError) as err:  # tensorstore reports I/O errors as ValueError
            shutil.rmtree(tmp, ignore_errors=True)
            first = " ".join(str(err).split())[:160]
            full = getattr(err, "errno", None) == errno.ENOSPC or any(
                s in str(err) for s in ("No space left", "RESOURCE_EXHAUSTED", "Disk quota")
            )
            what = "the disk is full" if full else f"the write failed ({type(err).__name__}: {first})"
            raise ResultsError(
                f"could not commit results chunk {name} in {self.out_dir}: {what}; the {len(self.done)} "
                f"participants committed before are kept; free space and rerun the same command to resume"
            ) from err
        self.done.update(input_id(item) for item in items)
        self.next_chunk += 1
        return final


def _write_chunk(path: str, rows: list[dict]) -> None:
    """Arrays first, then the participant table (fsynced); the caller renames ``path`` into place.

    Scored rows (those with ``nll``) get an ``index`` into the offsets arrays; per-token fields other
    than argmax/target are stored only when every scored row has them.
    """
    os.makedirs(path)
    scored = [r for r in rows if "nll" in r]
    optional = [f for f in CALIBRATION_FIELDS + TOKEN_FIELDS if scored and all(f in r for r in scored)]
    arrays = {}
    for field in RESPONSE_FIELDS + tuple(optional):
        parts = [np.asarray(r[field], dtype=_DTYPES[field].numpy_dtype) for r in scored]
        arrays[field] = np.concatenate(parts) if parts else np.zeros(0, _DTYPES[field].numpy_dtype)
    arrays["response_offsets"] = np.cumsum([0] + [len(r["nll"]) for r in scored], dtype=np.int64)
    arrays["token_offsets"] = np.cumsum([0] + [len(r.get("argmax", ())) for r in scored], dtype=np.int64)
    for name, values in arrays.items():
        _write_array(os.path.join(path, name), values, ts.dtype(values.dtype.name))
    lines: list[str] = []
    sampled: list[str] = []
    k = 0
    for row in rows:
        table = {key: value for key, value in row.items() if key not in PER_RESPONSE + TOKEN_FIELDS + ("slots",)}
        if "nll" in row:
            table["index"] = k  # position in the offsets arrays
            k += 1
        if "slots" in row:
            table["sample_index"] = len(sampled)  # line in slots.jsonl
            sampled.append(json.dumps({"slots": row["slots"]}))
        lines.append(json.dumps(table))
    if sampled:
        _write_lines(os.path.join(path, SLOTS), sampled)
    _write_lines(os.path.join(path, "participants.jsonl"), lines)


def _write_lines(path: str, lines: list[str]) -> None:
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def read_manifest(out_dir: str) -> dict:
    out_dir = paths.normalize(out_dir)
    path = os.path.join(out_dir, MANIFEST)
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise ResultsError(f"{path}: unreadable manifest ({err}); is {out_dir} a results directory?") from err


def chunk_dirs(out_dir: str) -> list[str]:
    """Committed chunks in (process, chunk) order; temporary directories of a killed job are ignored."""
    return sorted(glob.glob(os.path.join(glob.escape(paths.normalize(out_dir)), CHUNKS, "p*-c*")))


def iter_rows(out_dir: str) -> Iterator[dict]:
    """Every committed participant as a dict: the table row plus, for scored participants, ``nll``
    (None for a response with no scored token), ``n_scored``, ``argmax``, ``target`` (and
    ``option_argmax`` when stored) as lists. A damaged chunk is a ResultsError naming it."""
    for chunk in chunk_dirs(out_dir):
        try:
            rows = list(_chunk_rows(chunk))
        except (OSError, ValueError, KeyError, IndexError) as err:
            raise _corrupt(chunk, err) from None
        yield from rows


def _corrupt(chunk: str, err: Exception) -> ResultsError:
    return ResultsError(
        f"{chunk}: corrupt results chunk ({type(err).__name__}: {' '.join(str(err).split())[:200]}); delete this "
        f"chunk directory and rerun the same command to rescore its participants"
    )


# Arrays that chunks written by earlier versions hold under another name.
_LEGACY_NAMES = {"n_scored": "n_tokens"}


def _array_path(chunk: str, name: str) -> str:
    path = os.path.join(chunk, name)
    legacy = _LEGACY_NAMES.get(name)
    if legacy and not os.path.isdir(path) and os.path.isdir(os.path.join(chunk, legacy)):
        return os.path.join(chunk, legacy)
    return path


def _chunk_rows(chunk: str) -> Iterator[dict]:
    """The rows of one chunk; raises on a truncated table or a missing array."""
    names = [n for n in ALL_ARRAYS if n in REQUIRED_ARRAYS or os.path.isdir(os.path.join(chunk, n))]
    arrays = {name: _read_array(_array_path(chunk, name)) for name in names}
    r_off, t_off = arrays["response_offsets"], arrays["token_offsets"]
    table = _read_table(chunk)
    n_scored = sum("index" in row for row in table)
    if n_scored != len(r_off) - 1:
        raise ValueError(f"the participant table has {n_scored} scored rows, the arrays {len(r_off) - 1}")
    sampled = [json.loads(line)["slots"] for line in _lines(os.path.join(chunk, SLOTS))]
    if sum("sample_index" in row for row in table) != len(sampled):
        raise ValueError(f"the participant table and {SLOTS} disagree on the sampled participants")
    for row in table:
        if (i := row.pop("sample_index", None)) is not None:
            row["slots"] = sampled[i]
        k = row.pop("index", None)
        if k is not None:
            for field in PER_RESPONSE + TOKEN_FIELDS:
                if field in arrays:
                    off = r_off if field in PER_RESPONSE else t_off
                    row[field] = arrays[field][off[k] : off[k + 1]].tolist()
            for field in ("nll", "entropy", "option_mass"):
                if field in row:
                    row[field] = [None if math.isnan(x) else x for x in row[field]]
            if "nll_t" in row:
                row["nll_t"] = [[None if math.isnan(x) else x for x in per_t] for per_t in row["nll_t"]]
        yield row


def _read_table(chunk: str) -> list[dict]:
    with open(os.path.join(chunk, "participants.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _lines(path: str) -> list[str]:
    """The lines of an optional chunk file (none when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return fh.read().splitlines()


def iter_table(out_dir: str) -> Iterator[dict]:
    """The participant/audit table rows of every committed chunk (no arrays read)."""
    for chunk in chunk_dirs(out_dir):
        try:
            table = _read_table(chunk)
        except (OSError, ValueError) as err:
            raise _corrupt(chunk, err) from None
        yield from table


def completed_inputs(out_dir: str) -> set[tuple[str, int]]:
    return {(row["source"], row["line"]) for row in iter_table(out_dir)}


def write_complete(out_dir: str, fingerprint_: str, seconds: float) -> dict:
    """Marks a finished job, with totals over every process's chunks; returns the record."""
    out_dir = paths.normalize(out_dir)
    counts = {"scored": 0, "rejected": 0}
    tokens = 0
    for row in iter_table(out_dir):
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        tokens += row.get("tokens", 0)
    summary = {
        "fingerprint": fingerprint_,
        "participants": sum(counts.values()),
        **counts,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
    }
    _atomic_write(os.path.join(out_dir, COMPLETE), json.dumps(summary, indent=2, sort_keys=True))
    return summary


def read_status(out_dir: str) -> RunStatus:
    """Complete or not, participants committed, and the job's input count (from the manifest)."""
    n_input = read_manifest(out_dir).get("n_input")
    return RunStatus(
        complete=read_complete(out_dir) is not None,
        n_done=sum(1 for _ in iter_table(out_dir)),
        n_input=n_input if isinstance(n_input, int) else None,
    )


def read_complete(out_dir: str) -> dict | None:
    """The completion record of a finished job, or None."""
    try:
        with open(os.path.join(paths.normalize(out_dir), COMPLETE)) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def simulates(manifest: dict) -> bool:
    """Whether a manifest is a simulation's (``determinants.simulate``): its rows hold samples, not scores."""
    return isinstance(manifest.get("determinants", {}).get(SIMULATE), dict)


def is_simulation(out_dir: str) -> bool:
    """Whether a results directory holds sampled responses (``psych201-simulate``), not scores."""
    return simulates(read_manifest(out_dir))


def manifest_protocol(out_dir: str) -> Protocol:
    """The span protocol a results directory was scored under (its manifest's determinants)."""
    value = read_manifest(out_dir).get("determinants", {}).get("protocol", "reference")
    try:
        return Protocol(value)
    except ValueError:
        raise ResultsError(f"{out_dir}/{MANIFEST}: unknown protocol {value!r}") from None


def outcome(row: dict, protocol: Protocol) -> tuple[str, str]:
    """(status, reason) of one stored participant: ``rejected`` (with its reason), ``unscored`` (read and
    tokenized, but not one response has a scored token) or ``scored``; the reason counts every response
    lost (to the reference's character cut or the robust token budget) and every labelling problem."""
    if row["status"] != "scored":
        return row["status"], row.get("reason", "")
    lost = row.get("lost_truncation", 0)
    cut = "the 32,768-character cut" if protocol == Protocol.REFERENCE else "the token budget"
    reasons = [f"{lost} response(s) lost to {cut}"] if lost else []
    reasons += [r for r in row.get("reason", "").split("; ") if r]
    if not any(x is not None for x in row.get("nll", [])):
        return "unscored", "; ".join(reasons or ["no response has a scorable token"])
    return "scored", "; ".join(reasons)


def nll_array(row: dict) -> np.ndarray:
    return np.asarray([np.nan if x is None else x for x in row.get("nll", [])], dtype=np.float64)
