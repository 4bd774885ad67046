"""The record every pipeline step passes along, and the base class of those steps."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from data_tools.stats import StageStats


@dataclass(slots=True)
class Doc:
    """One document on its way from a reader to the shards.

    `raw` holds undecoded markup (`format` "html" or "wikitext") until the extract step turns it
    into `text`; readers of plain text fill `text` directly and set `format` to "text".
    """

    id: str
    source: str
    text: str = ""
    raw: bytes | str | None = None
    format: str = "text"
    url: str = ""
    lang: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class Step:
    """A pipeline step: a generator over documents that counts what it keeps and drops.

    Subclasses implement `apply(doc)`, which may edit the document in place and returns `None`
    to keep it or a short reason (the stats key) to drop it.
    """

    name: str = "step"

    def __init__(self) -> None:
        self.stats = StageStats()

    def apply(self, doc: Doc) -> str | None:
        raise NotImplementedError

    def __call__(self, docs: Iterable[Doc]) -> Iterator[Doc]:
        stats = self.stats
        for doc in docs:
            stats.docs_in += 1
            stats.chars_in += len(doc.text) if doc.text else len(doc.raw or "")
            start = time.perf_counter()
            reason = self.apply(doc)
            stats.seconds += time.perf_counter() - start
            if reason is None:
                stats.docs_out += 1
                stats.chars_out += len(doc.text)
                yield doc
            else:
                stats.dropped[reason] += 1
