"""The reference protocol against an independent, slow, literal copy of the published scripts.

``literal_reference`` below follows eval.py / eval_instruct.py / eval_meta.py line by line with plain
Python lists and the HF tokenizer's own ``__call__`` (not our batched Rust path), and is compared
position by position with ``spans.tokenize_records`` on real studies.
"""

import itertools
import re

import numpy as np
import pytest

from psych201_jax.data import metadata, records, spans
from psych201_jax.data.tokenizer import TokenizerInfo

pytestmark = pytest.mark.quick

STUDIES = (
    "thoma2025riskychoice",
    "busch2024_stroop",
    "guenther2024substitutions",
    "xu2023augmenting",
    "spektor2024lossaversion",
    "franke2024bayesian",
)
PER_STUDY = 6

# ---------------------------------------------------------------------------------------------------
# Literal copy of the reference scripts (kept deliberately naive).

_space_before_close = re.compile(r"\s+(?=>>)")


def _safe_truncate_angle(text, max_len, chat):
    t = (
        text[:max_len]
        .replace("<<skip>>", "<<skip>>.")
        .replace("<<-", "<< -")
        .replace("<<think>>", "<< think>>")
        .replace("More Details >>", "More Details ->")
    )
    if t.count("<<") > t.count(">>"):
        last_open = t.rfind("<<")
        if last_open != -1:
            t = t[:last_open]
    t = _space_before_close.sub("", t)
    if chat:
        t += "."
    return t


def _find_subseq(seq, subseq, start=0):
    n, m = len(seq), len(subseq)
    for i in range(start, n - m + 1):
        if seq[i : i + m] == subseq:
            return i
    return -1


def _collate(ids, l_id, r_id):
    labels = [-100] * len(ids)
    i = 0
    while True:
        s = _find_subseq(ids, l_id, start=i)
        if s == -1:
            break
        content_start = s + len(l_id)
        e = _find_subseq(ids, r_id, start=content_start)
        if e == -1:
            e = len(ids)
        labels[content_start:e] = ids[content_start:e]
        i = e + len(r_id)
    return labels


def _split_into_messages(text):
    parts = re.split(r"(<<|>>)", text)
    messages, role, buffer = [], "user", ""
    for part in parts:
        if part == "<<":
            if buffer:
                messages.append({"role": "user", "content": buffer})
                buffer = ""
            role = "assistant"
        elif part == ">>":
            if buffer:
                messages.append({"role": "assistant", "content": buffer})
                buffer = ""
            role = "user"
        else:
            buffer += part
    if buffer:
        messages.append({"role": role, "content": buffer})
    return messages


def _template_kwargs(tok):
    kwargs = dict(tokenize=False, add_generation_prompt=False)
    if "enable_thinking" in (tok.chat_template or ""):
        kwargs["enable_thinking"] = False
    return kwargs


def _assistant_markers(tok, kwargs):
    a_mark, t_mark = "\ue000ASSISTANT_CONTENT\ue001", "\ue002TRAILING_USER\ue003"
    user_only = tok.apply_chat_template([{"role": "user", "content": "u"}], **kwargs)
    with_asst = tok.apply_chat_template(
        [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": a_mark},
            {"role": "user", "content": t_mark},
        ],
        **kwargs,
    )
    ids_user = tok(user_only, add_special_tokens=False).input_ids
    enc = tok(with_asst, add_special_tokens=False, return_offsets_mapping=True)
    ids_full, offsets = enc.input_ids, enc.offset_mapping
    assert ids_full[: len(ids_user)] == ids_user
    mstart = with_asst.index(a_mark)
    mend = mstart + len(a_mark)
    first = next(i for i, (a, _) in enumerate(offsets) if a >= mstart)
    after = next(i for i, (a, _) in enumerate(offsets) if a >= mend)
    tstart = with_asst.index(t_mark)
    trailing_first = next(i for i, (a, _) in enumerate(offsets) if a >= tstart)
    return ids_full[len(ids_user) : first], ids_full[after:trailing_first]


