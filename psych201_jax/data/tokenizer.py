"""The tokenizer of a model: encoding with character offsets, chat templates and the snapshot cache.

``TokenizerInfo`` wraps an HF tokenizer directory with what both span protocols need from it (the marker
ids, BOS, the chat template's assistant-turn delimiters and content positions), and keeps a snapshot of
its Rust backend so later jobs skip importing transformers. A snapshot records what it was made from (the
tokenizer files' hash and the library versions, which its file name is a hash of) and the sha256 of its own
content; one whose record or content does not match is rebuilt with a warning, never used.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
from absl import logging

from psych201_jax import hashing
from psych201_jax.data.cache_dirs import make_private_dirs
from psych201_jax.errors import UserError

__all__ = ["ChatTemplateError", "TokenizerError", "TokenizerInfo"]

# Every tokenizer file the converter copies; the tokenizer fingerprint covers these plus config.json.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)


class TokenizerError(UserError, FileNotFoundError):
    """The tokenizer directory does not exist."""


class ChatTemplateError(UserError, ValueError):
    """template=chat with a tokenizer whose chat template cannot render the reference's string messages."""


class TokenizerInfo:
    """An HF tokenizer directory plus what both protocols need from it.

    Encoding goes through the Rust ``tokenizers`` backend in batches (identical ids to
    ``tok([text]).input_ids``, checked in the tests) so the host keeps up with the accelerator.

    With ``snapshot_dir``, the backend exactly as transformers built it, and the few facts the
    protocols read from the HF tokenizer, are saved there under the tokenizer's fingerprint and the
    transformers and tokenizers versions; a later job loads that snapshot with ``tokenizers`` alone
    and skips importing transformers (1.3 s of a short job's start-up). The HF tokenizer itself is
    built only when something needs it (chat templates).
    """

    def __init__(self, path: str, snapshot_dir: str = ""):
        if not os.path.isdir(path):
            raise TokenizerError(f"tokenizer directory {path!r} does not exist")
        self.path = path
        self.sha256 = hashing.hash_files(path, TOKENIZER_FILES + ("config.json",))
        self._hf: Any = None
        self._chat_markers: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._trims: bool | None = None
        made_from = self._snapshot_source() if snapshot_dir else None
        key = hashing.hash_json(made_from)[:32] if made_from else ""
        snapshot = os.path.join(os.path.expanduser(snapshot_dir), f"{key}.json") if key else ""
        facts = _read_snapshot(snapshot, made_from) if snapshot else None
        fast = _backend_from_str(facts["backend"]) if facts is not None else None
        if facts is not None and fast is None:
            logging.warning("tokenizer snapshot %s: its backend does not parse; building it again", snapshot)
        if facts is None or fast is None:
            facts = self._facts_from_hf()
            fast = facts["backend"]
            if snapshot:
                _write_snapshot(snapshot, facts, made_from)
        self.fast: Any = fast
        self.base_l_id: tuple[int, ...] = tuple(facts["base_l_id"])
        self.base_r_id: tuple[int, ...] = tuple(facts["base_r_id"])
        self.bos_token: str | None = facts["bos_token"]
        self.has_template: bool = facts["has_template"]

    @property
    def hf(self) -> Any:
        """The transformers tokenizer (loaded on first use when the snapshot was used)."""
        if self._hf is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        return self._hf

    def _facts_from_hf(self) -> dict:
        hf = self.hf
        fast = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
        if fast is None:
            raise ValueError(f"{self.path}: a fast (tokenizers-backed) tokenizer is required for offsets")
        return dict(
            base_l_id=list(hf(" <<", add_special_tokens=False).input_ids),
            base_r_id=list(hf(">>", add_special_tokens=False).input_ids),
            bos_token=getattr(hf, "bos_token", None),
            has_template=bool(getattr(hf, "chat_template", None)),
            backend=fast,  # the live object here; its JSON in a snapshot
        )

    def _snapshot_source(self) -> list | None:
        """What a snapshot is made from (its file name is a hash of it): the snapshot format, the tokenizer
        files' hash and the transformers and tokenizers versions; None (no snapshot) when those are unknown."""
        from importlib import metadata

        try:
            versions = [metadata.version(name) for name in ("transformers", "tokenizers")]
        except metadata.PackageNotFoundError:  # not installed as distributions
            return None
        return [_SNAPSHOT_FORMAT, self.sha256, *versions]

    # -- encoding -----------------------------------------------------------------------------------
    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: Sequence[bool] | bool = True
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(ids int32 [T], char offsets int32 [T, 2])] per text."""
        flags = [add_special_tokens] * len(texts) if isinstance(add_special_tokens, bool) else list(add_special_tokens)
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(texts)
        for flag in (True, False):
            idx = [i for i, f in enumerate(flags) if f == flag]
            if not idx:
                continue
            encs = self.fast.encode_batch([texts[i] for i in idx], add_special_tokens=flag)
            for i, enc in zip(idx, encs):
                out[i] = (np.asarray(enc.ids, dtype=np.int32), np.asarray(enc.offsets, dtype=np.int32).reshape(-1, 2))
        return out  # type: ignore[return-value]

    # -- chat ---------------------------------------------------------------------------------------
    def template_kwargs(self) -> dict:
        """The reference's kwargs: no generation prompt; ``enable_thinking=False`` iff the template knows it."""
        if not self.has_template:
            raise ValueError(f"{self.path}: tokenizer has no chat template; use template=none")
        kwargs: dict = dict(tokenize=False, add_generation_prompt=False)
        if "enable_thinking" in (self.hf.chat_template or ""):
            kwargs["enable_thinking"] = False
        return kwargs

    def check_chat_template(self, *, reference: bool = False) -> None:
        """Raises ChatTemplateError unless the template renders plain-string message content (the reference
        passes strings; vision-language processors' templates may take only lists of content parts) and,
        with ``reference``, puts tokens before an assistant turn's content (the reference protocol finds
        responses by those tokens; Mistral's ``[INST] … [/INST]answer`` has none)."""
        probe = "\ue010probe\ue011"
        advice = "score this model with template=none, as the study scores its vision-language models"
        try:
            rendered = self.render([{"role": "user", "content": probe}])
        except Exception as err:  # jinja raises many types; any failure means the same thing here
            raise ChatTemplateError(
                f"{self.path}: the chat template fails on plain-string message content ({type(err).__name__}: "
                f"{err}); it may take only lists of content parts; {advice}"
            ) from None
        if probe not in rendered:
            raise ChatTemplateError(
                f"{self.path}: the chat template drops plain-string message content (it may take only lists of "
                f"content parts); {advice}"
            )
        if not reference:
            return
        try:
            opening = self.chat_markers()[0]
        except ValueError as err:
            raise ChatTemplateError(f"{self.path}: {err}; score it with protocol=robust") from None
        if not opening:
            raise ChatTemplateError(
                f"{self.path}: the chat template puts no tokens before an assistant turn's content, so the "
                "reference protocol cannot find where a response opens; score it with protocol=robust"
            )

    def render(self, messages: list[dict[str, str]]) -> str:
        """The chat template applied to ``messages``; a ValueError (one participant's rejection) where the
        template refuses them (Gemma's and Mistral's raise when turns do not alternate)."""
        import jinja2

        try:
            return cast(str, self.hf.apply_chat_template(messages, **self.template_kwargs()))  # a str
        except jinja2.TemplateError as err:
            raise ValueError(f"the chat template refuses this transcript's messages: {err}") from None

    def chat_markers(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The reference's ``build_assistant_markers``: ids opening and closing an assistant turn."""
        if self._chat_markers is None:
            a_mark, t_mark = "\ue000ASSISTANT_CONTENT\ue001", "\ue002TRAILING_USER\ue003"
            user_only = self.render([{"role": "user", "content": "u"}])
            with_asst = self.render(
                [
                    {"role": "user", "content": "u"},
                    {"role": "assistant", "content": a_mark},
                    {"role": "user", "content": t_mark},
                ]
            )
            ids_user = self.hf(user_only, add_special_tokens=False).input_ids
            enc = self.hf(with_asst, add_special_tokens=False, return_offsets_mapping=True)
            ids_full, offsets = enc.input_ids, enc.offset_mapping
            if ids_full[: len(ids_user)] != ids_user:
                raise ValueError(f"{self.path}: chat template tokenises non-prefix; marker ids unreliable")
            mstart = with_asst.index(a_mark)
            mend = mstart + len(a_mark)
            tstart = with_asst.index(t_mark)
            first = next(i for i, (a, _) in enumerate(offsets) if a >= mstart)
            after = next(i for i, (a, _) in enumerate(offsets) if a >= mend)
            trailing_first = next(i for i, (a, _) in enumerate(offsets) if a >= tstart)
            self._chat_markers = (tuple(ids_full[len(ids_user) : first]), tuple(ids_full[after:trailing_first]))
        return self._chat_markers

    def template_trims(self) -> bool:
        """Whether the chat template strips message content (Llama 3's ``| trim``)."""
        if self._trims is None:
            rendered = self.render(
                [
                    {"role": "user", "content": " \ue000u\ue001 "},
                    {"role": "assistant", "content": " \ue000a\ue001 "},
                    {"role": "user", "content": " \ue000v\ue001 "},
                ]
            )
            self._trims = " \ue000a\ue001 " not in rendered
        return self._trims

    def render_with_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """(rendered chat, [start, end) of every message's content in it), in message order.

        Positions come from rendering placeholder contents; the real rendering must equal the
        placeholder rendering with contents substituted, else a ValueError (the template does
        something content-dependent we cannot locate reliably).
        """
        holders = [f"\ue000{i}\ue001" for i in range(len(messages))]
        layout = self.render([{"role": m["role"], "content": h} for m, h in zip(messages, holders)])
        trims = self.template_trims()
        pieces, spans, cursor, length = [], [], 0, 0
        for message, holder in zip(messages, holders):
            at = layout.index(holder, cursor)
            pieces.append(layout[cursor:at])
            length += at - cursor
            content = message["content"].strip() if trims else message["content"]
            pieces.append(content)
            spans.append((length, length + len(content)))
            length += len(content)
            cursor = at + len(holder)
        pieces.append(layout[cursor:])
        rendered = "".join(pieces)
        if rendered != self.render(messages):
            raise ValueError("chat template output depends on message content; cannot locate responses")
        return rendered, spans


_SNAPSHOT_FORMAT = 2  # 2: records what it was made from and the sha256 of its content
_FACTS = ("backend", "base_l_id", "base_r_id", "bos_token", "has_template")


def _backend_from_str(text: Any) -> Any:
    """The backend of a snapshot, or None if it does not parse (then it is rebuilt through transformers)."""
    import tokenizers

    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception:  # the Rust parser raises its own exception types
        return None


def _content_sha256(facts: dict) -> str:
    return hashing.hash_json({name: facts[name] for name in _FACTS})


def _read_snapshot(path: str, made_from: list | None) -> dict | None:
    """A tokenizer snapshot's facts; None when it is absent, or (with a warning) unreadable, made from other
    tokenizer files or library versions than ``made_from``, or its content does not match its sha256."""
    try:
        with open(path, encoding="utf-8") as f:
            facts = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        why = f"unreadable ({type(err).__name__}: {' '.join(str(err).split())[:120]})"
    else:
        if not isinstance(facts, dict) or not {*_FACTS, "made_from", "sha256"} <= set(facts):
            why = "not a snapshot of this version"
        elif facts["made_from"] != made_from:
            why = "made from other tokenizer files or library versions than its name says"
        elif facts["sha256"] != _content_sha256(facts):
            why = "its content does not match its sha256 (edited or damaged)"
        else:
            return facts
    logging.warning("tokenizer snapshot %s: %s; building it again", path, why)
    return None


def _write_snapshot(path: str, facts: dict, made_from: list | None) -> None:
    """Writes a snapshot atomically (a concurrent reader sees the old file or the whole new one), with what
    it is made from and its content's sha256; its folder is created 0700. A cache that cannot be written only
    costs the next job its start-up time."""
    data = dict(facts, backend=facts["backend"].to_str(), made_from=made_from)
    data["sha256"] = _content_sha256(data)
    tmp = ""
    try:
        make_private_dirs(os.path.dirname(path))
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")  # unique across hosts too
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        if tmp:
            with contextlib.suppress(OSError):
                os.remove(tmp)
