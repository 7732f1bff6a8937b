"""The one span pipeline: records → persona → transcripts → token spans → budget.

``psych201-score``, ``psych201-audit`` and the sweep all read their participants through a
``SpanPipeline``, so the audit of a condition counts exactly what the job of that condition scores.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator

from psych201_jax.conditions import Persona, Protocol
from psych201_jax.data import metadata, records, spans
from psych201_jax.data.tokenizer import TokenizerInfo
from psych201_jax.types import ParticipantSpans, Record, Rejected

__all__ = ["SpanPipeline"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpanPipeline:
    """What turns a data source into token spans under one condition.

    rules: protocol, template, character cut and token budget.  persona / persona_subset / seed: the persona
    condition (a shuffled persona is drawn once, over every record, with ``seed``).  max_line_bytes: under
    ``robust``, a longer input line is rejected unparsed.
    """

    data: str
    rules: spans.SpanRules
    persona: Persona = Persona.NONE
    persona_subset: bool = False
    seed: int = 0
    max_line_bytes: int | None = None

    def records(self) -> Iterator[Record | Rejected]:
        """Every input record; ``reference`` keeps imperfect markup, as the study's scripts score it."""
        robust = self.rules.protocol == Protocol.ROBUST
        return records.iter_records(
            self.data, strict_markers=robust, max_line_bytes=self.max_line_bytes if robust else None
        )

    @functools.cached_property
    def persona_of(self):
        """record → the metadata to interview on, None, or why it is excluded (None: no persona)."""
        return metadata.persona_selector(
            self.persona.value,
            subset_only=self.persona_subset,
            seed=self.seed,
            records=self.records(),
            protocol=self.rules.protocol,
        )

    def check_template(self, tok: TokenizerInfo) -> None:
        """A chat template that cannot serve this condition is one ChatTemplateError, before any participant."""
        if self.rules.chat:
            tok.check_chat_template(reference=self.rules.protocol == Protocol.REFERENCE)

    def spans(
        self, tok: TokenizerInfo, items: Iterable[Record | Rejected] | None = None
    ) -> Iterator[ParticipantSpans | Rejected]:
        """Token spans of ``items`` (default: every record), in input order."""
        self.check_template(tok)
        source = self.records() if items is None else items
        return spans.tokenize_records(source, tok, self.rules, persona_of=self.persona_of)
