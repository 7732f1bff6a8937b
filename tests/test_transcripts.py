"""String pipeline: metadata casts, persona prefix, the reference's truncation and chat split."""

import itertools

from psych201_jax.data import metadata, records, transcripts


def test_canonical_metadata_renames_casts_and_drops():
    raw = {
        "age": "37",
        "sex": "F",
        "stai_total": 41.0,
        "diagnosis": "Healthy",
        "gad7": 5,
        "bis": "n/a",
        "condition": "repeated",
        "FACSIMILE A/D": 0.3,
        "location": "Other Germany (please specify)",
    }
    meta = metadata.canonical_metadata(raw)
    assert set(meta) == set(metadata.META_COLUMNS)
    assert meta["age"] == "37.0" and meta["gender"] == "female" and meta["STAI-T"] == "41"
    assert meta["clinical diagnosis"] == "N/A" and meta["GAD-7"] == "5" and meta["BIS-11"] == "N/A"
    assert meta["nationality"] == "Germany"
    assert metadata.canonical_metadata({"age": "150"})["age"] == "N/A"
    assert metadata.canonical_metadata({"gender": "Prefer not to say"})["gender"] == "N/A"


def test_persona_prefix_matches_reference_example(data_root):
    """docs/reference-protocol.md, "Persona prefix": thoma2025riskychoice record 1 → age 31.0 and gender female."""
    first = next(records.iter_records(f"{data_root}/thoma2025riskychoice"))
    prefix = metadata.persona_prefix(first.metadata)
    assert prefix == (
        "Interviewer: What is your age?\nInterviewee: 31.0\n\n"
        "Interviewer: What is your gender?\nInterviewee: female\n\n"
    )
    assert metadata.has_persona(first.metadata)
    franke = next(records.iter_records(f"{data_root}/franke2024bayesian"))
    assert not metadata.has_persona(franke.metadata) and metadata.persona_prefix(franke.metadata) == ""


def test_reference_truncate_steps():
    assert transcripts.reference_truncate("a <<skip>>. b") == "a <<skip>>.. b"  # doubled, as in the reference
    assert transcripts.reference_truncate("x <<-3>> y") == "x << -3>> y"
    assert transcripts.reference_truncate("x <<think>> y") == "x << think>> y"
    assert transcripts.reference_truncate("More Details >> x <<a>>") == "More Details -> x <<a>>"
    assert transcripts.reference_truncate("x <<a  >> y <<b\n>>") == "x <<a>> y <<b>>"
    assert transcripts.reference_truncate("x <<a>> y <<bc>>", max_chars=13) == "x <<a>> y "
    assert transcripts.reference_truncate("x <<a>>", chat=True) == "x <<a>>."


def test_reference_cut_is_by_characters_not_bytes():
    text = "é" * 10 + " <<a>>"
    assert transcripts.reference_truncate(text, max_chars=12) == "é" * 10 + " <"
    assert transcripts.reference_truncate(text, max_chars=13) == "é" * 10 + " "


def test_split_into_messages():
    assert transcripts.split_into_messages("Hi <<A>>. Next <<B>>") == [
        {"role": "user", "content": "Hi "},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": ". Next "},
        {"role": "assistant", "content": "B"},
    ]
    assert transcripts.split_into_messages("<<A>> then")[0] == {"role": "assistant", "content": "A"}


def test_response_char_spans(data_root):
    for rec in itertools.islice(records.iter_records(f"{data_root}/busch2024_stroop"), 3):
        spans = transcripts.response_char_spans(rec.text)
        assert len(spans) == rec.text.count("<<")
        assert all(rec.text[s - 2 : s] == "<<" and rec.text[e : e + 2] == ">>" for s, e in spans)
