"""Wikipedia XML dump reader: streamed page by page, never loaded whole.

Dumps put every `<page>` element on its own lines, so the stream is cut at `<page>` /
`</page>` and each page is parsed alone: a broken page is counted and named, and the next page
parses as usual (a whole-document XML parser would stop at the first error). Redirects and pages
outside the article namespace are skipped.

Multistream dumps (`pages-articles-multistream.xml.bz2`) are concatenated bz2 streams of 100
pages each, so a task can read a byte range: the streams that start in [start, end). A
single-stream file has one stream start, so only the range holding byte 0 reads it.
"""

from __future__ import annotations

import bz2
import gzip
import io
import mmap
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from data_tools.doc import Doc
from data_tools.readers import Warn, is_empty
from data_tools.stats import StageStats


BZ2_STREAM = re.compile(rb"BZh[1-9]1AY&SY")  # stream header followed by the first block's magic


class _Range(io.RawIOBase):
    """Bytes [start, end) of a memory-mapped file as a readable stream."""

    def __init__(self, buf: mmap.mmap, start: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, start, end

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        n = min(len(target), self.end - self.pos)
        target[:n] = self.buf[self.pos : self.pos + n]
        self.pos += n
        return n


def _stream_start(buf: mmap.mmap, pos: int) -> int:
    match = BZ2_STREAM.search(buf, pos)
    return match.start() if match else len(buf)


def _open_text(path: Path, start: int, end: int | None):
    """The dump's text, or for a byte range of a .bz2 the text of the streams starting in it."""
    if path.suffix == ".bz2" and (start > 0 or end is not None):
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        first = _stream_start(buf, start)
        last = len(buf) if end is None or end >= len(buf) else _stream_start(buf, end)
        if first >= last:
            return io.StringIO("")  # no stream starts in this range
        raw = io.BufferedReader(_Range(buf, first, last))
        return io.TextIOWrapper(bz2.BZ2File(raw), encoding="utf-8", errors="replace")
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8", errors="replace")


def _pages(path: Path, warn: Warn, start: int, end: int | None) -> Iterator[tuple[int, str]]:
    """Yield (page number, `<page>…</page>` text); a truncated stream ends with a warning."""
    number, lines, inside = 0, [], False
    try:
        with _open_text(path, start, end) as f:
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


def read_wikipedia(path: Path, stats: StageStats, warn: Warn, start: int = 0, end: int | None = None) -> Iterator[Doc]:
    """Yield one `wikitext` document per article page (of the streams starting in [start, end))."""
    if is_empty(path, stats, warn):
        return
    where = f" of the range at byte {start}" if start else ""
    for number, xml in _pages(path, warn, start, end):
        stats.docs_in += 1
        try:
            page = ET.fromstring(xml)
        except ET.ParseError as err:
            stats.dropped["malformed_page"] += 1
            title = xml.split("<title>", 1)[-1].split("</title>", 1)[0][:80] if "<title>" in xml else "?"
            warn(f"{path}: malformed XML in page {number}{where} ({title!r}: {err}); skipped, reading on")
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
