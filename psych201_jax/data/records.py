"""Stage 1: Psych-201 records, streamed from disk and validated one at a time.

Inputs (any mix, see ``resolve_sources``):
- raw per-study files ``<study>/prompts.jsonl`` or ``prompts.jsonl.zip`` (study = folder name; the
  dataset build's text fixes and metadata casts are applied so records equal the published ones);
- the published HF layout (``marcelbinz/Psych-201-test``: text, study, experiment, participant,
  participant_reindexed, RTs and 25 metadata columns) as parquet or jsonl files;
- an HF dataset name (``hf:marcelbinz/Psych-201-test``), through ``datasets`` when online.

Every input line ends up either as a ``Record`` or as a ``Rejected`` carrying study, participant,
file, line and the reason: nothing is dropped silently. Records are yielded lazily, so a 26M-response
corpus never sits in Python lists.

Participant identity: the raw files reuse participant ids across the experiments of one study
(e.g. ``olschewski2024skewness`` study01…study07), so a participant is (study, experiment,
participant); a repeat of that triple is rejected as a duplicate. In the HF layout the participant is
``participant_reindexed``, as the reference keys its results.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import io
import json
import os
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

from psych201_jax import hashing
from psych201_jax.data import metadata as meta
from psych201_jax.errors import UserError
from psych201_jax.types import Record, Rejected

RAW_NAMES = ("prompts.jsonl", "prompts.jsonl.zip")


@dataclasses.dataclass(frozen=True)
class Source:
    """One input: ``kind`` is raw | hf_jsonl | hf_parquet | hf_dataset."""

    kind: str
    path: str
    study: str | None = None  # raw files only


class DataError(UserError, ValueError):
    """The data argument names nothing readable."""


# ---------------------------------------------------------------------------------------------------
# Source discovery


def resolve_sources(spec: str | Sequence[str]) -> list[Source]:
    """Expands a path, a comma-separated list, a list of paths or ``hf:<name>`` into sources.

    A directory is searched recursively: every ``prompts.jsonl(.zip)`` is a raw study (named after its
    folder), every other ``*.parquet`` / ``*.jsonl`` file is the HF layout. Order is sorted by path so
    runs are deterministic.
    """
    items = [s for s in (spec.split(",") if isinstance(spec, str) else spec) if s]
    if not items:
        raise DataError("no data given: pass a study folder, a folder of studies, files or hf:<dataset>")
    sources: list[Source] = []
    for item in items:
        if item.startswith("hf:"):
            sources.append(Source("hf_dataset", item[3:]))
        elif os.path.isdir(item):
            found = _sources_in_dir(item)
            if not found:
                raise DataError(f"{item}: no prompts.jsonl(.zip), *.parquet or *.jsonl files found")
            sources.extend(found)
        elif os.path.isfile(item):
            sources.append(_source_for_file(item))
        else:
            raise DataError(f"{item}: no such file or directory (for an HF dataset use hf:<owner>/<name>)")
    return sources


def _source_for_file(path: str) -> Source:
    name = os.path.basename(path)
    study = os.path.basename(os.path.dirname(os.path.abspath(path)))
    if name in RAW_NAMES or name.endswith(".zip"):
        return Source("raw", path, study)
    if name.endswith(".parquet"):
        return Source("hf_parquet", path)
    if name.endswith(".jsonl") or name.endswith(".json"):
        return Source("hf_jsonl", path)
    raise DataError(f"{path}: unsupported file type (expected prompts.jsonl(.zip), .parquet or .jsonl)")


def _sources_in_dir(root: str) -> list[Source]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__MACOSX")))
        raw = [n for n in RAW_NAMES if n in filenames]
        if len(raw) > 1:
            both = " and ".join(os.path.join(dirpath, n) for n in raw)
            raise DataError(f"study folder {dirpath} holds both {both}; keep one of them")
        if raw:
            out.append(Source("raw", os.path.join(dirpath, raw[0]), os.path.basename(dirpath)))
            continue
        for name in sorted(filenames):
            if name.endswith((".parquet", ".jsonl")):
                out.append(_source_for_file(os.path.join(dirpath, name)))
    return sorted(out, key=lambda s: s.path)


# ---------------------------------------------------------------------------------------------------
# Reading


@contextlib.contextmanager
def _open_raw_lines(path: str) -> Iterator[tuple[str, Iterator[bytes]]]:
    """(display name, line iterator) of a jsonl file, closed on exit; zips may name their member anything."""
    if not path.endswith(".zip"):
        with open(path, "rb") as fh:
            yield path, _decoded_lines(fh)
        return
    with zipfile.ZipFile(path) as zf:
        members = [
            n
            for n in zf.namelist()
            if not n.startswith("__MACOSX/") and not os.path.basename(n).startswith("._") and not n.endswith("/")
        ]
        jsonl = [n for n in members if n.endswith(".jsonl")] or members
        if len(jsonl) != 1:
            raise DataError(f"{path}: expected one jsonl member, found {jsonl or 'none'}")
        with zf.open(jsonl[0]) as fh:
            # zf.open gives a ZipExtFile (typed IO[bytes]), which BufferedReader accepts at run time
            yield f"{path}!{jsonl[0]}", _decoded_lines(io.BufferedReader(fh))  # type: ignore[arg-type]


def _decoded_lines(fh: io.BufferedReader) -> Iterator[bytes]:
    """UTF-8 lines of a jsonl file: a UTF-16 file (with its BOM) is decoded, a UTF-8 BOM dropped."""
    head = fh.peek(4)[:4]
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        for text in io.TextIOWrapper(fh, encoding="utf-16", newline=""):
            yield text.encode("utf-8", "surrogatepass")
        return
    first = True
    for line in fh:
        if first and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8) :]
        first = False
        yield line


def _parse_lines(lines: Iterable[bytes], max_line_bytes: int | None = None) -> Iterator[tuple[int, Any, str | None]]:
    """(line, parsed object or None, parse error) for each non-blank line; a line longer than
    ``max_line_bytes`` is an error without being parsed."""
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        if max_line_bytes is not None and len(raw) > max_line_bytes:
            yield number, None, f"line of {len(raw):,} bytes exceeds the line limit of {max_line_bytes:,} bytes"
            continue
        try:
            yield number, json.loads(raw), None
        except RecursionError:
            yield number, None, "malformed JSON: nested too deeply"
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, or an integer of > 4,300 digits
            yield number, None, f"malformed JSON: {err}"


def _parquet_rows(path: str) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            number += 1
            yield number, row, None


def _dataset_rows(name: str) -> Iterator[tuple[int, Any, str | None]]:
    hint = (
        f"Offline, download the dataset's parquet files (e.g. `huggingface-cli download {name} "
        f"--repo-type dataset --local-dir DIR`) and pass --data=DIR instead of hf:{name}."
    )
    try:
        import datasets  # optional dependency
    except ImportError as err:
        raise DataError(f"loading hf:{name} needs the `datasets` package (pip install datasets). {hint}") from err
    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as err:  # network, auth or name errors all end here
        raise DataError(f"could not load hf:{name}: {err}. {hint}") from err
    for number, row in enumerate(ds, start=1):
        yield number, row, None


def iter_records(
    spec: str | Sequence[str] | Sequence[Source], *, strict_markers: bool = True, max_line_bytes: int | None = None
) -> Iterator[Record | Rejected]:
    """Streams every participant of every source as a ``Record`` or a ``Rejected``.

    ``strict_markers=False`` keeps the records the reference scripts score despite imperfect markup
    (see ``marker_error``), for parity of the participant set under the reference protocol. A jsonl line
    longer than ``max_line_bytes`` is rejected unparsed. A file that holds no record is reported as one
    rejection (line 0). A read error of a file (a damaged zip stream) is a ``DataError`` naming it.
    """
    sources: Sequence[Source]
    if spec and isinstance(spec[0], Source):
        sources = cast("Sequence[Source]", spec)
    else:
        sources = resolve_sources(cast("str | Sequence[str]", spec))
    seen: dict[tuple[str, str, str], str] = {}
    for source in sources:
        with contextlib.ExitStack() as stack:
            if source.kind in ("raw", "hf_jsonl"):
                display, lines = stack.enter_context(_open_raw_lines(source.path))
                rows: Iterable = _parse_lines(lines, max_line_bytes)
            elif source.kind == "hf_parquet":
                display, rows = source.path, _parquet_rows(source.path)
            elif source.kind == "hf_dataset":
                display, rows = f"hf:{source.path}", _dataset_rows(source.path)
            else:
                raise DataError(f"unknown source kind {source.kind!r}")
            number = 0
            try:
                for number, obj, error in rows:
                    item = _to_record(source, display, number, obj, error, strict_markers)
                    yield _check_duplicate(item, seen, display, number)
            except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as err:
                raise DataError(f"{display}: unreadable after line {number} ({type(err).__name__}: {err})") from None
            if number == 0:
                yield Rejected(
                    study=source.study or "?",
                    experiment="?",
                    participant="?",
                    source=display,
                    line=0,
                    reason="the file holds no records",
                )


def _check_duplicate(item: Record | Rejected, seen: dict, display: str, number: int) -> Record | Rejected:
    """A repeat of a (study, experiment, participant) already seen becomes a rejection. A rejected line
    counts too (a later repeat of its id is a duplicate), unless its id could not be read at all."""
    if isinstance(item, Rejected) and "?" in item.key:
        return item
    first = seen.get(item.key)
    if first is None:
        seen[item.key] = f"{display} line {number}"
        return item
    if isinstance(item, Record):
        return Rejected.of(item, f"duplicate participant id in experiment {item.experiment!r} (first seen at {first})")
    return item


def source_fingerprints(spec: str | Sequence[str]) -> dict[str, str]:
    """Source path -> ``size:sha256`` of what a job reads (an ``hf:`` dataset: its name), so that a changed
    input at the same path never resumes stale results."""
    out = {}
    for source in resolve_sources(spec):
        if source.kind == "hf_dataset":
            out[f"hf:{source.path}"] = "streamed dataset (not hashed)"
            continue
        try:
            out[source.path] = f"{os.path.getsize(source.path)}:{hashing.hash_file(source.path)}"
        except OSError as err:
            raise DataError(f"{source.path}: unreadable ({err})") from None
    return out


def count_participants(spec: str | Sequence[str]) -> int | None:
    """Input lines (participants) across sources, for progress and ETA; None for a streamed dataset."""
    total = 0
    for source in resolve_sources(spec):
        if source.kind == "hf_dataset":
            return None
        try:
            if source.kind == "hf_parquet":
                import pyarrow.parquet as pq

                total += pq.ParquetFile(source.path).metadata.num_rows
                continue
            with _open_raw_lines(source.path) as (_, lines):
                total += max(1, sum(1 for line in lines if line.strip()))  # an empty file is one reported row
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile, ValueError) as err:
            raise DataError(f"{source.path}: unreadable ({type(err).__name__}: {err})") from err
    return total


# ---------------------------------------------------------------------------------------------------
# One row → Record | Rejected


def _id_string(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return None


def _to_record(
    source: Source, display: str, number: int, obj: Any, error: str | None, strict_markers: bool = True
) -> Record | Rejected:
    study = source.study or "?"
    if error is not None:
        return Rejected(study=study, experiment="?", participant="?", source=display, line=number, reason=error)
    if not isinstance(obj, dict):
        return Rejected(
            study=study,
            experiment="?",
            participant="?",
            source=display,
            line=number,
            reason=f"record is a JSON {type(obj).__name__}, expected an object",
        )
    hf_layout = source.kind != "raw"
    if hf_layout:
        study = cast(str, obj.get("study")) if isinstance(obj.get("study"), str) and obj.get("study") else "?"
    participant_field = "participant_reindexed" if hf_layout and "participant_reindexed" in obj else "participant"
    participant = _id_string(obj.get(participant_field))
    experiment = obj.get("experiment")
    shown_participant = participant if participant is not None else repr(obj.get(participant_field, "?"))
    shown_experiment = experiment if isinstance(experiment, str) else "?"

    def reject(reason: str) -> Rejected:
        return Rejected(
            study=study,
            experiment=shown_experiment,
            participant=shown_participant,
            source=display,
            line=number,
            reason=reason,
        )

    if hf_layout and study == "?":
        return reject("missing or empty field 'study' (required in the HF layout)")
    for field in ("text", participant_field, "experiment"):
        if field not in obj or obj[field] is None:
            return reject(f"missing field {field!r}")
    if not isinstance(obj["text"], str):
        return reject(f"field 'text' must be a string, got {type(obj['text']).__name__}")
    if participant is None:
        return reject(
            f"field {participant_field!r} must be a string or an integer, got {type(obj[participant_field]).__name__}"
        )
    if not isinstance(experiment, str):
        return reject(f"field 'experiment' must be a string, got {type(experiment).__name__}")
    if not obj["text"].strip():
        return reject("empty text")
    try:
        obj["text"].encode("utf-8")
    except UnicodeEncodeError as err:
        return reject(f"text is not valid Unicode ({err.reason} at char {err.start})")

    text = obj["text"]
    if hf_layout:
        metadata = {c: meta.published_value(c, obj.get(c)) for c in meta.META_COLUMNS}
    else:
        experiment = canonical_experiment(experiment, text)
        text = build_text_fixes(experiment, text)
        scalar_error = _metadata_type_error(obj)
        if scalar_error:
            return reject(scalar_error)
        metadata = meta.canonical_metadata(obj)
    reason = marker_error(text, strict=strict_markers) or _rts_error(obj.get("RTs"), text)
    if reason:
        return Rejected(
            study=study, experiment=experiment, participant=participant, source=display, line=number, reason=reason
        )
    return Record(
        study=study,
        experiment=experiment,
        participant=participant,
        text=text,
        metadata=metadata,
        source=display,
        line=number,
    )


def _metadata_type_error(obj: Mapping[str, Any]) -> str | None:
    """Raw metadata that feeds a canonical column must be a scalar (lists cannot become a persona)."""
    for key in sorted(meta.SOURCE_KEYS & obj.keys()):
        if isinstance(obj[key], (list, dict)):
            return f"field {key!r} must be a scalar, got {type(obj[key]).__name__}"
    return None


def _rts_error(rts: Any, text: str) -> str | None:
    if rts is None:
        return None
    if not isinstance(rts, list):
        return f"field 'RTs' must be a list, got {type(rts).__name__}"
    for value in rts:
        if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
            continue
        try:
            float(value)
        except (TypeError, ValueError):
            return f"field 'RTs' holds a non-numeric value {value!r}"
    n = text.count("<<")
    if rts and len(rts) != n:
        return f"field 'RTs' has {len(rts)} entries but the text has {n} responses"
    return None


_MARKER = re.compile(r"<<|>>")


def marker_error(text: str, *, strict: bool = True) -> str | None:
    """Why the ``<<…>>`` markup of ``text`` cannot be scored reliably, or None.

    Always checked: at least one ``<<``; no ``>>`` without an open ``<<``; no ``<<`` inside a response
    (nesting); no unclosed ``<<`` before the last marker. ``strict`` also rejects what the reference
    scripts score anyway (as missed or cut responses, which the span audit counts): an empty ``<<>>``, a
    ``<<`` not preceded by a space (the reference's `` <<`` token search skips it) and an unclosed final
    ``<<`` (the reference cuts it).
    """
    if "<<" not in text:
        return "no response marker '<<' in text"
    open_at = -1
    for match in _MARKER.finditer(text):
        pos = match.start()
        if match.group() == "<<":
            if open_at >= 0:
                return f"nested marker: '<<' at char {pos} inside the response opened at char {open_at}"
            if strict and (pos == 0 or text[pos - 1] != " "):
                before = repr(text[max(0, pos - 12) : pos])
                return f"marker '<<' at char {pos} is not preceded by a space (preceded by {before})"
            open_at = pos
        else:
            if open_at < 0:
                return f"unbalanced marker: '>>' at char {pos} closes no '<<'"
            if strict and pos == open_at + 2:
                return f"empty response '<<>>' at char {open_at}"
            open_at = -1
    if open_at >= 0 and strict:
        return f"unbalanced marker: '<<' at char {open_at} is never closed"
    return None


# ---------------------------------------------------------------------------------------------------
# The dataset build's per-experiment fixes (docs/reference-protocol.md, "Reading records"), for raw files only.

_NEWLINE_FIX_EXPERIMENTS = (
    "vantiel2020",
    "vantiel2021",
    "vantiel2022",
    "olschewski2025optimal/1",
    "witte2024interventionStudy",
    "hu2023lm-pragmatics",
    "Ying2023NIPE",
)

# The four replacements every Psych-201 text gets at build time (and again in the reference scorer).
GLOBAL_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    ("<<skip>>", "<<skip>>."),
    ("<<-", "<< -"),
    ("<<think>>", "<< think>>"),
    ("More Details >>", "More Details ->"),
)


def canonical_experiment(experiment: str, text: str) -> str:
    """The build's experiment-name remapping (docs/reference-protocol.md, "Reading records")."""
    if experiment.startswith("dezfouli") and "choices_diagno" in experiment:
        return "dezfouli2019/choices_diagno.csv"
    if "online public goods game" in text:
        return "alsobay2025publicGoodsGame/"
    return experiment


def build_text_fixes(experiment: str, text: str) -> str:
    """The build's text edits keyed by experiment, then the four global replacements."""
    if experiment.startswith(_NEWLINE_FIX_EXPERIMENTS):
        text = text.replace(">>\n", ">>.\n")
    if experiment.startswith("pirrone_2018_dots"):
        text = text.replace(">>, t", ">>. T").replace(">>, and", ">> and")
    if experiment.startswith("heffner2022"):
        text = text.replace("$<<", "<<").replace(">>", ">> dollars")
    if experiment.startswith("holton2024goalcommitment"):
        text = text.replace("collect<<", "collect <<")
    for old, new in GLOBAL_REPLACEMENTS:
        text = text.replace(old, new)
    return text
