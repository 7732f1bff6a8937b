"""Stage 3: transcripts → token ids + the token positions of every human response.

Two protocols (``Protocol.name``):

``reference`` — exactly the published scripts: tokenise the processed string with special tokens, then
  search left to right for the token ids of `` <<`` and ``>>`` (chat: the template's assistant-turn
  delimiters found from placeholder messages) and label everything in between. Its failure modes are
  kept and counted: a response whose `` <<`` merged into another token is *missed*; a ``>>`` that
  merged with what follows makes the span *run away* to the next standalone ``>>``, swallowing
  context and *merging* the next response. A response is a maximal run of labelled positions.

``robust`` — each response's tokens come from character offsets: the tokens overlapping the
  characters between ``<<`` and ``>>``. A token that also covers marker or context characters is
  kept and reported as a *straddle*. Truncation is by a token budget on the experiment text, never
  inside a response; the persona prefix does not count against the budget; chat mode adds no second
  BOS.

Both give per participant the token ids, a per-token response index (-1 outside any response) and the
counts the audit reports. A position-0 token can never be scored (nothing predicts it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import numpy as np

from psych201_jax import conditions, hashing
from psych201_jax.data import transcripts
from psych201_jax.errors import UserError
from psych201_jax.types import Excluded, ParticipantSpans, Record, Rejected

PROTOCOLS = tuple(p.value for p in conditions.Protocol)
TEMPLATES = tuple(t.value for t in conditions.Template)
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


class ChatTemplateError(UserError, ValueError):
    """template=chat with a tokenizer whose chat template cannot render the reference's string messages."""


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How records become token spans.

    name: reference | robust.  template: none | chat.
    max_chars: the reference's character cut (applied after the persona prefix, as it does).
    token_budget: robust only; tokens of experiment text kept (persona prefix excluded). None = no cut.
    """

    name: str = "reference"
    template: str = "none"
    max_chars: int = transcripts.REFERENCE_MAX_CHARS
    token_budget: int | None = None

    def __post_init__(self):
        if self.name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.name!r}; expected one of {PROTOCOLS}")
        if self.template not in TEMPLATES:
            raise ValueError(f"unknown template {self.template!r}; expected one of {TEMPLATES}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"token_budget must be positive, got {self.token_budget}")


# ---------------------------------------------------------------------------------------------------
# Tokenizer


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
            raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
        self.path = path
        self.sha256 = hashing.hash_files(path, TOKENIZER_FILES + ("config.json",))
        self._hf: Any = None
        self._chat_markers: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self._trims: bool | None = None
        key = self._snapshot_key() if snapshot_dir else None
        snapshot = os.path.join(os.path.expanduser(snapshot_dir), f"{key}.json") if key else ""
        facts = _read_snapshot(snapshot) if snapshot else None
        fast = _backend_from_str(facts["backend"]) if facts is not None else None
        if facts is None or fast is None:
            facts = self._facts_from_hf()
            fast = facts["backend"]
            if snapshot:
                _write_snapshot(snapshot, facts)
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

    def _snapshot_key(self) -> str | None:
        """The snapshot's file name: None (no snapshot) when the library versions are unknown."""
        from importlib import metadata

        try:
            versions = [metadata.version(name) for name in ("transformers", "tokenizers")]
        except metadata.PackageNotFoundError:  # not installed as distributions
            return None
        return hashing.hash_json([_SNAPSHOT_FORMAT, self.sha256, *versions])[:32]

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

    def check_chat_template(self) -> None:
        """Raises ChatTemplateError unless the template renders plain-string message content (the reference
        passes strings; vision-language processors' templates may take only lists of content parts)."""
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

    def render(self, messages: list[dict[str, str]]) -> str:
        return cast(str, self.hf.apply_chat_template(messages, **self.template_kwargs()))  # tokenize=False: a str

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


_SNAPSHOT_FORMAT = 1


def _backend_from_str(text: Any) -> Any:
    """The backend of a snapshot, or None if it does not parse (then it is rebuilt through transformers)."""
    import tokenizers

    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception:  # the Rust parser raises its own exception types
        return None


