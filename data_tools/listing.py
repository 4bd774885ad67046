"""Inputs named by a listing, the way Common Crawl publishes a snapshot: `warc.paths.gz`, a gzipped
(or plain) text file with one path per line, relative to a prefix (`https://data.commoncrawl.org/`,
`s3://commoncrawl/` or a local mirror).

A snapshot is ~90,000 files of ~1 GiB: planning it must not open, stat or download any of them.
So a listed input becomes exactly one task (no byte ranges: cutting needs the size), its format
comes from its name, and its size is an assumption (`--assume-file-mb`, else the typical size of
its kind, `TYPICAL_FILES`) that only the estimates use.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from pathlib import Path

from data_tools.errors import DataError
from data_tools.readers import format_from_name

# A listed path is relative: no scheme, no leading '/', no '..', no whitespace or control characters.
_BAD_PATH = re.compile(r"^/|^[A-Za-z][\w+.-]*://|(^|/)\.\.(/|$)|[\s\x00-\x1f\x7f]")


@dataclass(frozen=True)
class TypicalFile:
    """What one input of a kind usually holds, for estimates when the file is not looked at."""

    mib: float  # size on disk (compressed)
    docs: int  # documents the reader yields (WARC: HTML responses)


# Common Crawl's own numbers for a recent snapshot (CC-MAIN-2024-*): ~90,000 WARC files of ~1 GiB,
# ~3e9 pages, i.e. ~35,000 responses per file; the WET file of the same pages is ~80 MiB compressed.
TYPICAL_FILES = {
    "wet": TypicalFile(mib=80, docs=35_000),
    "warc": TypicalFile(mib=1024, docs=35_000),
}
# Kinds with no typical file size, by compressed input KiB per document the reader yields: a Wikipedia dump
# (.xml.bz2: ~22 GiB for ~6.9e6 articles, redirects skipped); text in JSONL/Parquet (any other kind), ~4.5 KB
# per document uncompressed, ~3× smaller compressed.
KIB_PER_DOC = {"wikipedia": 3.2}
TEXT_KIB_PER_DOC = 1.5


@dataclass(frozen=True)
class ListedInput:
    """One listed file: where the tasks will read it from, its reader, and its assumed size."""

    url: str
    format: str
    mib: float
    docs: int


def read_listing(path: Path) -> list[tuple[int, str]]:
    """(line number, relative path) of a listing, in order. Blank lines are skipped; anything else that is not a
    relative path stops with one line naming the listing and the line number."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
            raw_lines = f.read().split(b"\n")
    except FileNotFoundError:
        raise DataError(f"--input-list {path}: no such file") from None
    except (OSError, EOFError) as err:
        raise DataError(f"--input-list {path}: cannot be read ({err}); download the listing again") from None
    paths = []
    for line_no, raw in enumerate(raw_lines, 1):
        try:
            line = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError:
            raise DataError(f"--input-list {path}:{line_no}: not UTF-8 text; a listing has one relative path a line") from None
        if not line.strip():
            continue
        if _BAD_PATH.search(line):
            raise DataError(
                f"--input-list {path}:{line_no}: {line[:80]!r} is not a relative path (one path a line, no spaces, "
                "no scheme or leading '/'; put the common part in --input-prefix)"
            )
        paths.append((line_no, line))
    if not paths:
        raise DataError(f"--input-list {path}: the listing holds no path; expected one relative path a line (e.g. warc.paths.gz)")
    return paths


def join_prefix(prefix: str, relative: str) -> str:
    """`prefix` + `relative`: URLs by string (one '/' between), a local prefix as an absolute path."""
    if "://" in prefix:
        return prefix.rstrip("/") + "/" + relative
    return os.path.join(os.path.abspath(prefix), relative)


def listed_inputs(listing: Path, prefix: str | None, assume_mb: float | None) -> list[ListedInput]:
    """Every listed file with its reader and assumed size; `prefix` defaults to the listing's folder."""
    base = prefix if prefix is not None else str(listing.parent)
    inputs = []
    for line_no, relative in read_listing(listing):
        fmt = format_from_name(relative)
        if fmt is None:
            raise DataError(
                f"--input-list {listing}:{line_no}: {relative}: cannot tell the format from the name "
                "(expected .warc, .wet, .xml, .jsonl or .parquet in it)"
            )
        typical = _typical(relative, fmt)
        if assume_mb is None and typical is None:
            raise DataError(
                f"--input-list {listing}:{line_no}: {relative}: no typical size for {fmt} files; give --assume-file-mb"
            )
        mib = assume_mb if assume_mb is not None else typical.mib
        inputs.append(ListedInput(join_prefix(base, relative), fmt, mib, assumed_docs(relative, fmt, mib)))
    return inputs


def _typical(name: str, fmt: str) -> TypicalFile | None:
    return TYPICAL_FILES.get("wet" if ".wet" in name.lower() else fmt)


def assumed_docs(name: str, fmt: str, mib: float) -> int:
    """Documents in an input of this name, format and size, from the typical file of its kind (a WARC holds ~30 KiB
    of compressed HTTP response per document, a WET ~2.3 KiB of text, a compressed JSONL ~1.5 KiB)."""
    typical = _typical(name, fmt)
    if typical:
        return max(1, round(typical.docs * mib / typical.mib))
    return max(1, round(mib * 1024 / KIB_PER_DOC.get(fmt, TEXT_KIB_PER_DOC)))


def listed_tasks(inputs: list[ListedInput]) -> list[dict]:
    """One plan task per listed file, whole (the same task keys as `readers.plan_tasks`)."""
    return [{"path": item.url, "format": item.format, "start": 0, "end": None} for item in inputs]