def _response_runs(labels):
    """parse_logits' grouping over labels[1:], reported as token positions in the unshifted ids."""
    runs, current = [], []
    for pos, lab in enumerate(labels[1:], start=1):
        if lab != -100:
            current.append(pos)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def literal_reference(tok, example, chat=False, persona=False, max_len=32768):
    """(input ids, list of token-position runs) exactly as the reference computes them."""
    text = example["text"]
    if persona:
        pre = ""
        for field, question in metadata.META_FIELDS:
            if example[field] != "N/A":
                pre += f"Interviewer: {question}\n"
                pre += f"Interviewee: {example[field]}\n\n"
        text = pre + text
    prompt = _safe_truncate_angle(text, max_len, chat)
    if chat:
        kwargs = _template_kwargs(tok)
        prompt = tok.apply_chat_template(_split_into_messages(prompt), **kwargs)
        l_id, r_id = _assistant_markers(tok, kwargs)
    else:
        l_id = tok(" <<", add_special_tokens=False).input_ids
        r_id = tok(">>", add_special_tokens=False).input_ids
    ids = tok([prompt], truncation=False).input_ids[0]
    return ids, _response_runs(_collate(ids, l_id, r_id))


# ---------------------------------------------------------------------------------------------------


def _sample_records(data_root):
    out = []
    for study in STUDIES:
        items = records.iter_records(f"{data_root}/{study}")
        out.extend(r for r in itertools.islice(items, PER_STUDY) if isinstance(r, records.Record))
    return out


@pytest.fixture(scope="module")
def sample(data_root):
    return _sample_records(data_root)


def _example(record):
    return {"text": record.text, **record.metadata}


def _compare(tok_dir, sample, template, persona, snapshot_dir=""):
    if snapshot_dir:
        TokenizerInfo(tok_dir, snapshot_dir=snapshot_dir)  # builds it through transformers, saves it
    tok = TokenizerInfo(tok_dir, snapshot_dir=snapshot_dir)
    protocol = spans.SpanRules("reference", template)
    recs = [r for r in sample if not persona or metadata.has_persona(r.metadata)]
    assert recs, "sample has no participant for this condition"
    selector = metadata.persona_selector("matched" if persona else "none")
    got = list(spans.tokenize_records(recs, tok, protocol, persona_of=selector))
    if snapshot_dir and template == "none":
        assert tok._hf is None, "the snapshot should tokenise without transformers"
    n_runs_total = 0
    for record, ps in zip(recs, got, strict=True):
        assert isinstance(ps, spans.ParticipantSpans), ps
        ids, runs = literal_reference(tok.hf, _example(record), chat=template == "chat", persona=persona)
        assert ps.token_ids.tolist() == ids, record.key
        ours = [np.flatnonzero(ps.response_index == r).tolist() for r in range(ps.n_responses)]
        assert ours == runs, record.key
        assert set(np.unique(ps.response_index)) <= set(range(-1, ps.n_responses))
        n_runs_total += len(runs)
    assert n_runs_total > 0


@pytest.mark.parametrize("template", ["none", "chat"])
@pytest.mark.parametrize("flavour", ["qwen", "llama"])
def test_reference_matches_literal_implementation(request, sample, flavour, template):
    _compare(request.getfixturevalue(f"{flavour}_tokenizer_dir"), sample, template, persona=False)


@pytest.mark.parametrize("template", ["none", "chat"])
@pytest.mark.parametrize("flavour", ["qwen", "llama"])
def test_reference_from_a_tokenizer_snapshot_matches_literal(request, tmp_path, sample, flavour, template):
    _compare(request.getfixturevalue(f"{flavour}_tokenizer_dir"), sample, template, False, str(tmp_path))


@pytest.mark.parametrize("flavour", ["qwen", "llama"])
def test_reference_persona_matches_literal_implementation(request, sample, flavour):
    _compare(request.getfixturevalue(f"{flavour}_tokenizer_dir"), sample, "none", persona=True)


def test_llama_chat_reference_has_double_bos(llama_tokenizer_dir, sample):
    tok = TokenizerInfo(llama_tokenizer_dir)
    ps = next(iter(spans.tokenize_records(sample[:1], tok, spans.SpanRules("reference", "chat"))))
    bos = tok.hf.convert_tokens_to_ids("<|begin_of_text|>")
    assert ps.token_ids[:2].tolist() == [bos, bos]


