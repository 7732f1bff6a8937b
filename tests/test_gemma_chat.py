"""The chat-template condition with Gemma's chat template (no network: the template text on a tiny tokenizer).

Gemma 2's template (google/gemma-2-*-it, as gemma-7b-it's) refuses a system turn and any turns that do not
alternate user / assistant, and trims each content. The scorer's messages are user and assistant turns only
(the persona is a prefix of the first user turn), so every transcript of the bundled sample renders, and the
assistant-turn markers are Gemma's ``<start_of_turn>model`` / ``<end_of_turn>``.
"""

import os
import shutil

import pytest

from psych201_jax import defaults
from psych201_jax.conditions import Protocol
from psych201_jax.data import records, spans, transcripts
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.types import ParticipantSpans

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


@pytest.fixture(scope="module")
def gemma_tok(llama_tokenizer_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gemma_tok"))
    shutil.copytree(llama_tokenizer_dir, out, dirs_exist_ok=True)
    for name in os.listdir(out):
        if name == "chat_template.jinja":
            os.remove(os.path.join(out, name))
    with open(os.path.join(out, "chat_template.jinja"), "w") as fh:
        fh.write(GEMMA2_TEMPLATE)
    tok = TokenizerInfo(out)
    assert tok.hf.chat_template == GEMMA2_TEMPLATE
    return tok


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
