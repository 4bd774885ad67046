"""JSON Lines reader (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`) of records with a `text` field.

Lines are read as bytes and decoded strictly, so a line with invalid UTF-8, broken JSON or no
`text` is counted, named by line number, and skipped without losing its neighbours.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from data_tools import storage
from data_tools.doc import Doc
from data_tools.readers import ZSTD_MAGIC, Warn, is_empty
from data_tools.stats import StageStats


def _open_bytes(path: Path):
    f = storage.open_read(path)
    magic = f.read(4)
    f.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(f, "rb")
    if magic == ZSTD_MAGIC:
        import zstandard

        return io.BufferedReader(zstandard.open(f, "rb"))  # the raw zstd reader cannot iterate lines
    return f


def _lines(f, start: int, end: int | None) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line) for the lines that start in [start, end) of an uncompressed file."""
    offset = 0
    if start:
        f.seek(start - 1)
        offset = start - 1 + len(f.readline())  # finish the line that began before the range
    for line in f:
        if end is not None and offset >= end:
            return
        yield offset, line
        offset += len(line)


def read_jsonl(path: Path, stats: StageStats, warn: Warn, start: int = 0, end: int | None = None) -> Iterator[Doc]:
    """Yield one document per line; a byte range [start, end) applies to uncompressed files only."""
    if is_empty(path, stats, warn):
        return
    line_no = 0
    try:
        with _open_bytes(path) as f:
            for line_no, (offset, line) in enumerate(_lines(f, start, end), 1):
                if not line.strip():
                    continue
                stats.docs_in += 1
                where = f"{path}:{line_no}" if start == 0 else f"{path} (line at byte {offset})"
                try:
                    record = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as err:
                    stats.dropped["non_utf8"] += 1
                    warn(f"{where}: bytes that are not UTF-8 at column {err.start}; line skipped")
                    continue
                except json.JSONDecodeError as err:
                    stats.dropped["malformed_json"] += 1
                    warn(f"{where}: not valid JSON ({err.msg}); line skipped")
                    continue
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    stats.dropped["missing_text"] += 1
                    warn(f"{where}: no string field 'text'; line skipped")
                    continue
                stats.docs_out += 1
                doc_id = str(record.get("id", f"{path.name}@{offset}"))
                yield Doc(id=doc_id, source=path.name, text=text, url=str(record.get("url", "")))
    except (EOFError, OSError) as err:
        warn(f"{path}: compressed stream ends early after line {line_no} ({err}); kept the lines before it")
