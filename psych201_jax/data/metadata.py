"""Participant metadata: the 25 canonical Psych-201 columns and the persona questions.

Raw per-study files carry study-specific keys (``sex``, ``stai_total``, ``FACSIMILE A/D`` ...). The
dataset build (docs/reference-protocol.md, "Reading records") renames a known set, casts them and drops
the rest; the HF layout already holds the 25 canonical columns as strings with ``"N/A"`` when missing.
``canonical_metadata`` reproduces the build for raw records so both inputs give the same persona prompts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from psych201_jax.conditions import Persona, Protocol
from psych201_jax.types import Excluded

NA = "N/A"

# (column, interviewer question) in the reference's fixed order (eval_meta.py META_FIELDS).
META_FIELDS: tuple[tuple[str, str], ...] = (
    ("age", "What is your age?"),
    ("gender", "What is your gender?"),
    ("nationality", "What is your nationality?"),
    ("education", "What is your highest level of education?"),
    ("clinical diagnosis", "Do you have any clinical diagnoses?"),
) + tuple(
    (name, f"What is your {name} score?")
    for name in (
        "STICSA-T somatic",
        "STICSA-T cognitive",
        "STAI-S",
        "STAI-T",
        "IUS",
        "RRQ",
        "AUDIT",
        "DAST",
        "PSWQ",
        "GAD-7",
        "SDS",
        "OCI",
        "PHQ-9",
        "PHQ-8",
        "BAS Drive",
        "BAS Fun Seeking",
        "BAS Reward Responsiveness",
        "BDI-II",
        "BIS-11",
        "BIS-10",
    )
)

META_COLUMNS: tuple[str, ...] = tuple(name for name, _ in META_FIELDS)

# Build-time renames, applied in order: raw study keys first, then source keys → canonical columns.
_RENAMES_1 = {
    "STICSAsoma": "STICSA-T somatic",
    "STICSAcog": "STICSA-T cognitive",
    "STAI": "STAI-S",
    "stai": "STAI-T",
    "stai_total": "STAI-T",
    "BIS": "bis",
    "audit_total": "AUDIT",
    "bis_total": "BIS-10",
    "sex": "gender",
    "location": "nationality",
}
_RENAMES_2 = {
    "diagnosis": "clinical diagnosis",
    "pswq": "PSWQ",
    "gad7": "GAD-7",
    "sds_total": "SDS",
    "oci_total": "OCI",
    "PHQ": "PHQ-9",
    "phq8": "PHQ-8",
    "bas_drive": "BAS Drive",
    "bas_fun_seeking": "BAS Fun Seeking",
    "bas_reward_response": "BAS Reward Responsiveness",
    "BDI-II score": "BDI-II",
    "bis": "BIS-11",
}

# Every raw key that feeds a canonical column (its value must be a scalar).
SOURCE_KEYS = frozenset(META_COLUMNS) | frozenset(_RENAMES_1) | frozenset(_RENAMES_2)

_GENDER = {
    "female": "female",
    "f": "female",
    "woman": "female",
    "male": "male",
    "m": "male",
    "man": "male",
    "nb": "other",
    "other": "other",
}
_GENDER_NA = {"nan", "no-specify", "no-spe", "prefer not to answer", "prefer not to say", "rather not say", ""}
_DIAGNOSIS = {
    "healthy": NA,
    "no-lesion-control": NA,
    "depression": "depression",
    "bipolar": "bipolar",
    "non-pfc-lesion": "brain-lesion",
}
_INT_COLUMNS = {
    "STAI-T",
    "SDS",
    "OCI",
    "PHQ-9",
    "PHQ-8",
    "BAS Drive",
    "BAS Fun Seeking",
    "BAS Reward Responsiveness",
    "BDI-II",
}
_INT_OR_NA_COLUMNS = {"AUDIT", "BIS-10", "BIS-11"}


def _is_missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, str) and value.strip().lower() in ("", "nan", NA.lower()))
    )


def _as_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _cast(column: str, value: Any) -> str:
    """One raw value → the build's canonical string for ``column`` (``"N/A"`` when unusable)."""
    if _is_missing(value):
        return NA
    if column == "age":
        age = _as_float(value)
        return NA if age is None or age < 0 or age > 100 else str(age)
    if column == "gender":
        key = str(value).strip()
        if key.lower() in _GENDER_NA:
            return NA
        return _GENDER.get(key.lower(), key)
    if column == "clinical diagnosis":
        key = str(value).strip()
        return _DIAGNOSIS.get(key.lower(), key)
    if column in ("nationality", "education"):
        # The build maps these through lookup tables that are not public; we keep its documented
        # clean-up ("Other " / " (please specify)" stripped, Unknown → N/A) and the value otherwise.
        text = str(value).replace(" (please specify)", "").removeprefix("Other ").strip()
        return NA if text.lower() in ("unknown", "nan", "") else text
    if column in _INT_COLUMNS or column in _INT_OR_NA_COLUMNS:
        number = _as_float(value)
        if number is None:
            return NA if column in _INT_OR_NA_COLUMNS else str(value)
        return str(int(number))
    return str(value)


