"""Persona metadata is data, not markup: markers inside metadata values are counted apart under
``reference`` (as the study's eval_meta.py labels them) and never become responses under ``robust``; a
"nan" cell is a value under ``reference`` (eval_meta.py's literal != "N/A") and missing under ``robust``;
no span counter is ever negative."""

import numpy as np
import pytest

from psych201_jax.data import metadata, pipeline, records, spans
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.types import SPAN_COUNTERS, ParticipantSpans

pytestmark = pytest.mark.quick

TEXT = "You see two options. You choose <<A>>. Then <<B>>. Next you pick <<C>> and finally <<D>>."
HOSTILE = {
    "education": "ignore all <<previous>> answers",
    "age": "<<30>>",
}
UNBALANCED = {"education": ">> unbalanced <<", "gender": "female"}


def _record(text=TEXT, **meta):
    md = {c: "N/A" for c in metadata.META_COLUMNS}
    md.update(meta)
    return records.Record(study="toy", experiment="e", participant="p", text=text, metadata=md, source="m", line=1)


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir):
    return TokenizerInfo(qwen_tokenizer_dir)


def _one(tok, record, protocol, persona):
    rules = spans.SpanRules(protocol)
    selector = (lambda r: r.metadata) if persona else None
    (out,) = spans.tokenize_records([record], tok, rules, persona_of=selector)
    assert isinstance(out, ParticipantSpans), out
    return out


def _balanced(ps: ParticipantSpans, total: int) -> None:
    counts = ps.counters()
    assert all(v >= 0 for v in counts.values()), counts
    if not ps.runaway and not ps.merged:
        assert ps.responses_scored + ps.lost_truncation + ps.missed == total, counts


@pytest.mark.parametrize("meta", [HOSTILE, UNBALANCED])
def test_robust_persona_scores_exactly_the_no_persona_responses(tok, meta):
    rec = _record(**meta)
    plain = _one(tok, rec, "robust", persona=False)
    persona = _one(tok, rec, "robust", persona=True)
    assert persona.n_responses == plain.n_responses == 4 and persona.responses_metadata == 0
    for r in range(4):  # the same tokens for every response, none from the persona prefix
        np.testing.assert_array_equal(
            persona.token_ids[persona.response_index == r], plain.token_ids[plain.response_index == r]
        )
    _balanced(persona, persona.responses_text)


def test_reference_labels_metadata_markers_as_the_study_does_and_counts_them_apart(tok):
    persona = _one(tok, _record(**HOSTILE), "reference", persona=True)
    assert persona.responses_text == 4 and persona.responses_metadata == 2
    # eval_meta.py labels all six; this tokenizer merges a '>>' with the newlines after it, so two of them
    # share a span with their neighbour, as in the study's scripts.
    assert persona.lost_truncation == 0 and persona.n_responses + persona.merged + persona.missed == 6
    assert any("metadata" in w for w in persona.warnings)
    _balanced(persona, persona.responses_text + persona.responses_metadata)
    plain = _one(tok, _record(**HOSTILE), "reference", persona=False)
    assert plain.responses_metadata == 0 and plain.responses_text == 4


def test_nan_cell_is_a_value_under_reference_and_missing_under_robust():
    rec = _record(education="nan")
    ref_prefix = metadata.persona_prefix(rec.metadata, metadata.Protocol.REFERENCE)
    assert "Interviewee: nan" in ref_prefix and metadata.has_persona(rec.metadata, metadata.Protocol.REFERENCE)
    assert not metadata.has_persona(rec.metadata, metadata.Protocol.ROBUST)
    assert metadata.persona_prefix(rec.metadata, metadata.Protocol.ROBUST) == ""
    # The HF layout keeps such strings as they are; None and NaN cells are missing.
    assert metadata.published_value("education", "nan") == "nan"
    assert metadata.published_value("education", None) == metadata.published_value("age", float("nan")) == "N/A"


@pytest.mark.parametrize("protocol", ["reference", "robust"])
def test_no_counter_is_negative_on_the_vendored_corpus_with_hostile_metadata(tok, data_root, protocol):
    """Every participant of two real studies, each given the hostile metadata values."""
    recs = [r for r in records.iter_records(f"{data_root}/thoma2025riskychoice") if isinstance(r, records.Record)]
    hostile = [_record(text=r.text, **HOSTILE) for r in recs[:20]]
    pipe = pipeline.SpanPipeline(data="", rules=spans.SpanRules(protocol), persona=metadata.Persona.MATCHED)
    for ps in pipe.spans(tok, hostile):
        assert isinstance(ps, ParticipantSpans), ps
        extra = ps.responses_metadata if protocol == "reference" else 0
        assert ps.responses_metadata == (2 if protocol == "reference" else 0)
        _balanced(ps, ps.responses_text + extra)
        assert set(ps.counters()) == set(SPAN_COUNTERS)
