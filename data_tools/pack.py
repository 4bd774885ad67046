"""Pack token streams into fixed-length rows, shuffle them in two levels, write equal shards.

The documents of all tasks, in task order, form one EOS-separated token stream; row r is its
tokens [r·seq_len, (r+1)·seq_len) (the tail that does not fill a row is counted and dropped), so
rows do not depend on how the input was cut into tasks. Each row remembers where documents start
in it and which input its first token came from. The output order is a pure function of (number
of rows, seed): chunks of `shuffle_chunk` consecutive rows are permuted across the whole corpus,
then each window of `shuffle_window` output positions is permuted. Any output shard can therefore
be written on its own, reading only its rows (memory-mapped) from the tasks that hold them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.manifest import STARTS_EXT, ShardInfo, doc_starts_array, shard_stem
from data_tools.shards import json_bytes, npy_bytes, write_tar
from data_tools.taskfiles import TaskArrays


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


class TokenStream:
    """All tasks' token streams as one, cut into rows; reads rows by global index.

    `load(task)` gives a task's (tokens, document start offsets), e.g. memory maps; `counts[t]` is
    task t's number of tokens and `sources[t]` its input file."""

    def __init__(self, counts: Sequence[int], sources: Sequence[str], load: Callable[[int], tuple[np.ndarray, np.ndarray]],
                 seq_len: int) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.sources, self.seq_len, self.arrays = list(sources), seq_len, TaskArrays(load)
        self.n_rows = int(self.offsets[-1]) // seq_len
        self.tail = int(self.offsets[-1]) - self.n_rows * seq_len

    @classmethod
    def from_arrays(cls, streams: Sequence[tuple[np.ndarray, np.ndarray, str]], seq_len: int) -> TokenStream:
        """From in-memory (tokens, document lengths, source) per task."""
        parts = [(tokens, np.cumsum(lengths, dtype=np.int64) - lengths) for tokens, lengths, _ in streams]
        return cls([len(t) for t, _, _ in streams], [s for _, _, s in streams], parts.__getitem__, seq_len)

    def rows(self, ids: np.ndarray) -> Rows:
        """Rows `ids` (global row indices, any order), tokens uint32."""
        tokens = np.empty((len(ids), self.seq_len), np.uint32)
        doc_starts, sources = [], []
        for out, row in enumerate(ids):
            first, stop = int(row) * self.seq_len, (int(row) + 1) * self.seq_len
            task = int(np.searchsorted(self.offsets, first, side="right")) - 1
            sources.append(self.sources[task])
            starts, filled = [], 0
            while filled < self.seq_len:
                base = int(self.offsets[task])
                task_tokens, task_starts = self.arrays[task]
                lo, hi = first + filled - base, min(stop - base, len(task_tokens))
                tokens[out, filled : filled + hi - lo] = task_tokens[lo:hi]
                inside = task_starts[np.searchsorted(task_starts, lo) : np.searchsorted(task_starts, hi)]
                starts.extend((inside + base - first).tolist())
                filled += hi - lo
                task += 1
            doc_starts.append(starts)
        return Rows(tokens, doc_starts, sources)


def cut_rows(streams: Sequence[tuple[np.ndarray, np.ndarray, str]], seq_len: int, stats: Counter) -> Rows:
    """Every row of in-memory streams, in stream order; the incomplete tail is counted as dropped."""
    stream = TokenStream.from_arrays(streams, seq_len)
    stats["tokens_dropped_tail"] += stream.tail
    return stream.rows(np.arange(stream.n_rows))


def row_order(n_rows: int, start: int, stop: int, window: int, chunk: int, seed: int) -> np.ndarray:
    """The global row index at each output position in [start, stop): a pure function of (n_rows, seed).

    Level 1 permutes the chunks of `chunk` consecutive rows (O(n_rows / chunk) memory); level 2
    permutes each window of `window` positions of that chunk stream with a generator of (seed, window)."""
    n_chunks = -(-n_rows // chunk)
    chunks = np.random.default_rng([seed]).permutation(n_chunks)
    lengths = np.minimum(chunk, n_rows - chunks * chunk)
    chunk_starts = np.cumsum(lengths) - lengths  # where each permuted chunk begins in the chunk stream
    order = []
    for index in range(start // window, -(-stop // window)):
        base = index * window
        size = min(window, n_rows - base)
        positions = base + np.random.default_rng([seed, index]).permutation(size)
        order.append(positions[max(start - base, 0) : stop - base])
    positions = np.concatenate(order) if order else np.empty(0, np.int64)
    which = np.searchsorted(chunk_starts, positions, side="right") - 1
    return chunks[which] * chunk + positions - chunk_starts[which]


def shard_count(n_rows: int, rows_per_shard: int) -> int:
    return -(-n_rows // rows_per_shard)


def write_shard(block: Rows, out_dir: Path, index: int, dtype: str, rows_per_sample: int, n_shards: int = 1) -> ShardInfo:
    """Write `shard-NNNNN.tar` (as wide as the split's `n_shards` needs): `rows_per_sample`-row blocks with their doc
    starts (an array the trainer reads, and lists in the metadata) and source counts."""
    samples, stem = [], shard_stem(index, n_shards)
    for sample, first in enumerate(range(0, len(block), rows_per_sample)):
        part = block.take(slice(first, first + rows_per_sample))
        meta = {"doc_starts": part.doc_starts, "sources": dict(sorted(Counter(part.sources).items()))}
        members = {"npy": npy_bytes(part.tokens.astype(dtype)), STARTS_EXT: npy_bytes(doc_starts_array(part.doc_starts)),
                   "json": json_bytes(meta)}  # metadata last: a reader has the arrays when it sees it
        samples.append((f"{stem}-{sample:05d}", members))
    name = f"shard-{stem}.tar"
    size, sha = write_tar(out_dir / name, samples)
    return ShardInfo(name, len(block), int(block.tokens.size), size, sha)
