"""Per-stage counters: documents in and out, bytes, time, and why documents were dropped."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class StageStats:
    """Counters of one stage; merged across tasks by addition, so order never matters."""

    docs_in: int = 0
    docs_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    seconds: float = 0.0
    dropped: Counter = field(default_factory=Counter)  # documents dropped, by reason
    events: Counter = field(default_factory=Counter)  # things changed in kept documents (masks, lines)

    def merge(self, other: StageStats) -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.chars_in += other.chars_in
        self.chars_out += other.chars_out
        self.seconds += other.seconds
        self.dropped.update(other.dropped)
        self.events.update(other.events)

    def to_dict(self) -> dict:
        return {
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "chars_in": self.chars_in,
            "chars_out": self.chars_out,
            "seconds": round(self.seconds, 4),
            "dropped": dict(sorted(self.dropped.items())),
            "events": dict(sorted(self.events.items())),
        }

    @classmethod
    def from_dict(cls, data: dict) -> StageStats:
        return cls(
            docs_in=data["docs_in"],
            docs_out=data["docs_out"],
            chars_in=data["chars_in"],
            chars_out=data["chars_out"],
            seconds=data["seconds"],
            dropped=Counter(data["dropped"]),
            events=Counter(data.get("events", {})),
        )


def merge_stage_stats(per_task: Iterable[dict[str, dict]]) -> dict[str, StageStats]:
    """Sum the `{stage: counters}` dicts of many tasks, keeping the stage order of the first."""
    total: dict[str, StageStats] = {}
    for stages in per_task:
        for name, counters in stages.items():
            total.setdefault(name, StageStats()).merge(StageStats.from_dict(counters))
    return total
