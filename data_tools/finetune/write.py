"""Finetuning splits on disk: a seeded content-hash split, then shards, tokenizer and manifest.

Examples are ordered by sha256 of (seed, record): the first round(n × valid_fraction) form the
valid split, the rest, in the same order, the train split. The order is a seeded shuffle that
depends only on the records (never on input order or timing), so the same input and seed give
byte-identical shards, and exact duplicates sort together, into one split (barring the boundary).
Block and shard sizes are those of the pretraining shards; `rows` makes the rows and documents
the json layout of packed and unpacked blocks.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import numpy as np

from data_tools.config import PackConfig
from data_tools.errors import DataError
from data_tools.finetune.encode import Example
from data_tools.finetune.rows import Row, array, starts
from data_tools.manifest import MANIFEST_NAME, ShardInfo, shard_stem
from data_tools.shards import Sample, json_bytes, npy_bytes, write_tar

ROWS_PER_SAMPLE = PackConfig.rows_per_sample
ROWS_PER_SHARD = PackConfig.rows_per_shard
WRITTEN = ("shard-*.tar*", f"{MANIFEST_NAME}*", "tokenizer*.json")  # what a split directory holds


def split(examples: list[Example], valid_fraction: float, seed: int) -> dict[str, list[Example]]:
    """{"train": …, "valid": …} (valid only when the fraction is positive; then both get at least one example)."""
    ordered = sorted(examples, key=lambda e: hashlib.sha256(json_bytes([seed, e.record])).digest())
    if not valid_fraction:
        return {"train": ordered}
    if len(ordered) < 2:
        raise DataError(f"{len(ordered)} example kept, too few to split; pass --valid-fraction 0 or add examples")
    n_valid = min(max(round(len(ordered) * valid_fraction), 1), len(ordered) - 1)
    return {"train": ordered[n_valid:], "valid": ordered[:n_valid]}


def clear(directory: Path) -> None:
    """Remove a split directory left by an earlier run; refuse one holding anything else."""
    if not directory.exists():
        return
    foreign = sorted(p.name for p in directory.iterdir() if not any(fnmatch(p.name, pattern) for pattern in WRITTEN))
    if foreign:
        raise DataError(f"{directory}: holds {', '.join(foreign[:3])}, not a prepare-finetune split; choose another --output")
    shutil.rmtree(directory)


def _meta(block: list[Row], packed: bool) -> dict:
    """The block's records: one per row, or for packed rows a list per row and where each example starts."""
    if not packed:
        return {"records": [example.record for (example,) in block]}
    return {"records": [[example.record for example in row] for row in block], "starts": [starts(row) for row in block]}


def _samples(stem: str, rows: list[Row], seq_len: int, packed: bool) -> Iterator[Sample]:
    for sample, first in enumerate(range(0, len(rows), ROWS_PER_SAMPLE)):
        block = rows[first : first + ROWS_PER_SAMPLE]
        data = np.stack([array(row, seq_len) for row in block])
        yield f"{stem}-{sample:05d}", {"npy": npy_bytes(data), "json": json_bytes(_meta(block, packed))}


def write_shards(directory: Path, rows: list[Row], seq_len: int, packed: bool) -> list[ShardInfo]:
    """`shard-NNNNN.tar` files (wider past 100,000 shards) of ROWS_PER_SHARD rows, in blocks of ROWS_PER_SAMPLE;
    tokens = input tokens."""
    shards, n_shards = [], -(-len(rows) // ROWS_PER_SHARD)
    for index, first in enumerate(range(0, len(rows), ROWS_PER_SHARD)):
        part = rows[first : first + ROWS_PER_SHARD]
        stem = shard_stem(index, n_shards)
        size, sha = write_tar(directory / f"shard-{stem}.tar", _samples(stem, part, seq_len, packed))
        tokens = sum(len(example.inputs) for row in part for example in row)
        shards.append(ShardInfo(f"shard-{stem}.tar", len(part), tokens, size, sha))
    return shards