def _read_snapshot(path: str) -> dict | None:
    """A tokenizer snapshot's facts, or None when it is absent or unreadable (then it is rebuilt)."""
    try:
        with open(path, encoding="utf-8") as f:
            facts = json.load(f)
        if not isinstance(facts, dict) or not {"backend", "base_l_id", "base_r_id", "bos_token", "has_template"} <= set(
            facts
        ):
            return None
        return facts
    except (OSError, ValueError):
        return None


def _write_snapshot(path: str, facts: dict) -> None:
    """Writes a snapshot atomically (a concurrent reader sees the old file or the whole new one); a cache
    that cannot be written only costs the next job its start-up time."""
    data = dict(facts, backend=facts["backend"].to_str())
    tmp = ""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")  # unique across hosts too
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        if tmp:
            with contextlib.suppress(OSError):
                os.remove(tmp)


# ---------------------------------------------------------------------------------------------------
# Reference labelling


def _match_starts(ids: np.ndarray, pattern: Sequence[int]) -> np.ndarray:
    """Sorted start indices where ``pattern`` occurs in ``ids`` (overlapping matches included)."""
    m = len(pattern)
    if m == 0 or len(ids) < m:
        return np.zeros(0, dtype=np.int64)
    hits = ids[: len(ids) - m + 1] == pattern[0]
    for j in range(1, m):
        hits &= ids[j : len(ids) - m + 1 + j] == pattern[j]
    return np.flatnonzero(hits)


def reference_labels(ids: np.ndarray, l_id: Sequence[int], r_id: Sequence[int]) -> np.ndarray:
    """bool [T]: positions the reference's ``collate`` labels (greedy left-to-right subsequence search)."""
    n = len(ids)
    labels = np.zeros(n, dtype=bool)
    if not l_id:
        raise ValueError("empty opening-marker id sequence")
    lefts, rights = _match_starts(ids, l_id), _match_starts(ids, r_id)
    i = 0
    while True:
        k = np.searchsorted(lefts, i)
        if k == len(lefts):
            break
        content_start = int(lefts[k]) + len(l_id)
        m = np.searchsorted(rights, content_start)
        end = int(rights[m]) if m < len(rights) else n
        labels[content_start:end] = True
        i = end + len(r_id)
    return labels


