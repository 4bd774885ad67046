"""Deterministic webdataset tar writing.

Tars are written with fixed metadata (mtime 0, uid 0, mode 0644) so the same samples always give
the same bytes and checksums, and atomically (temp file, fsync, rename) so a killed job never
leaves a partial shard under its final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from data_tools.storage import atomic_file

Sample = tuple[str, dict[str, bytes]]  # key, {extension: payload}


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def json_bytes(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


class _HashingWriter(io.RawIOBase):
    """A write-only file that feeds sha256 and counts bytes on the way to disk."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


def write_tar(path: str | Path, samples: Iterable[Sample]) -> tuple[int, str]:
    """Write samples to `path` atomically; return (bytes, sha256) of the finished file."""
    with atomic_file(path) as raw:
        sink = _HashingWriter(raw)
        with tarfile.open(fileobj=sink, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.mtime = len(payload), 0o644, 0
                    tar.addfile(info, io.BytesIO(payload))
    return sink.size, sink.sha.hexdigest()


def read_tar(path: str | Path) -> Iterator[Sample]:
    """Yield (key, {extension: payload}) from a tar this module wrote (members of a key adjacent)."""
    key, members = None, {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            name_key, _, ext = member.name.partition(".")
            if name_key != key and members:
                yield key, members
                members = {}
            key = name_key
            members[ext] = tar.extractfile(member).read()
    if members:
        yield key, members