def test_reference_counts_truncation_losses(qwen_tokenizer_dir, data_root):
    """xu2023augmenting has transcripts over 32,768 characters: responses past the cut are lost."""
    tok = TokenizerInfo(qwen_tokenizer_dir)
    recs = [r for r in records.iter_records(f"{data_root}/xu2023augmenting") if len(r.text) > 32768][:2]
    assert recs
    for record, ps in zip(recs, spans.tokenize_records(recs, tok, spans.SpanRules("reference"))):
        kept = record.text[:32768].count("<<") - (record.text[:32768].count("<<") > record.text[:32768].count(">>"))
        assert ps.lost_truncation == record.text.count("<<") - kept > 0


def _mini_record(text, study="toy"):
    return records.Record(
        study=study,
        experiment="exp",
        participant="p1",
        text=text,
        metadata={c: "N/A" for c in metadata.META_COLUMNS},
        source="mem",
        line=1,
    )


def test_runaway_and_merge_are_counted(qwen_tokenizer_dir):
    """With this tokenizer '>>.\\n' is one token, so '>>' is not found and the span runs on."""
    tok = TokenizerInfo(qwen_tokenizer_dir)
    text = "You choose <<A>>.\nThen you choose <<B>> and stop."
    ids = tok.hf(text).input_ids
    assert tok.base_r_id[0] not in ids[: ids.index(tok.base_l_id[0], 3)], "tokenizer no longer merges '>>.\\n'"
    ps = next(iter(spans.tokenize_records([_mini_record(text)], tok, spans.SpanRules("reference"))))
    assert (ps.n_responses, ps.missed, ps.runaway, ps.merged) == (1, 0, 1, 1)
    robust = next(iter(spans.tokenize_records([_mini_record(text)], tok, spans.SpanRules("robust"))))
    assert (robust.n_responses, robust.responses_scored, robust.runaway, robust.merged) == (2, 2, 0, 0)


def test_missed_response_is_counted(tmp_path):
    """A tokenizer that merges ' <<$' hides the opening marker from the reference search."""
    from psych201_jax.testing import tiny_tokenizer

    corpus = ["You pay <<$5>> now and <<$7>> later. Then <<x>> is it."] * 200
    tok_dir = tiny_tokenizer.train_tokenizer_dir(corpus, str(tmp_path / "tok"), vocab_size=300)
    tok = TokenizerInfo(tok_dir)
    text = "You pay <<$5>> now and then <<x>> is it."
    ps = next(iter(spans.tokenize_records([_mini_record(text)], tok, spans.SpanRules("reference"))))
    assert " <<$" in tok.hf.convert_ids_to_tokens(tok.hf(text).input_ids)[2].replace("Ġ", " ")
    assert (ps.n_responses, ps.missed, ps.runaway, ps.merged) == (1, 1, 0, 0)
    robust = next(iter(spans.tokenize_records([_mini_record(text)], tok, spans.SpanRules("robust"))))
    assert robust.responses_scored == 2 and robust.straddle >= 1


def test_imperfect_markup_is_kept_for_the_reference_and_counted(tmp_path, qwen_tokenizer_dir):
    """The reference scripts score these participants (responses missed or cut); so does our reference
    protocol with strict_markers=False, position for position, and the audit counts what is lost."""
    import json

    texts = [
        "You choose:<<A>>. Then you pick <<B>>. End.",  # '<<' without a space: missed
        "You say <<>>. Then you say <<C>>. End.",  # empty response: nothing to score
        "Pick <<A>>. Then pick <<B",
    ]  # unclosed final '<<': cut
    study = tmp_path / "imperfect"
    study.mkdir()
    (study / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "experiment": "e", "participant": i}) for i, t in enumerate(texts)) + "\n"
    )
    assert all(isinstance(r, records.Rejected) for r in records.iter_records(str(study)))
    recs = list(records.iter_records(str(study), strict_markers=False))
    assert all(isinstance(r, records.Record) for r in recs)
    tok = TokenizerInfo(qwen_tokenizer_dir)
    got = list(spans.tokenize_records(recs, tok, spans.SpanRules("reference")))
    for record, ps in zip(recs, got):
        ids, runs = literal_reference(tok.hf, _example(record))
        assert ps.token_ids.tolist() == ids
        assert [np.flatnonzero(ps.response_index == r).tolist() for r in range(ps.n_responses)] == runs
    assert got[0].missed == 1 and got[1].missed == 1 and got[2].lost_truncation == 1
