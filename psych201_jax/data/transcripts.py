"""Stage 2: a record's text → the string (or chat messages) a protocol tokenizes.

The ``reference`` functions copy the published scripts character for character (docs/reference-protocol.md):
persona prefix, then the 32,768-character cut, the four replacements, the cut of an unclosed final
``<<``, removal of whitespace before ``>>``, and in chat mode a trailing ``"."`` and the user/assistant
split. The ``robust`` protocol uses the text as recorded and leaves truncation to the token stage.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from psych201_jax.conditions import Protocol
from psych201_jax.data.metadata import persona_prefix
from psych201_jax.data.records import GLOBAL_REPLACEMENTS

REFERENCE_MAX_CHARS = 32768

_SPACE_BEFORE_CLOSE = re.compile(r"\s+(?=>>)")
_MARKER_SPLIT = re.compile(r"(<<|>>)")
_RESPONSE = re.compile(r"<<(.*?)>>", re.DOTALL)


def with_persona(text: str, persona: Mapping[str, str] | None, protocol: Protocol = Protocol.ROBUST) -> tuple[str, int]:
    """(persona prefix + text, prefix length). ``persona`` None means no prefix."""
    prefix = persona_prefix(persona, protocol) if persona is not None else ""
    return prefix + text, len(prefix)


def reference_truncate(text: str, max_chars: int = REFERENCE_MAX_CHARS, *, chat: bool = False) -> str:
    """The reference's ``safe_truncate_angle`` (eval.py; eval_instruct.py adds the final ``"."``)."""
    t = text[:max_chars]
    for old, new in GLOBAL_REPLACEMENTS:
        t = t.replace(old, new)
    if t.count("<<") > t.count(">>"):
        last_open = t.rfind("<<")
        if last_open != -1:
            t = t[:last_open]
    t = _SPACE_BEFORE_CLOSE.sub("", t)
    return t + "." if chat else t


def split_into_messages(text: str) -> list[dict[str, str]]:
    """The reference's user/assistant split on ``<<``/``>>``; empty buffers are skipped."""
    messages: list[dict[str, str]] = []
    role, buffer = "user", ""
    for part in _MARKER_SPLIT.split(text):
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


def response_char_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) character ranges of each response's content (between ``<<`` and ``>>``)."""
    return [(m.start(1), m.end(1)) for m in _RESPONSE.finditer(text)]


def ends_with_response(text: str) -> bool:
    """True when nothing but whitespace follows the last ``>>`` (the chat split then ends on the
    assistant, and templates like Qwen3's treat that turn differently)."""
    end = text.rfind(">>")
    return end != -1 and not text[end + 2 :].strip()