def runs_to_response_index(labels: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Maximal runs of labelled positions ≥ 1 → (response index [T], [(start, end)] token runs)."""
    scorable = labels.copy()
    if len(scorable):
        scorable[0] = False  # logits[:-1] vs labels[1:]: position 0 is never scored
    padded = np.concatenate([[False], scorable, [False]]).astype(np.int8)
    edges = np.diff(padded)
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    index = np.full(len(labels), -1, dtype=np.int32)
    for r, (a, b) in enumerate(zip(starts, ends)):
        index[a:b] = r
    return index, list(zip(starts.tolist(), ends.tolist()))


def _diagnose_runs(
    runs: list[tuple[int, int]], offsets: np.ndarray, responses: list[tuple[int, int]]
) -> tuple[int, int, int]:
    """(missed, runaway, merged) of labelled token runs against response character ranges."""
    if not responses:
        return 0, len(runs), 0
    cs = np.asarray([s for s, _ in responses])
    ce = np.asarray([e for _, e in responses])
    covered = np.zeros(len(responses), dtype=bool)
    runaway = merged = 0
    for a, b in runs:
        start, end = int(offsets[a, 0]), int(offsets[b - 1, 1])
        first = int(np.searchsorted(ce, start, side="right"))  # first response ending after start
        last = int(np.searchsorted(cs, end, side="left")) - 1  # last response starting before end
        if first > last:
            runaway += 1
            continue
        covered[first : last + 1] = True
        merged += last - first
        if last > first or start < cs[first] or end > ce[last]:
            runaway += 1
    return int((~covered).sum()), runaway, merged


# ---------------------------------------------------------------------------------------------------
# Robust labelling


def offsets_to_response_index(offsets: np.ndarray, responses: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-token response index from character offsets, and which tokens straddle (bool [T]).

    A token belongs to response j when it overlaps j's content characters; zero-width (special)
    tokens belong to none.
    """
    n = len(offsets)
    index = np.full(n, -1, dtype=np.int32)
    if not responses or n == 0:
        return index, np.zeros(n, dtype=bool)
    cs = np.asarray([s for s, _ in responses])
    ce = np.asarray([e for _, e in responses])
    ts, te = offsets[:, 0], offsets[:, 1]
    j = np.searchsorted(ce, ts, side="right")
    valid = (j < len(responses)) & (te > ts)
    jc = np.minimum(j, len(responses) - 1)
    hit = valid & (cs[jc] < te)
    index[hit] = jc[hit]
    return index, hit & ((ts < cs[jc]) | (te > ce[jc]))


def _tokens_ending_by(offsets: np.ndarray, char: int) -> int:
    """Length of the leading run of tokens that end at or before character ``char``."""
    beyond = offsets[:, 1] > char
    return int(np.argmax(beyond)) if beyond.any() else len(offsets)


def _budget_cut(
    index: np.ndarray, offsets: np.ndarray, text_start_char: int, budget: int | None, marker_starts: np.ndarray
) -> int:
    """Token count to keep: prefix tokens + at most ``budget`` text tokens, never cutting a response."""
    n = len(index)
    if budget is None:
        return n
    cut = _tokens_ending_by(offsets, text_start_char) + budget  # prefix and leading BOS are free
    if cut >= n:
        return n
    r = index[cut]
    if r >= 0 and index[cut - 1] == r:
        # The cut falls inside response r: keep only the tokens before its opening marker.
        cut = _tokens_ending_by(offsets, int(marker_starts[r]))
    return cut


# ---------------------------------------------------------------------------------------------------
# Per participant


@dataclasses.dataclass(frozen=True)
class _Prepared:
    text: str  # what gets tokenised
    add_special: bool
    responses: list[tuple[int, int]]  # content character ranges in ``text``
    responses_text: int
    lost_chars: int  # responses removed before tokenisation (reference character cut)
    text_start: int  # characters before the experiment text (chat header, persona prefix): outside the budget
    marker_starts: list[int]  # char index of each response's opening marker in ``text``


def _prepare(record: Record, persona: Mapping[str, str] | None, protocol: Protocol, tok: TokenizerInfo) -> _Prepared:
    n_text = record.text.count("<<")
    full, prefix_len = transcripts.with_persona(record.text, persona)
    if protocol.name == "reference":
        chat = protocol.template == "chat"
        processed = transcripts.reference_truncate(full, protocol.max_chars, chat=chat)
        kept = processed.count("<<")
        if not chat:
            spans = transcripts.response_char_spans(processed)
            return _Prepared(processed, True, spans, n_text, n_text - kept, 0, [s - 2 for s, _ in spans])
        messages = transcripts.split_into_messages(processed)
        rendered, spans = tok.render_with_spans(messages)
        spans = [s for s, m in zip(spans, messages) if m["role"] == "assistant"]
        return _Prepared(rendered, True, spans, n_text, n_text - kept, 0, [s for s, _ in spans])
    # robust
    if protocol.template == "none":
        spans = transcripts.response_char_spans(full)
        return _Prepared(full, True, spans, n_text, 0, prefix_len, [s - 2 for s, _ in spans])
    text = full + "." if transcripts.ends_with_response(full) else full
    messages = transcripts.split_into_messages(text)
    rendered, all_spans = tok.render_with_spans(messages)
    spans = [s for s, m in zip(all_spans, messages) if m["role"] == "assistant"]
    add = not (tok.bos_token and rendered.startswith(tok.bos_token))
    text_start = all_spans[0][0] + prefix_len  # template header and persona prefix are outside the budget
    return _Prepared(rendered, add, spans, n_text, 0, text_start, [s for s, _ in spans])


def _label(
    record: Record, prep: _Prepared, ids: np.ndarray, offsets: np.ndarray, protocol: Protocol, tok: TokenizerInfo
) -> ParticipantSpans:
    if protocol.name == "reference":
        l_id, r_id = tok.chat_markers() if protocol.template == "chat" else (tok.base_l_id, tok.base_r_id)
        labels = reference_labels(ids, l_id, r_id)
        index, runs = runs_to_response_index(labels)
        missed, runaway, merged = _diagnose_runs(runs, offsets, prep.responses)
        return ParticipantSpans(
            study=record.study,
            experiment=record.experiment,
            participant=record.participant,
            token_ids=ids,
            response_index=index,
            n_responses=len(runs),
            responses_text=prep.responses_text,
            responses_scored=len(runs),
            lost_truncation=prep.lost_chars,
            missed=missed,
            runaway=runaway,
            merged=merged,
            source=record.source,
            line=record.line,
        )
    index, straddling = offsets_to_response_index(offsets, prep.responses)
    cut = _budget_cut(index, offsets, prep.text_start, protocol.token_budget, np.asarray(prep.marker_starts))
    straddle = int(straddling[:cut].sum())  # only tokens that are kept
    ids, index = ids[:cut], index[:cut]
    n_kept = len(prep.responses) if cut == len(offsets) else int(index.max(initial=-1)) + 1
    scorable = index[1:]
    scored = int(np.unique(scorable[scorable >= 0]).size)
    missed = n_kept - scored
    index = index.copy()
    if len(index):
        index[0] = -1
    return ParticipantSpans(
        study=record.study,
        experiment=record.experiment,
        participant=record.participant,
        token_ids=ids,
        response_index=index,
        n_responses=n_kept,
        responses_text=prep.responses_text,
        responses_scored=scored,
        lost_truncation=prep.responses_text - n_kept,
        missed=missed,
        straddle=straddle,
        source=record.source,
        line=record.line,
    )


def tokenize_records(
    records: Iterable[Record | Rejected],
    tok: TokenizerInfo,
    protocol: Protocol,
    *,
    persona_of=None,
    batch_size: int = 64,
) -> Iterator[ParticipantSpans | Rejected]:
    """Streams records → ``ParticipantSpans`` or ``Rejected`` (passed through or made here), in input order.

    persona_of: None for no persona, else a function record → the metadata to interview on, None for no
    prefix, or an ``Excluded`` saying why the participant is not in this condition (see
    ``metadata.persona_selector``).
    Texts are encoded in batches of ``batch_size`` (one Rust call, both cores), never across studies.
    """
    pending: list[tuple[Record, _Prepared] | Rejected] = []
    n_prepared = 0

    def flush():
        nonlocal n_prepared
        prepared = [p for p in pending if not isinstance(p, Rejected)]
        encoded = iter(tok.encode_batch([p.text for _, p in prepared], [p.add_special for _, p in prepared]))
        for entry in pending:
            if isinstance(entry, Rejected):
                yield entry
            else:
                ids, offsets = next(encoded)
                yield _label(entry[0], entry[1], ids, offsets, protocol, tok)
        pending.clear()
        n_prepared = 0

    for record in records:
        if pending and _study(pending[-1]) != record.study:
            yield from flush()  # batches stay within a study so per-study timings stay honest
        if isinstance(record, Rejected):
            pending.append(record)
            continue
        persona = persona_of(record) if persona_of is not None else None
        if isinstance(persona, Excluded):
            pending.append(_reject(record, f"excluded by the persona condition: {persona.reason}"))
            continue
        try:
            pending.append((record, _prepare(record, persona, protocol, tok)))
            n_prepared += 1
        except ValueError as err:
            pending.append(_reject(record, str(err)))
        if n_prepared >= batch_size or len(pending) >= 4 * batch_size:
            yield from flush()
    if pending:
        yield from flush()


def _study(entry: tuple[Record, _Prepared] | Rejected) -> str:
    return entry.study if isinstance(entry, Rejected) else entry[0].study


def _reject(record: Record, reason: str) -> Rejected:
    return Rejected.of(record, reason)
