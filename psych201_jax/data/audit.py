"""Per-study audit of the token-span stage: what was read, rejected, scored, lost and mislabelled."""

from __future__ import annotations

import collections
import csv
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator

from psych201_jax.types import SPAN_COUNTERS, ParticipantSpans, Rejected

COLUMNS = ("study", "participants", "rejected", *SPAN_COUNTERS, "tokens", "tokens_per_s")


@dataclasses.dataclass
class StudyAudit:
    """Counts for one study: participants, rejections, the ``SPAN_COUNTERS`` summed over its participants,
    tokens, and ``seconds``, the wall time spent reading and tokenising it."""

    study: str
    participants: int = 0
    rejected: int = 0
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, item: ParticipantSpans | Rejected) -> None:
        self.participants += 1
        if isinstance(item, Rejected):
            self.rejected += 1
            return
        self.counts.update(item.counters())
        self.tokens += len(item.token_ids)

    def merge(self, other: StudyAudit) -> None:
        self.participants += other.participants
        self.rejected += other.rejected
        self.counts.update(other.counts)
        self.tokens += other.tokens
        self.seconds += other.seconds

    def row(self) -> dict:
        return {
            "study": self.study,
            "participants": self.participants,
            "rejected": self.rejected,
            **{c: self.counts[c] for c in SPAN_COUNTERS},
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s),
        }


def timed(
    items: Iterable[ParticipantSpans | Rejected],
    audits: dict[str, StudyAudit],
    rejected: list[Rejected],
    on_item: Callable[[StudyAudit], None] | None = None,
) -> Iterator[ParticipantSpans | Rejected]:
    """Passes ``items`` through while adding each to its study's audit (wall time included)."""
    last = time.perf_counter()
    for item in items:
        now = time.perf_counter()
        audit = audits.setdefault(item.study, StudyAudit(item.study))
        audit.seconds += now - last
        audit.add(item)
        if isinstance(item, Rejected):
            rejected.append(item)
        if on_item is not None:
            on_item(audit)
        yield item
        last = time.perf_counter()


def total(audits: Iterable[StudyAudit]) -> StudyAudit:
    out = StudyAudit("TOTAL")
    for a in audits:
        out.merge(a)
    return out


def format_table(audits: list[StudyAudit]) -> str:
    """Fixed-width table, one row per study plus a total."""
    rows = [a.row() for a in audits] + [total(audits).row()]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    line = lambda r: "  ".join(
        str(r[c]).ljust(widths[c]) if c == "study" else str(r[c]).rjust(widths[c]) for c in COLUMNS
    )
    header = line({c: c for c in COLUMNS})
    return "\n".join([header, "-" * len(header)] + [line(r) for r in rows])


def write_csv(audits: list[StudyAudit], path: str) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for a in audits + [total(audits)]:
            writer.writerow(a.row())


def write_rejected(rejected: list[Rejected], path: str) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study", "experiment", "participant", "source", "line", "reason"])
        for r in rejected:
            writer.writerow([r.study, r.experiment, r.participant, r.source, r.line, r.reason])
