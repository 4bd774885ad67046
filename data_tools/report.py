"""What a finished job tells its user: a table of stage counters and TensorBoard summaries.

TensorBoard gets the stage funnel (documents left after each stage, as a curve over stage
number), drop reasons per stage, language shares, and histograms of characters and tokens per
document, so a user can look rather than read. Each tokenize task summarises its documents in a
`DocSummary` of fixed size (histograms over fixed bins, counts per language) that the manifest
step adds up, so the report costs the same memory for 1e3 documents or 1e10, and is exactly the
same whatever the task layout.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Upper bucket edges: 0, 1, then four per doubling up to 2**40 (the last bucket holds anything larger too).
BUCKET_LIMITS = np.unique(np.r_[0, np.round(2.0 ** (np.arange(161) / 4))]).astype(np.int64)


@dataclass
class Histogram:
    """Counts of integer values in the buckets of BUCKET_LIMITS, with what TensorBoard's raw histogram needs;
    integers only, so sums over tasks are exact in any order."""

    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKET_LIMITS))
    num: int = 0
    sum: int = 0
    sum_squares: int = 0
    min: int | None = None
    max: int | None = None

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, np.int64)
        if not len(values):
            return
        buckets = np.minimum(np.searchsorted(BUCKET_LIMITS, values), len(BUCKET_LIMITS) - 1)
        self.counts = (np.asarray(self.counts) + np.bincount(buckets, minlength=len(BUCKET_LIMITS))).tolist()
        self.num += len(values)
        self.sum += int(values.sum())
        self.sum_squares += sum(int(v) * int(v) for v in values.tolist())
        low, high = int(values.min()), int(values.max())
        self.min, self.max = (low, high) if self.min is None else (min(self.min, low), max(self.max, high))

    def merge(self, other: Histogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.num, self.sum, self.sum_squares = self.num + other.num, self.sum + other.sum, self.sum_squares + other.sum_squares
        if other.min is not None:
            self.min = other.min if self.min is None else min(self.min, other.min)
            self.max = other.max if self.max is None else max(self.max, other.max)


@dataclass
class DocSummary:
    """What the report shows of a set of documents: length histograms and documents per language."""

    chars: Histogram = field(default_factory=Histogram)
    tokens: Histogram = field(default_factory=Histogram)
    langs: dict[str, int] = field(default_factory=dict)

    def add(self, char_lens: Iterable[int], token_lens: Iterable[int], langs: Iterable[str]) -> None:
        self.chars.add(np.fromiter(char_lens, np.int64))
        self.tokens.add(np.fromiter(token_lens, np.int64))
        self.langs = dict(sorted((Counter(self.langs) + Counter(langs)).items()))

    def merge(self, other: DocSummary) -> None:
        self.chars.merge(other.chars)
        self.tokens.merge(other.tokens)
        self.langs = dict(sorted((Counter(self.langs) + Counter(other.langs)).items()))

    @classmethod
    def from_dict(cls, data: dict) -> DocSummary:
        return cls(Histogram(**data["chars"]), Histogram(**data["tokens"]), data["langs"])


def stage_table(stats: dict) -> str:
    """One row per stage: documents in/out, the biggest drop reasons, seconds."""
    rows = [("stage", "in", "out", "dropped (top reasons)", "s")]
    for name, s in stats["stages"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in Counter(s["dropped"]).most_common(4))
        events = ", ".join(f"{k} {v}" for k, v in Counter(s.get("events", {})).most_common(3))
        detail = "; ".join(x for x in (reasons, events) if x)
        rows.append((name, str(s["docs_in"]), str(s["docs_out"]), detail, f"{s['seconds']:.1f}"))
    for split, p in stats.get("pack", {}).items():
        detail = f"{p['tokens']} tokens in {p['shards']} shards, tail dropped {p['tokens_dropped_tail']}"
        rows.append((f"pack/{split}", "", f"{p['rows']} rows", detail, f"{p['seconds']:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) if i in (0, 3) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join(line(r) for r in rows)


def _add_histogram(writer, tag: str, hist: Histogram) -> None:
    """The raw histogram, trimmed to the buckets between the first and last that hold a value."""
    used = np.flatnonzero(hist.counts)
    first, last = int(used[0]), int(used[-1]) + 1
    writer.add_histogram_raw(tag, hist.min, hist.max, hist.num, hist.sum, hist.sum_squares,
                             BUCKET_LIMITS[first:last].tolist(), hist.counts[first:last], 0)


def write_tensorboard(out: Path, stats: dict, docs: DocSummary) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    logdir = out / "tensorboard"
    shutil.rmtree(logdir, ignore_errors=True)  # a rerun of pack rewrites the report, never adds to it
    with SummaryWriter(str(logdir)) as writer:
        for step, (name, s) in enumerate(stats["stages"].items()):
            writer.add_scalar("funnel/docs_out", s["docs_out"], step)
            for reason, count in s["dropped"].items():
                writer.add_scalar(f"dropped/{name}/{reason}", count, 0)
        total = max(sum(docs.langs.values()), 1)
        for lang, count in Counter(docs.langs).most_common():
            writer.add_scalar(f"languages/{lang}", count / total, 0)
        if docs.chars.num:
            _add_histogram(writer, "docs/chars", docs.chars)
            _add_histogram(writer, "docs/tokens", docs.tokens)
        writer.add_text("stages", "```\n" + stage_table(stats) + "\n```", 0)
    return logdir