def canonical_metadata(raw: Mapping[str, Any]) -> dict[str, str]:
    """Raw record fields → the 25 canonical columns (strings, ``"N/A"`` when missing).

    Keys outside the build's rename map (``condition``, ``FACSIMILE *``, ``anxiety`` ...) are dropped,
    as in the published dataset (docs/reference-protocol.md, "Reading records").
    """
    renamed: dict[str, Any] = {}
    for key, value in raw.items():
        renamed[_RENAMES_1.get(key, key)] = value
    canon: dict[str, Any] = {}
    for key, value in renamed.items():
        canon[_RENAMES_2.get(key, key)] = value
    return {column: _cast(column, canon.get(column)) for column in META_COLUMNS}


def published_value(column: str, value: Any) -> str:
    """A value of the published HF layout as its canonical string: strings kept as they are (a "nan" or ""
    cell too: the study's eval_meta.py reads it as a value, see ``is_known``), None / NaN → "N/A", numbers
    cast as the build casts them (a numeric parquet column)."""
    if isinstance(value, str):
        return value
    if _is_missing(value):
        return NA
    return _cast(column, value)


def is_known(value: str, protocol: Protocol = Protocol.ROBUST) -> bool:
    """Whether a metadata value enters the persona. ``reference``: eval_meta.py's test, literally
    ``value != "N/A"`` (so "nan" and "" are values); ``robust``: "N/A", "nan", "n/a" and "" are missing."""
    if protocol == Protocol.REFERENCE:
        return value != NA
    return not _is_missing(value)


def _neutralised(value: str) -> str:
    """A value with its response markers broken up (``<<`` → ``< <``), so metadata never becomes markup."""
    while "<<" in value or ">>" in value:
        value = value.replace("<<", "< <").replace(">>", "> >")
    return value


def has_persona(metadata: Mapping[str, str], protocol: Protocol = Protocol.ROBUST) -> bool:
    """True when at least one canonical field is known (the reference's ``has_any_meta``)."""
    return any(is_known(metadata.get(column, NA), protocol) for column in META_COLUMNS)


def persona_prefix(metadata: Mapping[str, str], protocol: Protocol = Protocol.ROBUST) -> str:
    """The reference's interview preprompt: one Q/A pair per known field, in META_FIELDS order.

    ``reference`` prepends the values as they are, as eval_meta.py does (markers in a value are then labelled
    like responses; ``spans`` counts them as ``responses_metadata``); ``robust`` writes each value with its
    markers broken up, so a persona run scores exactly the responses of the no-persona run."""
    parts = []
    for column, question in META_FIELDS:
        value = metadata.get(column, NA)
        if is_known(value, protocol):
            shown = value if protocol == Protocol.REFERENCE else _neutralised(value)
            parts.append(f"Interviewer: {question}\nInterviewee: {shown}\n\n")
    return "".join(parts)


PERSONA_MODES = tuple(p.value for p in Persona)


def shuffled_personas(records, seed: int = 0, protocol: Protocol = Protocol.ROBUST) -> dict:
    """key → metadata of *another* participant of the same study (a seeded derangement).

    Only participants with metadata take part. Within each study they are put in a random order and each
    gets the persona of the next one in that cycle, so nobody keeps their own (needs ≥ 2 per study).
    """
    import zlib

    import numpy as np

    by_study: dict[str, list] = {}
    for record in records:
        if hasattr(record, "metadata") and has_persona(record.metadata, protocol):
            by_study.setdefault(record.study, []).append(record)
    out = {}
    for study, members in by_study.items():
        if len(members) < 2:
            continue
        members.sort(key=lambda r: r.key)
        order = np.random.default_rng([seed, zlib.crc32(study.encode())]).permutation(len(members))
        for i, j in zip(order, np.roll(order, -1)):
            out[members[i].key] = members[j].metadata
    return out


def persona_selector(
    mode: str, *, subset_only: bool = False, records=None, seed: int = 0, protocol: Protocol = Protocol.ROBUST
):
    """None (no persona, everyone), or a function record → what to interview on.

    The function returns the metadata mapping to prefix, None for no prefix, or an ``Excluded``: why the
    participant is not part of this condition. ``subset_only`` restricts ``none`` to participants
    with metadata, so the no-persona contrast covers exactly the persona subset (the reference compares
    different subsets). ``shuffled`` needs ``records`` (an iterable of all records) to draw from.
    """
    if mode not in PERSONA_MODES:
        raise ValueError(f"unknown persona mode {mode!r}; expected one of {PERSONA_MODES}")
    no_metadata = Excluded(reason="participant has no metadata (all 25 fields N/A)")
    if mode == "none":
        if not subset_only:
            return None
        return lambda record: None if has_persona(record.metadata, protocol) else no_metadata
    if mode == "matched":
        return lambda record: record.metadata if has_persona(record.metadata, protocol) else no_metadata
    if records is None:
        raise ValueError("persona=shuffled needs the records to draw other participants' metadata from")
    mapping = shuffled_personas(records, seed, protocol)

    def shuffled(record):
        if not has_persona(record.metadata, protocol):
            return no_metadata
        return mapping.get(record.key, Excluded(reason="no other participant of the study has metadata to shuffle in"))

    return shuffled
