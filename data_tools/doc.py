"""The record every pipeline step passes along."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
