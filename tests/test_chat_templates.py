"""The chat-template condition with Gemma's and Mistral's chat templates (no network: the template texts on a
tiny tokenizer).

Gemma 2's template (google/gemma-2-*-it, as gemma-7b-it's) refuses a system turn and any turns that do not
alternate user / assistant, and trims each content. The scorer's messages are user and assistant turns only
(the persona is a prefix of the first user turn), so every transcript of the bundled sample renders, and the
assistant-turn markers are Gemma's ``<start_of_turn>model`` / ``<end_of_turn>``.
"""

import dataclasses
import os
import shutil

import pytest

from psych201_jax import defaults
from psych201_jax.conditions import Protocol
from psych201_jax.data import records, spans, transcripts
from psych201_jax.data.pipeline import SpanPipeline
from psych201_jax.data.tokenizer import ChatTemplateError, TokenizerInfo
from psych201_jax.types import ParticipantSpans, Rejected

GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


# Mistral-7B-Instruct-v0.1's template: the answer follows ``[/INST]`` with no tokens of its own.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + (eos_token or '') }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def _with_template(base_dir: str, out: str, template: str) -> TokenizerInfo:
    shutil.copytree(base_dir, out, dirs_exist_ok=True)
    for name in os.listdir(out):
        if name == "chat_template.jinja":
            os.remove(os.path.join(out, name))
    with open(os.path.join(out, "chat_template.jinja"), "w") as fh:
        fh.write(template)
    tok = TokenizerInfo(out)
    assert tok.hf.chat_template == template
    return tok


@pytest.fixture(scope="module")
def gemma_tok(llama_tokenizer_dir, tmp_path_factory):
    return _with_template(llama_tokenizer_dir, str(tmp_path_factory.mktemp("gemma_tok")), GEMMA2_TEMPLATE)


@pytest.fixture(scope="module")
def mistral_tok(llama_tokenizer_dir, tmp_path_factory):
    return _with_template(llama_tokenizer_dir, str(tmp_path_factory.mktemp("mistral_tok")), MISTRAL_TEMPLATE)


def test_gemma2_template_passes_the_chat_check_and_marks_model_turns(gemma_tok):
    gemma_tok.check_chat_template()
    opening, closing = (gemma_tok.hf.decode(list(ids)) for ids in gemma_tok.chat_markers())
    assert opening.endswith("<start_of_turn>model\n")
    assert closing.startswith("<end_of_turn>\n") and closing.endswith("<start_of_turn>user\n")
    assert gemma_tok.template_trims()


@pytest.mark.parametrize("protocol", ["reference", "robust"])
def test_every_bundled_transcript_renders_with_gemma2s_template(gemma_tok, protocol):
    items = list(
        spans.tokenize_records(
            records.iter_records(defaults.SAMPLE_DATA, strict_markers=protocol == "robust"),
            gemma_tok,
            spans.SpanRules(Protocol(protocol), template="chat"),
        )
    )
    assert len(items) == 15 and all(isinstance(x, ParticipantSpans) for x in items), items
    assert all(x.n_responses > 0 for x in items)


def test_scorer_messages_alternate_and_carry_no_system_turn():
    """What Gemma's template needs of a transcript: user first, then strict alternation, no system role."""
    text = "Persona: 30 years.\nYou see A or B. <<A>> Correct. Again? <<B>>"
    messages = transcripts.split_into_messages(transcripts.reference_truncate(text, chat=True))
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]


def test_a_transcript_the_template_refuses_is_one_rejection(gemma_tok):
    """A transcript opening with a response (assistant first) makes Gemma's template raise: that participant is
    rejected with the template's reason, and the job goes on with the others."""
    good = next(iter(records.iter_records(defaults.SAMPLE_DATA)))
    bad = dataclasses.replace(good, participant="p-bad", text="<<A>> then the task. <<B>>")
    rules = spans.SpanRules(Protocol.ROBUST, template="chat")
    items = list(spans.tokenize_records([bad, good], gemma_tok, rules))
    assert isinstance(items[0], Rejected) and "chat template refuses" in items[0].reason, items[0]
    assert "alternate" in items[0].reason and isinstance(items[1], ParticipantSpans)


def test_mistral_reference_chat_is_one_error_and_robust_scores(mistral_tok):
    """Mistral's answer follows ``[/INST]`` with no opening tokens: the reference protocol cannot find responses
    (one ChatTemplateError before any participant); the robust protocol locates them by characters."""
    with pytest.raises(ChatTemplateError, match="protocol=robust"):
        SpanPipeline(data=defaults.SAMPLE_DATA, rules=spans.SpanRules(Protocol.REFERENCE, template="chat")).spans(
            mistral_tok
        )
    mistral_tok.check_chat_template()  # plain-string content renders
    pipeline = SpanPipeline(data=defaults.SAMPLE_DATA, rules=spans.SpanRules(Protocol.ROBUST, template="chat"))
    items = list(pipeline.spans(mistral_tok))
    assert len(items) == 15 and all(isinstance(x, ParticipantSpans) and x.n_responses > 0 for x in items)
