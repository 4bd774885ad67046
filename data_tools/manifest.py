"""The token-shard contract between data_tools and the trainer.

A token split is a directory of webdataset tars plus `manifest.json`. Each tar sample holds a
block of packed rows (`<key>.npy`, shape [rows, seq_len], uint16 or uint32), from format 2 on
`<key>.starts.npy` (int32 [rows, width]: the offsets where documents begin in each row, ascending,
padded with -1; the trainer's document attention reads it with one positioned read) and
`<key>.json` (the same offsets as lists, and the tokens each source contributed). Finetuning splits
(`task` set) hold int32 blocks [examples, channels, seq_len] instead, `channels` naming each one,
and `<key>.json` holds the examples' records. This module imports only the standard library and
numpy (and the shared leaf `data_tools.common`) so the trainer can use it without the pipeline's
dependencies. It is the one place that knows the shard format: writers, verifiers and the trainer's
loader all go through it (ARCHITECTURE.md, "Contracts").
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from data_tools import storage
from data_tools.common import DataError

FORMAT_VERSION = 2  # 2: packed token samples hold `<key>.starts.npy`
READABLE_VERSIONS = (1, 2)  # format 1 shards load and train as before, without document boundaries
MANIFEST_NAME = "manifest.json"
STARTS_EXT = "starts.npy"  # the member beside `<key>.npy` with each row's document starts
STARTS_DTYPE = np.dtype("<i4")


MIN_SHARD_DIGITS = 5  # shard-00000.tar: a job of up to 100,000 shards keeps the names it always had


def shard_stem(index: int, n_shards: int) -> str:
    """`00042` of `shard-00042.tar`: zero-padded to the widest index of the split's `n_shards` (at least 5 digits), so
    names sort in shard order past 99,999 shards too. Readers never parse it: the manifest lists every shard's path,
    so splits written with 5-digit names past 99,999 load as before."""
    return f"{index:0{max(MIN_SHARD_DIGITS, len(str(n_shards - 1)))}d}"


class ManifestError(DataError):
    """A manifest or shard that does not match the contract; the message is one line."""


@dataclass
class TokenizerInfo:
    name: str
    vocab_size: int
    eos_id: int
    sha256: str  # of the tokenizer.json saved with the data
    path: str = ""  # tokenizer.json, relative to the manifest's directory


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's directory
    rows: int
    tokens: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    seq_len: int
    dtype: str
    tokenizer: TokenizerInfo
    shards: list[ShardInfo]
    split: str = "train"
    rows_per_sample: int = 0
    stats: dict = field(default_factory=dict)
    pipeline: dict = field(default_factory=dict)
    # after the older fields so positional construction keeps working
    task: str | None = None  # None: packed LM tokens (`prepare`); else the prepare-finetune task
    labels: list[str] = field(default_factory=list)  # label vocabulary (id = index): classification, NER
    channels: list[str] = field(default_factory=list)  # finetuning rows are [channels, seq_len]; empty: [seq_len]
    format_version: int = FORMAT_VERSION
    # where it was loaded from (not saved): shard paths are relative to it
    directory: Path | None = field(default=None, compare=False)

    @property
    def has_doc_starts(self) -> bool:
        """Whether its shards record where documents start in each row: packed tokens from format 2 on."""
        return self.task is None and self.format_version >= 2

    @property
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one row: packed tokens are [seq_len]; finetuning examples [channels, seq_len]."""
        return (len(self.channels), self.seq_len) if self.channels else (self.seq_len,)

    def shard_path(self, shard: ShardInfo) -> Path:
        """Where a shard of this (loaded) manifest lies."""
        return (self.directory or Path(".")) / shard.path

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["directory"]
        data["total_rows"] = self.total_rows
        data["total_tokens"] = self.total_tokens
        return data

    def save(self, directory: str | Path) -> Path:
        """Write `manifest.json` atomically: a reader sees the old file or the complete new one."""
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)
        return path


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest file (or the `manifest.json` in a directory), checking version and keys.

    Both spellings name the same split everywhere: the Manifest remembers its directory.
    """
    path = storage.location(path)
    if storage.is_dir(path):
        path = path / MANIFEST_NAME
    try:
        data = json.loads(storage.read_text(path))  # a URL that cannot be read is a one-line DataError naming it
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest here; run `python -m data_tools prepare` first") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ManifestError(f"{path}: format_version {version!r}, this dstrain reads {', '.join(map(str, READABLE_VERSIONS))}")
    try:
        return Manifest(
            seq_len=data["seq_len"],
            dtype=data["dtype"],
            tokenizer=TokenizerInfo(**data["tokenizer"]),
            shards=[ShardInfo(**s) for s in data["shards"]],
            split=data.get("split", "train"),
            rows_per_sample=data.get("rows_per_sample", 0),
            stats=data.get("stats", {}),
            pipeline=data.get("pipeline", {}),
            task=data.get("task"),
            labels=data.get("labels", []),
            channels=data.get("channels", []),
            format_version=version,
            directory=path.parent,
        )
    except (KeyError, TypeError) as err:
        raise ManifestError(f"{path}: missing or malformed field {err}") from None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with storage.open_read(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_shard(directory: str | Path, shard: ShardInfo) -> None:
    """Refuse a shard whose size or checksum differs from the manifest, before any row is used."""
    path = storage.location(directory) / shard.path
    try:
        size = storage.size(path)
    except FileNotFoundError:
        raise ManifestError(f"{path}: shard listed in the manifest is missing") from None
    except DataError as err:  # an object that is not there or cannot be read: the one line names the URL
        raise ManifestError(str(err)) from None
    if size != shard.bytes:
        raise ManifestError(f"{path}: size {size} bytes, manifest says {shard.bytes}; the shard is truncated or replaced")
    found = file_sha256(path)
    if found != shard.sha256:
        raise ManifestError(f"{path}: sha256 {found[:16]}…, manifest says {shard.sha256[:16]}…; the shard is corrupt")


def open_shard(path: str | Path) -> BinaryIO:
    """The one place a shard is opened for reading: a local file, or an object read by ranged requests."""
    return storage.open_read(path)


def _check_member(path: str | Path, member: tarfile.TarInfo) -> None:
    """Shards hold plain files with relative names; anything else (links, devices, `..`) is refused."""
    if not member.isfile() or member.name.startswith("/") or ".." in Path(member.name).parts:
        raise ManifestError(f"{path}: unsafe tar member {member.name!r}; shards hold plain relative files only")


def iter_blocks(path: str | Path) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield (rows, metadata) for each sample of a token shard, in file order.

    Members must be plain files with relative names; `.npy` is read with `allow_pickle=False`.
    """
    pending: dict[str, dict] = {}
    with open_shard(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            _check_member(path, member)
            key, _, ext = member.name.partition(".")
            payload = tar.extractfile(member).read()
            sample = pending.setdefault(key, {})
            sample[ext] = payload
            if "npy" in sample and "json" in sample:
                del pending[key]
                rows = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
                yield rows, json.loads(sample["json"])
    if pending:
        raise ManifestError(f"{path}: incomplete samples {sorted(pending)}; the shard is truncated")


@dataclass(frozen=True)
class ShardIndex:
    """Where each `.npy` block of a token shard lies in the file, so a read touches only its block."""

    path: Path
    dtype: np.dtype
    row_shape: tuple[int, ...]  # (seq_len,) for packed tokens, (channels, seq_len) for finetuning examples
    block_first_rows: tuple[int, ...]
    block_spans: tuple[tuple[int, int], ...]  # (offset, bytes) of each block's array data
    # (offset, bytes, width) of each block's `<key>.starts.npy` data; empty for shards without document starts
    starts_spans: tuple[tuple[int, int, int], ...] = ()


def index_shard(manifest: Manifest, shard: ShardInfo) -> ShardIndex:
    """Read a shard's tar headers and `.npy` headers once; check every block against the manifest.

    Why: the trainer then reads a block with one positioned read, without tarfile or numpy's loader.
    """
    path = manifest.shard_path(shard)
    dtype, row_shape = np.dtype(manifest.dtype), manifest.row_shape
    firsts, spans, starts, total = [], [], [], 0
    block_rows: dict[str, int] = {}  # rows of each block by sample key, to check its starts against
    with open_shard(path) as f:
        for member in _tar_members(f, path):
            key, _, ext = member.name.partition(".")
            if ext == "npy":
                shape, offset, size = _npy_span(f, path, member, dtype, row_shape)
                firsts.append(total)
                spans.append((offset, size))
                block_rows[key] = shape[0]
                total += shape[0]
            elif ext == STARTS_EXT and manifest.has_doc_starts:
                shape, offset, size = _npy_span(f, path, member, STARTS_DTYPE, None)
                if shape[0] != block_rows.get(key):
                    raise ManifestError(f"{path}: member {member.name!r} has {shape[0]} rows, its block "
                                        f"{block_rows.get(key)}; the shard is corrupt")
                starts.append((offset, size, shape[1]))
    if total != shard.rows:
        raise ManifestError(f"{path}: {total} rows in its blocks, manifest says {shard.rows}; the shard is truncated or replaced")
    if manifest.has_doc_starts and len(starts) != len(spans):
        raise ManifestError(f"{path}: {len(starts)} of {len(spans)} blocks have a {STARTS_EXT} member, format "
                            f"{manifest.format_version} needs one each; the shard is corrupt or was written by another version")
    return ShardIndex(path, dtype, row_shape, tuple(firsts), tuple(spans), tuple(starts))


def _npy_span(f: BinaryIO, path: Path, member: tarfile.TarInfo, dtype: np.dtype,
              row_shape: tuple[int, ...] | None) -> tuple[tuple[int, ...], int, int]:
    """(shape, data offset, data bytes) of a `.npy` member, refused unless it is `dtype` [rows, *row_shape]
    (`row_shape` None: any 2-D array)."""
    f.seek(member.offset_data)
    shape, found = _npy_header(f, path, member.name)
    data_offset = f.tell()
    size = member.offset_data + member.size - data_offset
    shape_ok = len(shape) == 2 if row_shape is None else tuple(shape[1:]) == row_shape
    if found != dtype or not shape_ok or size != math.prod(shape) * dtype.itemsize:
        expected = "width" if row_shape is None else ", ".join(map(str, row_shape))
        raise ManifestError(
            f"{path}: member {member.name!r} is {found} {shape} in {size} bytes, "
            f"manifest says {dtype} [rows, {expected}]; the shard is corrupt"
        )
    return shape, data_offset, size


def doc_starts_array(doc_starts: list[list[int]]) -> np.ndarray:
    """Per-row document starts as the `<key>.starts.npy` array: int32 [rows, widest row], padded with -1."""
    width = max((len(starts) for starts in doc_starts), default=0)
    out = np.full((len(doc_starts), width), -1, STARTS_DTYPE)
    for row, starts in enumerate(doc_starts):
        out[row, : len(starts)] = starts
    return out


def _tar_members(f: BinaryIO, path: Path) -> list[tarfile.TarInfo]:
    """A shard's tar members, each checked by `_check_member`."""
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            members = tar.getmembers()
    except tarfile.TarError as err:
        raise ManifestError(f"{path}: not a readable tar ({err}); the shard is corrupt") from None
    for member in members:
        _check_member(path, member)
    return members


def _npy_header(f: BinaryIO, path: Path, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the `.npy` header at the file's position; leaves it at the array data."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = readers[version](f)
    except (ValueError, KeyError) as err:
        raise ManifestError(f"{path}: member {name!r} is not a .npy array ({err}); the shard is corrupt") from None
    if fortran:
        raise ManifestError(f"{path}: member {name!r} is Fortran-ordered; token shards hold C-ordered rows")
    return shape, dtype
