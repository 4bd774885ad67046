"""Readers turn one input file into documents; `detect_format` picks the reader by content.

Each reader is a generator `read(path, stats, warn, start, end) -> Iterator[Doc]` that skips what
it cannot read (counting the reason in `stats.dropped` and warning once with the file and offset)
and goes on with the rest of the file. `plan_tasks` cuts large files into ranges that readers
align to record boundaries themselves, so consecutive ranges read every record exactly once.
"""

from __future__ import annotations

import bz2
import glob
import gzip
from collections.abc import Callable, Iterator
from pathlib import Path

from data_tools import storage
from data_tools.doc import Doc
from data_tools.errors import DataError
from data_tools.stats import StageStats

Warn = Callable[[str], None]


def is_empty(path: Path, stats: StageStats, warn: Warn) -> bool:
    """An empty input file has nothing to read: counted as dropped and warned about once, not an error."""
    if storage.size(path):
        return False
    stats.dropped["empty_file"] += 1
    warn(f"{path}: empty file, nothing to read")
    return True
Reader = Callable[[Path, StageStats, Warn, int, "int | None"], Iterator[Doc]]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
URL_FORMATS = ("warc", "jsonl")  # readers that read through data_tools.storage (ranged reads)


def expand_inputs(patterns: list[str]) -> list[Path | storage.Url]:
    """Resolve files, directories, globs and object-store URLs (or URL globs) in the order given (matches sorted)."""
    paths: list[Path | storage.Url] = []
    for pattern in patterns:
        if storage.is_url(pattern):
            storage.check_readable(pattern.split("*")[0].split("?")[0].split("[")[0])
            matches = storage.glob(pattern) if glob.has_magic(pattern) else [storage.Url(pattern)]
            if not matches:
                raise DataError(f"--input {pattern}: the pattern matches no object")
            paths.extend(matches)
        elif glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DataError(f"--input {pattern}: the pattern matches no file")
            paths.extend(Path(m) for m in matches)
        elif Path(pattern).exists():
            paths.append(Path(pattern))
        else:
            raise DataError(f"--input {pattern}: no such file or directory")
    return paths


def _head(path: Path, size: int = 512) -> bytes:
    """First bytes of the decompressed content, for sniffing."""
    with storage.open_read(path) as raw:
        magic = raw.read(4)
        raw.seek(0)
        try:
            if magic[:2] == b"\x1f\x8b":
                with gzip.open(raw, "rb") as f:
                    return f.read(size)
            if magic[:3] == b"BZh":
                with bz2.open(raw, "rb") as f:
                    return f.read(size)
            if magic == ZSTD_MAGIC:
                import zstandard

                with zstandard.ZstdDecompressor().stream_reader(raw) as f:
                    return f.read(size)
        except (OSError, EOFError):
            return b""  # corrupt from the first byte; the extension decides and the reader warns
        return raw.read(size)


NAME_FORMATS = ((".warc", "warc"), (".wet", "warc"), (".xml", "wikipedia"), (".jsonl", "jsonl"), (".parquet", "parquet"))


def format_from_name(name: str) -> str | None:
    """The reader a file name alone implies (for inputs that cannot be opened: empty, or only listed), or None."""
    name = name.lower()
    return next((fmt for ext, fmt in NAME_FORMATS if ext in name), None)


def detect_format(path: Path) -> str:
    """Name the reader for `path`: warc, wikipedia, jsonl, parquet or hf_dataset."""
    if storage.is_url(path):
        fmt = _sniff_format(path)
        if fmt not in URL_FORMATS:
            raise DataError(f"{path}: {fmt} inputs are read from local files only; object-store inputs are WARC/WET or JSONL")
        return fmt
    return _sniff_format(path)


def _sniff_format(path: Path) -> str:
    if storage.is_dir(path):
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "hf_dataset"
        raise DataError(f"{path}: directory of unknown format; expected a `datasets` save_to_disk directory")
    name = path.name.lower()
    if storage.size(path) == 0:
        if fmt := format_from_name(name):
            return fmt
        raise DataError(f"{path}: empty file of unknown format; remove it from --input")
    head = _head(path)
    if head.startswith(b"WARC/") or ".warc" in name or ".wet" in name:
        return "warc"
    if b"<mediawiki" in head or name.endswith((".xml", ".xml.bz2", ".xml.gz")):
        return "wikipedia"
    if head.startswith(b"PAR1") or name.endswith(".parquet"):
        return "parquet"
    if head.lstrip().startswith(b"{") or ".jsonl" in name or ".ndjson" in name:
        return "jsonl"
    raise DataError(
        f"{path}: unknown input format; expected WARC/WET, a Wikipedia XML dump, JSONL, Parquet or a datasets directory"
    )


def get_reader(fmt: str) -> Reader:
    """Import the reader lazily so a job loads only the libraries its inputs need."""
    if fmt == "warc":
        from data_tools.readers.warc import read_warc

        return read_warc
    if fmt == "wikipedia":
        from data_tools.readers.wikipedia import read_wikipedia

        return read_wikipedia
    if fmt == "jsonl":
        from data_tools.readers.jsonl import read_jsonl

        return read_jsonl
    if fmt == "parquet":
        from data_tools.readers.tables import read_parquet

        return read_parquet
    if fmt == "hf_dataset":
        from data_tools.readers.tables import read_hf_dataset

        return read_hf_dataset
    raise ValueError(fmt)


def _byte_splittable(path: Path, fmt: str) -> bool:
    """Formats whose readers can start at any byte offset (uncompressed or member-wise compressed)."""
    with storage.open_read(path) as f:
        magic = f.read(3)
    if fmt == "warc":
        return True  # gzip per record, or plain
    if fmt == "wikipedia":
        return magic == b"BZh"  # multistream .bz2 splits; a single stream stays in the first range
    return fmt == "jsonl" and magic[:2] != b"\x1f\x8b" and magic != ZSTD_MAGIC[:3]


def plan_tasks(paths: list[Path], task_bytes: int) -> list[dict]:
    """One task per input, large files cut into ranges of about `task_bytes` (row groups for Parquet)."""
    tasks = []
    for path in paths:
        fmt = detect_format(path)
        base = {"path": str(path) if storage.is_url(path) else str(path.resolve()), "format": fmt}
        size = 0 if fmt == "hf_dataset" else storage.size(path)
        if fmt == "parquet" and size > task_bytes:
            from data_tools.readers.tables import open_parquet

            meta = open_parquet(path).metadata
            start = acc = 0
            for group in range(meta.num_row_groups):
                acc += meta.row_group(group).total_byte_size
                if acc >= task_bytes or group == meta.num_row_groups - 1:
                    tasks.append({**base, "start": start, "end": group + 1})
                    start, acc = group + 1, 0
        elif size > task_bytes and _byte_splittable(path, fmt):
            tasks += [{**base, "start": s, "end": min(s + task_bytes, size)} for s in range(0, size, task_bytes)]
        else:
            tasks.append({**base, "start": 0, "end": None})
    return tasks
