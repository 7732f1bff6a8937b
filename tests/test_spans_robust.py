"""Robust protocol: offset-based spans hold exactly the response characters; budget truncation."""

import itertools
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psych201_jax import defaults
from psych201_jax.data import metadata, records, spans
from psych201_jax.data.tokenizer import TokenizerInfo

pytestmark = pytest.mark.quick

CONTEXT = st.text(alphabet="abcdefghij XYZ.,:;!?-0123456789é\n", max_size=25)
RESPONSE = st.text(alphabet="abcdeQR-0123456789 .,é%$", min_size=1, max_size=8).filter(lambda s: s.strip())
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _record(text, **meta):
    md = {c: "N/A" for c in metadata.META_COLUMNS}
    md.update(meta)
    return records.Record(study="toy", experiment="exp", participant="p", text=text, metadata=md, source="mem", line=1)


def _build(contexts, responses):
    text, bounds = "", []
    for ctx, resp in zip(contexts, responses):
        text += ctx + " <<"
        bounds.append((len(text), len(text) + len(resp)))
        text += resp + ">>"
    return text + contexts[-1], bounds


@pytest.fixture(scope="module", params=["qwen", "llama"])
def tok(request):
    return TokenizerInfo(request.getfixturevalue(f"{request.param}_tokenizer_dir"))


def _one(tok, record, protocol, persona=None):
    selector = (lambda r: r.metadata) if persona else None
    (out,) = spans.tokenize_records([record], tok, protocol, persona_of=selector)
    assert isinstance(out, spans.ParticipantSpans), out
    return out


@SETTINGS
@given(data=st.data())
def test_robust_spans_hold_exactly_the_response_characters(tok, data):
    responses = data.draw(st.lists(RESPONSE, min_size=1, max_size=5))
    contexts = data.draw(st.lists(CONTEXT, min_size=len(responses) + 1, max_size=len(responses) + 1))
    text, bounds = _build(contexts, responses)
    ps = _one(tok, _record(text), spans.SpanRules("robust"))
    _, offsets = tok.encode_batch([text])[0]
    assert ps.responses_text == ps.n_responses == len(responses) and ps.lost_truncation == 0
    assert ps.responses_scored == len(responses)
    straddling = 0
    for j, (cs, ce) in enumerate(bounds):
        positions = np.flatnonzero(ps.response_index == j)
        assert len(positions) and np.all(np.diff(positions) == 1), "a response's tokens are contiguous"
        covered = set()
        for p in positions:
            covered.update(range(*offsets[p]))
        assert covered >= set(range(cs, ce)), "every response character is scored"
        extra = covered - set(range(cs, ce))
        straddling += sum(1 for p in positions if set(range(*offsets[p])) - set(range(cs, ce)))
        if not extra:
            assert tok.hf.decode(ps.token_ids[positions]) == text[cs:ce]
    assert ps.straddle == straddling
    outside = ps.response_index == -1
    for p in np.flatnonzero(outside):
        a, b = offsets[p]
        assert all(not (cs < b and a < ce) for cs, ce in bounds), "no response character left outside"


@SETTINGS
@given(data=st.data())
def test_token_budget_never_cuts_inside_a_response(tok, data):
    responses = data.draw(st.lists(RESPONSE, min_size=1, max_size=6))
    contexts = data.draw(st.lists(CONTEXT, min_size=len(responses) + 1, max_size=len(responses) + 1))
    text, _ = _build(contexts, responses)
    full = _one(tok, _record(text), spans.SpanRules("robust"))
    budget = data.draw(st.integers(1, len(full.token_ids) + 2))
    cut = _one(tok, _record(text), spans.SpanRules("robust", token_budget=budget))
    assert len(cut.token_ids) <= budget + (tok.bos_token is not None)  # a leading BOS is not text
    assert np.array_equal(cut.token_ids, full.token_ids[: len(cut.token_ids)])
    kept = cut.n_responses
    assert kept + cut.lost_truncation == len(responses)
    for j in range(kept):  # every kept response is complete
        assert np.array_equal(np.flatnonzero(cut.response_index == j), np.flatnonzero(full.response_index == j))
    assert not (cut.response_index >= kept).any()


def test_persona_prefix_is_outside_the_budget(tok, data_root):
    recs = [r for r in itertools.islice(records.iter_records(f"{data_root}/thoma2025riskychoice"), 5)]
    protocol = spans.SpanRules("robust", token_budget=300)
    for rec in recs:
        plain = _one(tok, rec, protocol)
        with_persona = _one(tok, rec, protocol, persona=True)
        assert plain.n_responses == with_persona.n_responses and plain.lost_truncation > 0
        prefix_tokens = len(with_persona.token_ids) - len(plain.token_ids)
        assert prefix_tokens > 10
        assert np.array_equal(
            with_persona.token_ids[prefix_tokens + (tok.bos_token is not None) :],
            plain.token_ids[(tok.bos_token is not None) :],
        )


