"""Pack token streams into fixed-length rows, shuffle rows within a window, write equal shards.

Documents are concatenated EOS-separated and cut every `seq_len` tokens (the tail that does not
fill a row is counted and dropped). Each row remembers where documents start in it and which
input its first token came from. Rows are shuffled in windows with a generator seeded by
(seed, window), so the shards depend only on the token streams and the config.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.manifest import ShardInfo
from data_tools.shards import json_bytes, npy_bytes, write_tar


@dataclass
class Rows:
    tokens: np.ndarray  # [n, seq_len]
    doc_starts: list[list[int]]  # per row: offsets where a document begins
    sources: list[str]  # per row: input file of its first token

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        return Rows(
            np.concatenate([p.tokens for p in parts]),
            [s for p in parts for s in p.doc_starts],
            [s for p in parts for s in p.sources],
        )

    def take(self, index: slice | np.ndarray) -> Rows:
        if isinstance(index, slice):
            return Rows(self.tokens[index], self.doc_starts[index], self.sources[index])
        return Rows(self.tokens[index], [self.doc_starts[i] for i in index], [self.sources[i] for i in index])


def cut_rows(streams: Iterable[tuple[np.ndarray, np.ndarray, str]], seq_len: int, stats: Counter) -> Iterator[Rows]:
    """From (tokens, document lengths, source) per input slice, yield the complete rows."""
    carry = np.empty(0, dtype=np.uint32)
    carry_starts = np.empty(0, dtype=np.int64)
    carry_sources: list[str] = []
    head_source = ""  # source of the document that runs into the start of `carry`
    for tokens, lengths, source in streams:
        new_starts = len(carry) + np.cumsum(lengths, dtype=np.int64) - lengths
        starts = np.concatenate([carry_starts, new_starts])
        start_sources = carry_sources + [source] * len(lengths)
        tokens = np.concatenate([carry, tokens])
        n_rows = len(tokens) // seq_len
        if n_rows:
            row_firsts = np.arange(n_rows + 1, dtype=np.int64) * seq_len
            bounds = np.searchsorted(starts, row_firsts)
            covering = np.searchsorted(starts, row_firsts[:-1], side="right") - 1
            yield Rows(
                tokens[: n_rows * seq_len].reshape(n_rows, seq_len),
                [(starts[bounds[r] : bounds[r + 1]] - row_firsts[r]).tolist() for r in range(n_rows)],
                [start_sources[i] if i >= 0 else head_source for i in covering],
            )
        cut = n_rows * seq_len
        last_before_cut = int(np.searchsorted(starts, cut, side="right")) - 1
        if last_before_cut >= 0:
            head_source = start_sources[last_before_cut]
        keep = int(np.searchsorted(starts, cut))
        carry, carry_starts, carry_sources = tokens[cut:], starts[keep:] - cut, start_sources[keep:]
    stats["tokens_dropped_tail"] += len(carry)


def _regroup(rows: Iterable[Rows], size: int) -> Iterator[Rows]:
    """Re-cut a stream of row chunks into chunks of exactly `size` rows (the last may be smaller)."""
    pending: list[Rows] = []
    count = 0
    for chunk in rows:
        pending.append(chunk)
        count += len(chunk)
        while count >= size:
            merged = Rows.concat(pending)
            yield merged.take(slice(0, size))
            rest = merged.take(slice(size, None))
            pending, count = ([rest] if len(rest) else []), len(rest)
    if count:
        yield Rows.concat(pending)


def shuffle_windows(rows: Iterable[Rows], window: int, seed: int) -> Iterator[Rows]:
    """Permute each window of `window` rows with a generator seeded by (seed, window index)."""
    for index, block in enumerate(_regroup(rows, window)):
        yield block.take(np.random.default_rng([seed, index]).permutation(len(block)))


def write_shards(rows: Iterable[Rows], out_dir: Path, dtype: str, rows_per_shard: int, rows_per_sample: int) -> list[ShardInfo]:
    """Write `shard-NNNNN.tar` files of `rows_per_shard` rows (the last may be smaller)."""
    shards: list[ShardInfo] = []
    for index, block in enumerate(_regroup(rows, rows_per_shard)):
        samples = []
        for sample, first in enumerate(range(0, len(block), rows_per_sample)):
            part = block.take(slice(first, first + rows_per_sample))
            meta = {"doc_starts": part.doc_starts, "sources": dict(sorted(Counter(part.sources).items()))}
            samples.append((f"{index:05d}-{sample:05d}", {"npy": npy_bytes(part.tokens.astype(dtype)), "json": json_bytes(meta)}))
        name = f"shard-{index:05d}.tar"
        size, sha = write_tar(out_dir / name, samples)
        shards.append(ShardInfo(name, len(block), int(block.tokens.size), size, sha))
    return shards
