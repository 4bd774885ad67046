"""Wikipedia XML dump reader: streamed page by page, never loaded whole.

Dumps put every `<page>` element on its own lines, so the stream is cut at `<page>` /
`</page>` and each page is parsed alone: a broken page is counted and named, and the next page
parses as usual (a whole-document XML parser would stop at the first error). Redirects and pages
outside the article namespace are skipped.
"""

from __future__ import annotations

import bz2
import gzip
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from data_tools.doc import Doc
from data_tools.readers import Warn
from data_tools.stats import StageStats


def _open_text(path: Path):
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", errors="replace")


def _pages(path: Path, warn: Warn) -> Iterator[tuple[int, str]]:
    """Yield (page number, `<page>…</page>` text); a truncated stream ends with a warning."""
    number, lines, inside = 0, [], False
    try:
        with _open_text(path) as f:
            for line in f:
                stripped = line.lstrip()
                if stripped.startswith("<page>"):
                    if inside:  # the previous page never closed: hand it over broken
                        yield number, "".join(lines)
                    number, lines, inside = number + 1, [], True
                if inside:
                    lines.append(line)
                    if stripped.startswith("</page>"):
                        yield number, "".join(lines)
                        inside = False
    except (EOFError, OSError) as err:
        warn(f"{path}: compressed stream ends early after page {number} ({err}); kept the pages before it")
    if inside:
        yield number, "".join(lines)


def read_wikipedia(path: Path, stats: StageStats, warn: Warn) -> Iterator[Doc]:
    """Yield one `wikitext` document per article page."""
    for number, xml in _pages(path, warn):
        stats.docs_in += 1
        try:
            page = ET.fromstring(xml)
        except ET.ParseError as err:
            stats.dropped["malformed_page"] += 1
            title = xml.split("<title>", 1)[-1].split("</title>", 1)[0][:80] if "<title>" in xml else "?"
            warn(f"{path}: malformed XML in page {number} ({title!r}: {err}); skipped, reading on")
            continue
        if page.findtext("ns", "0").strip() != "0":
            stats.dropped["not_article_namespace"] += 1
            continue
        if page.find("redirect") is not None:
            stats.dropped["redirect"] += 1
            continue
        title = page.findtext("title", "")
        wikitext = page.findtext("revision/text", "") or ""
        if wikitext.lstrip().upper().startswith("#REDIRECT"):
            stats.dropped["redirect"] += 1
            continue
        stats.docs_out += 1
        page_id = page.findtext("id", str(number))
        url = "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")
        yield Doc(id=f"wiki-{page_id}", source=path.name, raw=wikitext, format="wikitext", url=url, meta={"title": title})