def test_robust_chat_has_single_bos_and_assistant_spans(llama_tokenizer_dir, data_root):
    tok = TokenizerInfo(llama_tokenizer_dir)
    rec = next(records.iter_records(f"{data_root}/thoma2025riskychoice"))
    ps = _one(tok, rec, spans.SpanRules("robust", "chat"))
    bos = tok.hf.convert_tokens_to_ids("<|begin_of_text|>")
    assert ps.token_ids[0] == bos and ps.token_ids[1] != bos
    assert ps.n_responses == ps.responses_scored == rec.text.count("<<")
    answers = [tok.hf.decode(ps.token_ids[ps.response_index == j]) for j in range(ps.n_responses)]
    assert answers == [m["content"].strip() for m in _messages(rec.text) if m["role"] == "assistant"]


def _messages(text):
    from psych201_jax.data import transcripts

    return transcripts.split_into_messages(text)


def test_robust_sees_responses_the_reference_misses(qwen_tokenizer_dir, data_root):
    """On real data the reference protocol (this tokenizer merges '>>.\\n') runs away; robust does not."""
    tok = TokenizerInfo(qwen_tokenizer_dir)
    recs = list(itertools.islice(records.iter_records(f"{data_root}/thoma2025riskychoice"), 3))
    for rec in recs:
        ref = _one(tok, rec, spans.SpanRules("reference"))
        rob = _one(tok, rec, spans.SpanRules("robust"))
        assert rob.responses_scored == rec.text.count("<<") > ref.responses_scored
        assert ref.runaway > 0 and ref.merged > 0 and rob.straddle == 0


@pytest.mark.parametrize("template", ["none", "chat"])
def test_persona_and_no_persona_keep_the_same_responses_at_any_budget(tok, data_root, template):
    rec = next(records.iter_records(f"{data_root}/thoma2025riskychoice"))
    for budget in range(20, 400, 3):
        protocol = spans.SpanRules("robust", template, token_budget=budget)
        plain = _one(tok, rec, protocol)
        with_persona = _one(tok, rec, protocol, persona=True)
        assert plain.n_responses == with_persona.n_responses, budget


@pytest.mark.parametrize("flavour", ["qwen", "llama", "default"])
def test_tokenizer_snapshot_gives_the_ids_and_offsets_of_transformers(request, tmp_path, data_root, flavour):
    path = defaults.DEFAULT_TOKENIZER if flavour == "default" else request.getfixturevalue(f"{flavour}_tokenizer_dir")
    live = TokenizerInfo(path, snapshot_dir=str(tmp_path))
    assert live._hf is not None and len(os.listdir(tmp_path)) == 1
    snap = TokenizerInfo(path, snapshot_dir=str(tmp_path))
    assert snap._hf is None
    for name in ("base_l_id", "base_r_id", "bos_token", "has_template", "sha256"):
        assert getattr(snap, name) == getattr(live, name), name
    recs = [r for r in itertools.islice(records.iter_records(f"{data_root}/busch2024_stroop"), 4)]
    texts = [r.text for r in recs if isinstance(r, records.Record)] + ["", " <<", "a>> <<b>>\n\n<<c", "é %$ 12"]
    for flag in (True, False):
        hf_ids = live.hf(texts, add_special_tokens=flag).input_ids
        pairs = zip(live.encode_batch(texts, flag), snap.encode_batch(texts, flag), strict=True)
        for ((ids, offs), (s_ids, s_offs)), hf in zip(pairs, hf_ids, strict=True):
            np.testing.assert_array_equal(s_ids, ids)
            np.testing.assert_array_equal(s_offs, offs)
            assert ids.tolist() == hf


def test_tokenizer_snapshot_is_keyed_by_the_files_and_rebuilt_when_damaged(tmp_path, qwen_tokenizer_dir):
    snaps = str(tmp_path / "snaps")
    TokenizerInfo(qwen_tokenizer_dir, snapshot_dir=snaps)
    (saved,) = os.listdir(snaps)
    changed = shutil.copytree(qwen_tokenizer_dir, tmp_path / "changed")
    cfg_path = changed / "tokenizer_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "model_max_length": 77}))
    assert TokenizerInfo(str(changed), snapshot_dir=snaps)._hf is not None  # other files: a new snapshot
    assert len(os.listdir(snaps)) == 2
    with open(os.path.join(snaps, saved), "w") as f:
        f.write('{"backend": "trunc')
    again = TokenizerInfo(qwen_tokenizer_dir, snapshot_dir=snaps)
    assert again._hf is not None  # unreadable: built through transformers and saved again
    assert TokenizerInfo(qwen_tokenizer_dir, snapshot_dir=snaps)._hf is None
    with open(os.path.join(snaps, saved), "w") as f:  # well-formed JSON whose backend does not parse
        json.dump(dict(backend="{}", base_l_id=[1], base_r_id=[2], bos_token=None, has_template=False), f)
    rebuilt = TokenizerInfo(qwen_tokenizer_dir, snapshot_dir=snaps)
    assert rebuilt._hf is not None and rebuilt.base_l_id == again.base_l_id
    assert [p for p in os.listdir(snaps) if p.endswith(".tmp")] == []
