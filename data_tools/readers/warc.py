"""WARC/WET reader that survives corrupt records.

The file is memory-mapped and cut into records first (gzip members for `.warc.gz`, header +
Content-Length for plain WARC); warcio then parses each record on its own. A corrupt member or
header is counted, named by byte offset in one warning, and skipped by searching for the next
record start, so one bad record never costs the rest of the file.

A task may read a byte range of a large file: it takes the records that *start* in [start, end),
finding the first one by the same search, so consecutive ranges read every record exactly once.
"""

from __future__ import annotations

import io
import mmap
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed

from data_tools import storage
from data_tools.doc import Doc
from data_tools.readers import Warn, is_empty
from data_tools.stats import StageStats

GZIP_MAGIC = b"\x1f\x8b\x08"
HTML_TYPES = ("text/html", "application/xhtml+xml")
_CONTENT_LENGTH = re.compile(rb"\r\nContent-Length:\s*(\d+)", re.IGNORECASE)


def _is_gzip_member(buf: mmap.mmap | bytes, pos: int) -> bool:
    """True when a gzip member that inflates to a WARC header starts at `pos`."""
    try:
        return zlib.decompressobj(31).decompress(buf[pos : pos + 4096], 8).startswith(b"WARC/")
    except zlib.error:
        return False


def _first_gzip_member(buf: mmap.mmap | bytes, start: int, end: int) -> int:
    pos = buf.find(GZIP_MAGIC, start, end)
    while pos >= 0 and not _is_gzip_member(buf, pos):
        pos = buf.find(GZIP_MAGIC, pos + 1, end)
    return pos


def _gzip_records(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, bytes | Exception]]:
    pos = start if start == 0 else _first_gzip_member(buf, start, end)
    while 0 <= pos < end:
        inflater, cursor, parts = zlib.decompressobj(31), pos, []
        try:
            while not inflater.eof:
                chunk = buf[cursor : cursor + (1 << 16)]
                if not chunk:
                    raise EOFError("truncated gzip member")
                parts.append(inflater.decompress(chunk))
                cursor += len(chunk)
            yield pos, b"".join(parts)
            pos = cursor - len(inflater.unused_data)
        except (zlib.error, EOFError) as err:
            yield pos, err
            pos = _first_gzip_member(buf, pos + 1, end)


def _first_plain_record(buf: mmap.mmap | bytes, start: int, end: int) -> int:
    if start == 0 and buf[:5] == b"WARC/":
        return 0
    pos = buf.find(b"\nWARC/1.", max(start - 1, 0), end)
    return pos + 1 if pos >= 0 else -1


def _plain_records(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, bytes | Exception]]:
    pos, size = _first_plain_record(buf, start, end), len(buf)
    while 0 <= pos < end:
        header_end = buf.find(b"\r\n\r\n", pos)
        match = _CONTENT_LENGTH.search(buf[pos:header_end]) if header_end > 0 else None
        if match is None:
            yield pos, ValueError("no WARC header with Content-Length")
            pos = _first_plain_record(buf, pos + 1, end)
            continue
        record_end = header_end + 4 + int(match.group(1))
        if record_end > size:
            yield pos, EOFError("record truncated before its Content-Length")
            return
        yield pos, bytes(buf[pos:record_end])
        pos = record_end
        while buf[pos : pos + 2] == b"\r\n":
            pos += 2


def read_warc(path: Path, stats: StageStats, warn: Warn, start: int = 0, end: int | None = None) -> Iterator[Doc]:
    """Yield one document per HTML response (or WET conversion record) starting in [start, end)."""
    if is_empty(path, stats, warn):
        return
    with storage.mapped(path) as buf:
        split = _gzip_records if buf[:3] == GZIP_MAGIC else _plain_records
        for offset, data in split(buf, start, len(buf) if end is None else min(end, len(buf))):
            stats.docs_in += 1
            doc = _record_to_doc(path, offset, data, stats, warn)
            if doc is not None:
                stats.docs_out += 1
                yield doc


def _record_to_doc(path: Path, offset: int, data: bytes | Exception, stats: StageStats, warn: Warn) -> Doc | None:
    try:
        if isinstance(data, Exception):
            raise data
        record = next(iter(ArchiveIterator(io.BytesIO(data))))
        kind = record.rec_type
        if kind not in ("response", "conversion", "resource"):
            stats.dropped[kind] += 1
            return None
        if kind == "response" and record.http_headers is not None:
            if record.http_headers.get_statuscode() != "200":
                stats.dropped["http_status_not_200"] += 1
                return None
            content_type = record.http_headers.get_header("Content-Type") or ""
        else:
            content_type = record.rec_headers.get_header("Content-Type") or ""
        payload = record.content_stream().read()
    except (ArchiveLoadFailed, StopIteration, zlib.error, EOFError, ValueError, OSError) as err:
        stats.dropped["malformed_record"] += 1
        warn(f"{path}: malformed WARC record at byte {offset} ({err}); skipped, reading on")
        return None
    url = record.rec_headers.get_header("WARC-Target-URI") or ""
    doc_id = record.rec_headers.get_header("WARC-Record-ID") or f"{path.name}@{offset}"
    if kind == "conversion" or content_type.startswith("text/plain"):
        try:
            return Doc(id=doc_id, source=path.name, text=payload.decode("utf-8"), url=url)
        except UnicodeDecodeError:
            stats.dropped["non_utf8"] += 1
            warn(f"{path}: record at byte {offset} is not UTF-8 text; skipped")
            return None
    if not content_type.lower().startswith(HTML_TYPES):
        stats.dropped["not_html"] += 1
        return None
    charset = re.search(r"charset=([\w.:-]+)", content_type, re.IGNORECASE)
    meta = {"charset": charset.group(1).lower()} if charset else {}
    return Doc(id=doc_id, source=path.name, raw=payload, format="html", url=url, meta=meta)
