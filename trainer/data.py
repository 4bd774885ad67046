"""Token batches for training, dealt by the lanes contract (ARCHITECTURE.md, "Contracts: lanes").

Why lanes: the sequence of global batches must be a pure function of (corpora, seed, global batch,
lanes) so that a run resumes from the step number alone, at any world size, without repeating or
skipping a row. The corpus's rows are dealt once to L lanes; each lane is an endless stream (epoch
after epoch, its ranges reordered per epoch, rows in file order); step t takes k = global_batch / L
rows from every lane, so every lane sits at row t * k after t steps. Rank r owns lanes
r, r + W, r + 2W, …: it opens only those lanes' shards and never needs another rank's position.

The trainer proves which global batch a step consumed with `LanesLoader.local_lane_digests`
(all-reduced with SUM across ranks) and `batch_digest`; both are independent of world size.

Document attention (`doc_positions`): each row comes as [2, seq_len], channel 0 its tokens and
channel 1 each token's position in its document, counted from 0 at every document start the shard
recorded and at the row's first token. The positions are computed here, in the prefetch thread,
once per block; the model derives its per-document attention mask from them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import queue
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import BinaryIO, Self
from dataclasses import dataclass, replace
from itertools import accumulate, count
from pathlib import Path

import numpy as np
import xxhash

from data_tools.common import DataError
from data_tools.manifest import (
    STARTS_DTYPE, Manifest, ManifestError, ShardIndex, index_shard, load_manifest, open_shard, verify_shard,
)

__all__ = [
    "BatchStream", "DataError", "Lane", "LanesLoader", "RowRange", "Source", "batch_digest", "deal_rows", "doc_positions",
    "lane_shares",
]

log = logging.getLogger("trainer.data")


@dataclass
class Source:
    """One corpus of a run: a token split from `python -m data_tools prepare`, and its mixture weight."""

    manifest: str | Path | Manifest  # a manifest.json or its directory, or the Manifest the caller loaded and checked
    weight: float = 1.0


@dataclass(frozen=True)
class RowRange:
    """Rows `first` .. `stop - 1` of one shard (an index into its manifest's shard list)."""

    shard: int
    first: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.first


@dataclass(frozen=True)
class Lane:
    """A lane's fixed share of one source; its reading order per epoch derives from (seed, epoch, index)."""

    index: int
    source: int
    ranges: tuple[RowRange, ...]

    @property
    def rows(self) -> int:
        return sum(r.rows for r in self.ranges)

    def epoch_ranges(self, seed: int, epoch: int) -> tuple[RowRange, ...]:
        """The ranges in the order this lane reads them in `epoch`: fresh per epoch, fixed by the seed."""
        order = np.random.default_rng([seed, epoch, self.index]).permutation(len(self.ranges))
        return tuple(self.ranges[i] for i in order)


def lane_shares(weights: Sequence[float], lanes: int) -> list[int]:
    """Lanes per source, proportional to the weights by largest remainder, at least one each.

    Why lanes and not a sampling rate: a lane reads one source at a fixed k rows per step, so a
    source's share of every global batch is exactly its share of lanes, at every step.
    """
    if lanes < len(weights):
        raise DataError(f"data.lanes {lanes}: fewer than the {len(weights)} sources; every source needs a lane")
    total = sum(weights)
    quotas = [lanes * w / total for w in weights]
    shares = [max(1, math.floor(q)) for q in quotas]
    while sum(shares) < lanes:
        shares[max(range(len(shares)), key=lambda i: quotas[i] - shares[i])] += 1
    while sum(shares) > lanes:  # only when the at-least-one rule lifted a tiny source
        shares[min((i for i in range(len(shares)) if shares[i] > 1), key=lambda i: quotas[i] - shares[i])] -= 1
    return shares


def deal_rows(shard_rows: Sequence[int], lanes: int) -> list[tuple[RowRange, ...]]:
    """Cut the rows of the shards (in manifest order) into `lanes` contiguous runs of equal size (±1).

    Why exact balance rather than whole shards per lane: every lane advances k rows per step, so a
    lane with fewer rows would start its next epoch sooner and its rows would be seen more often.
    A lane therefore holds whole shards except where a cut falls inside one; a shard smaller than a
    lane's share (a large corpus) is read by one lane, a shard larger than it (a small corpus) by several.
    """
    starts = list(accumulate(shard_rows, initial=0))
    total = starts[-1]
    dealt = []
    for lane in range(lanes):
        row, end = lane * total // lanes, (lane + 1) * total // lanes
        ranges = []
        while row < end:
            shard = bisect_right(starts, row) - 1
            stop = min(end, starts[shard + 1])
            ranges.append(RowRange(shard, row - starts[shard], stop - starts[shard]))
            row = stop
        dealt.append(tuple(ranges))
    return dealt


def doc_positions(starts: np.ndarray, seq_len: int) -> np.ndarray:
    """Each token's position in its document, int32 [rows, seq_len], from a block's document starts
    (int32 [rows, width], ascending, padded with -1): 0 at every start and at each row's first token."""
    latest = np.zeros((len(starts), seq_len), np.int32)  # at each offset, the latest document start at or before it
    rows, cols = np.nonzero(starts >= 0)
    latest[rows, starts[rows, cols]] = starts[rows, cols]
    np.maximum.accumulate(latest, axis=1, out=latest)
    return np.arange(seq_len, dtype=np.int32) - latest


def batch_digest(all_lane_digests: np.ndarray) -> str:
    """Hex digest of a global batch from its per-lane digests (the all-reduced `local_lane_digests`)."""
    digests = np.asarray(all_lane_digests)
    if digests.ndim != 1 or digests.dtype != np.int64:
        raise ValueError(f"lane digests: expected a 1-D int64 array, got {digests.dtype} of shape {digests.shape}")
    return xxhash.xxh3_64_hexdigest(digests.astype("<i8").tobytes())


@dataclass(frozen=True)
class Corpus:
    """One source's shards as both loaders read them: its directory, manifest and mixture weight."""

    directory: Path
    manifest: Manifest
    weight: float


def _load_corpus(source: Source) -> Corpus:
    manifest = source.manifest if isinstance(source.manifest, Manifest) else load_manifest(source.manifest)
    if not source.weight > 0:
        raise DataError(f"{manifest.directory}: weight {source.weight}; a source's weight must be positive")
    return Corpus(manifest.directory, manifest, float(source.weight))


def open_corpora(sources: Sequence[Source], on_corrupt: str, verify: bool, rank: int,
                 doc_positions: bool) -> tuple[list[Corpus], bool]:
    """The sources' corpora as a loader reads them, and whether shards still need verifying before use
    (not after `on_corrupt: skip`, which verified every shard just now)."""
    if not sources:
        raise DataError("data.train: no sources; give a manifest from `python -m data_tools prepare`")
    if on_corrupt not in ("stop", "skip"):
        raise DataError(f"data.on_corrupt {on_corrupt!r}: use stop or skip")
    corpora = [_load_corpus(s) for s in sources]
    if on_corrupt == "skip":
        corpora, verify = [_without_corrupt_shards(c, rank) for c in corpora], False
    if doc_positions and (old := next((c for c in corpora if not c.manifest.has_doc_starts), None)):
        raise DataError(f"{old.directory}: format_version {old.manifest.format_version} rows without document starts; "
                        "prepare the data again with this dstrain, or read them without document positions")
    return corpora, verify


def row_shape(manifest: Manifest, doc_positions: bool) -> tuple[int, ...]:
    """The shape of one row a loader yields: [2, seq_len] with document positions, else the shard's rows'."""
    return (2, manifest.seq_len) if doc_positions else manifest.row_shape


def _without_corrupt_shards(corpus: Corpus, rank: int) -> Corpus:
    """The corpus minus its missing, truncated or corrupt shards (`data.on_corrupt: skip`).

    Every rank checks every shard, not only its own, so all ranks deal the same remaining rows to
    the lanes. The skipped shards leave the fingerprint, so a resume with another set is refused.
    """
    kept = []
    for info in corpus.manifest.shards:
        try:
            verify_shard(corpus.directory, info)
            kept.append(info)
        except ManifestError as err:
            if rank == 0:
                log.warning("data.on_corrupt=skip: skipping %s (%d rows)", err, info.rows)
    if not kept:
        raise DataError(f"{corpus.directory}: every shard is missing or corrupt; prepare the data again")
    if rank == 0 and len(kept) < len(corpus.manifest.shards):
        skipped = corpus.manifest.total_rows - sum(s.rows for s in kept)
        log.warning("%s: skipped %d of %d shards (%d of %d rows)", corpus.directory, len(corpus.manifest.shards) - len(kept),
                    len(corpus.manifest.shards), skipped, corpus.manifest.total_rows)
    return replace(corpus, manifest=replace(corpus.manifest, shards=kept))


def _plan_lanes(corpora: Sequence[Corpus], lanes: int) -> list[Lane]:
    """Give each source its share of lanes (in source order) and deal its rows among them."""
    plan: list[Lane] = []
    for source, (corpus, share) in enumerate(zip(corpora, lane_shares([c.weight for c in corpora], lanes))):
        rows = corpus.manifest.total_rows
        if rows < share:
            raise DataError(f"{corpus.directory}: {rows} rows, fewer than its {share} lanes; use fewer data.lanes or more data")
        for ranges in deal_rows([s.rows for s in corpus.manifest.shards], share):
            plan.append(Lane(len(plan), source, ranges))
    return plan


class LaneReader:
    """Reads one lane's stream at any position; keeps the lane's open shard and its current block.

    Why a cursor: consecutive steps read on where the last one stopped, so the rows still ahead
    in the current block are kept as a view and a step's read is one slice and one copy.
    """

    def __init__(self, lane: Lane, seed: int, shards: Mapping[tuple[int, int], ShardIndex], doc_positions: bool = False):
        self.lane, self._seed, self._shards, self._doc_positions = lane, seed, shards, doc_positions
        self._epoch, self._ranges, self._starts = -1, (), [0]
        self._file: tuple[Path, BinaryIO] | None = None
        self._block: tuple[Path, int, np.ndarray] | None = None
        self._next, self._ahead = -1, np.empty((0, 0))  # stream position of the rows in _ahead

    def read_into(self, position: int, out: np.ndarray) -> None:
        """Fill `out` with the lane's rows from `position` on (in its stream, across epochs)."""
        done = 0
        while done < len(out):
            if position + done != self._next or not len(self._ahead):
                self._next, self._ahead = position + done, self._seek(position + done)
            rows = self._ahead[: len(out) - done]
            out[done : done + len(rows)] = rows
            done += len(rows)
            self._next, self._ahead = self._next + len(rows), self._ahead[len(rows) :]

    def _seek(self, position: int) -> np.ndarray:
        """The rows from stream `position` to the end of its range or block, whichever comes first."""
        epoch, offset = divmod(position, self.lane.rows)
        if epoch != self._epoch:
            self._epoch, self._ranges = epoch, self.lane.epoch_ranges(self._seed, epoch)
            self._starts = list(accumulate((r.rows for r in self._ranges), initial=0))
        i = bisect_right(self._starts, offset) - 1
        rng = self._ranges[i]
        shard = self._shards[self.lane.source, rng.shard]
        row = rng.first + offset - self._starts[i]
        block = bisect_right(shard.block_first_rows, row) - 1
        first = shard.block_first_rows[block]
        return self._load(shard, block)[row - first : rng.stop - first]

    def _load(self, shard: ShardIndex, block: int) -> np.ndarray:
        if self._block is not None and self._block[:2] == (shard.path, block):
            return self._block[2]
        rows = np.frombuffer(self._read(shard, block, *shard.block_spans[block]), shard.dtype).reshape(-1, *shard.row_shape)
        if self._doc_positions:  # [rows, 2, seq_len]: tokens and their positions in their documents
            offset, size, width = shard.starts_spans[block]
            starts = np.frombuffer(self._read(shard, block, offset, size), STARTS_DTYPE).reshape(len(rows), width)
            rows = np.stack([rows.astype(np.int32), doc_positions(starts, rows.shape[1])], axis=1)
        self._block = (shard.path, block, rows)
        return rows

    def _read(self, shard: ShardIndex, block: int, offset: int, size: int) -> bytes:
        f = self._open(shard.path)
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise DataError(
                f"{shard.path}: block {block} ends after {len(data)} of {size} bytes; the shard was truncated while in use"
            )
        return data

    def _open(self, path: Path) -> BinaryIO:
        if self._file is None or self._file[0] != path:
            self.close()
            self._file = (path, open_shard(path))
        return self._file[1]

    def close(self) -> None:
        if self._file is not None:
            self._file[1].close()
            self._file = None


@dataclass(frozen=True)
class _Failure:
    error: BaseException


class _Prefetch(Iterator[np.ndarray]):
    """Runs a batch generator in a background thread, at most `depth` batches ahead of the consumer.

    Why a thread: reading and casting rows overlaps the step, and numpy and file reads release the GIL.
    A reader error is handed over through the queue and raised by the consumer's next().
    """

    _POLL_S = 0.1  # how often a blocked producer checks for close()

    def __init__(self, produce: Callable[[], Iterator[np.ndarray]], depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(produce,), name="lanes-prefetch", daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[], Iterator[np.ndarray]]) -> None:
        try:
            with contextlib.closing(produce()) as batches:
                for batch in batches:
                    if not self._put(batch):
                        return
        except BaseException as err:  # noqa: BLE001 - every failure must reach the consumer
            self._put(_Failure(err))

    def _put(self, item: np.ndarray | _Failure) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=self._POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def __next__(self) -> np.ndarray:
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stop the producer and wait for it: it exits within one poll, or after the read in flight."""
        self._stop.set()
        self._thread.join()


class BatchStream:
    """What every loader shares: its batches come from `_produce` in a prefetch thread, one stream at a time.

    Calling `batches` again (a resume, a restart after an error) closes the previous stream first.
    """

    prefetch: int
    _stream: _Prefetch | None = None

    def _produce(self, start_step: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def batches(self, start_step: int) -> Iterator[np.ndarray]:
        """This rank's rows for steps start_step, start_step + 1, …: int64 [rows_per_rank, *row_shape]."""
        if start_step < 0:
            raise DataError(f"start_step {start_step}: must be >= 0")
        self.close()
        self._stream = _Prefetch(lambda: self._produce(start_step), self.prefetch)
        return self._stream

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LanesLoader(BatchStream):
    """This rank's batches of the run's global batch sequence; see the module docstring for the contract.

    `plan` lists every lane (index, source, row ranges) and `local_lanes` this rank's, in the order
    their rows appear in a batch; `rows_per_lane` is k. The sources share one seq_len and tokenizer
    (`trainer.loop.read_manifests` checks a run's manifests, once); shards are verified and indexed in
    the prefetch thread before the first batch, so model setup can overlap.
    `doc_positions`: rows are [2, seq_len], tokens and document positions (the module docstring).
    """

    def __init__(
        self,
        sources: list[Source],
        *,
        global_batch: int,
        lanes: int,
        seed: int,
        rank: int,
        world_size: int,
        prefetch: int = 4,
        verify: bool = True,
        on_corrupt: str = "stop",
        doc_positions: bool = False,
    ):
        _check_layout(global_batch, lanes, seed, rank, world_size, prefetch)
        self.corpora, verify = open_corpora(sources, on_corrupt, verify, rank, doc_positions)
        self.global_batch, self.lanes, self.seed, self.doc_positions = global_batch, lanes, seed, doc_positions
        self.row_shape = row_shape(self.corpora[0].manifest, doc_positions)
        self.rank, self.world_size, self.prefetch, self.verify = rank, world_size, prefetch, verify
        self.rows_per_lane = global_batch // lanes  # k: rows each lane gives every step
        self.rows_per_rank = global_batch // world_size
        self.plan = _plan_lanes(self.corpora, lanes)
        self.local_lanes = self.plan[rank::world_size]
        self._shards: dict[tuple[int, int], ShardIndex] | None = None

    def fingerprint(self) -> str:
        """What fixes the batch sequence (shard checksums, weights, seed, batch, lanes), not world size."""
        payload = {
            "sources": [{"shards": [s.sha256 for s in c.manifest.shards], "weight": c.weight} for c in self.corpora],
            "seed": self.seed,
            "global_batch": self.global_batch,
            "lanes": self.lanes,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def row_sources(self) -> np.ndarray:
        """The source index of each of this rank's rows, the same in every batch: lane i of `local_lanes`
        fills rows i*k .. (i+1)*k - 1 and reads one source. A multi-task run routes rows to heads by it."""
        return np.repeat([lane.source for lane in self.local_lanes], self.rows_per_lane)

    def local_lane_digests(self, rows: np.ndarray) -> np.ndarray:
        """Digest of each of this rank's lanes' rows in a batch, int64 [lanes], zero for other ranks' lanes.

        All-reduce it with SUM (each lane is filled by exactly one rank, so the sum is exact) and pass
        the result to `batch_digest`: equal digests at two world sizes mean the same global batch.
        Only tokens count: a batch has the same digest with and without document positions.
        """
        if rows.shape != (self.rows_per_rank, *self.row_shape) or rows.dtype != np.int64:
            raise ValueError(f"rows: expected int64 {[self.rows_per_rank, *self.row_shape]}, got {rows.dtype} {list(rows.shape)}")
        if self.doc_positions:
            rows = rows[:, 0]
        k = self.rows_per_lane
        digests = np.zeros(self.lanes, np.uint64)
        for i, lane in enumerate(self.local_lanes):
            digests[lane.index] = xxhash.xxh3_64_intdigest(np.ascontiguousarray(rows[i * k : (i + 1) * k], "<i8"))
        return digests.view(np.int64)

    def end_step(self, start: int, steps: int) -> int:
        """The step a run at `start` ends at: lanes wrap every source, so `steps` (a mixture may stop earlier)."""
        return steps

    def source_state(self, step: int) -> dict:
        """Per-source counts for the checkpoint: none, a lane's position is step × k (a mixture has some)."""
        return {}

    def source_record(self, step: int) -> dict[str, float]:
        """Per-source metrics: none, each source's share is its fixed share of lanes (a mixture logs some)."""
        return {}

    def _produce(self, start_step: int) -> Iterator[np.ndarray]:
        """Runs in the prefetch thread: the batches from `start_step` on, every lane at row step * k."""
        shards = self._local_index()
        readers = [LaneReader(lane, self.seed, shards, self.doc_positions) for lane in self.local_lanes]
        k = self.rows_per_lane
        try:
            for step in count(start_step):
                batch = np.empty((self.rows_per_rank, *self.row_shape), np.int64)
                for i, reader in enumerate(readers):
                    reader.read_into(step * k, batch[i * k : (i + 1) * k])
                yield batch
        finally:
            for reader in readers:
                reader.close()

    def _local_index(self) -> dict[tuple[int, int], ShardIndex]:
        """Verify (when asked) and index this rank's shards, once per loader, before its first batch."""
        if self._shards is None:
            began, shards = time.perf_counter(), {}
            for source, shard in self._local_keys():
                corpus, info = self.corpora[source], self.corpora[source].manifest.shards[shard]
                if self.verify:
                    verify_shard(corpus.directory, info)
                shards[source, shard] = index_shard(corpus.manifest, info)
            done = "verified and indexed" if self.verify else "indexed"
            log.info("rank %d: %s %d shards in %.1fs", self.rank, done, len(shards), time.perf_counter() - began)
            self._shards = shards
        return self._shards

    def _local_keys(self) -> list[tuple[int, int]]:
        """(source, shard) of every range of this rank's lanes, in source and manifest order."""
        return sorted({(lane.source, r.shard) for lane in self.local_lanes for r in lane.ranges})


def _check_layout(global_batch: int, lanes: int, seed: int, rank: int, world_size: int, prefetch: int) -> None:
    """The divisibility the contract needs, checked before any file is read."""
    if lanes < 1 or global_batch < 1 or world_size < 1 or prefetch < 1:
        raise DataError(
            f"data.lanes {lanes}, global_batch {global_batch}, world size {world_size}, prefetch {prefetch}: all must be >= 1"
        )
    if lanes % world_size:
        raise DataError(
            f"data.lanes {lanes} is not a multiple of the world size {world_size}; "
            "pick lanes divisible by every world size you will use"
        )
    if global_batch % lanes:
        raise DataError(
            f"train.global_batch {global_batch} is not a multiple of data.lanes {lanes}; "
            "each lane gives global_batch / lanes rows per step"
        )
    check_ranks(global_batch, seed, rank, world_size, prefetch)


def check_ranks(global_batch: int, seed: int, rank: int, world_size: int, prefetch: int) -> None:
    """What every loader needs of its layout, whatever deals the rows."""
    if global_batch < 1 or world_size < 1 or prefetch < 1:
        raise DataError(f"global_batch {global_batch}, world size {world_size}, prefetch {prefetch}: all must be >= 1")
    if global_batch % world_size:
        raise DataError(f"train.global_batch {global_batch} is not a multiple of the world size {world_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank}: outside 0..{world_size - 1}")
    if seed < 0:
        raise DataError(f"seed {seed}: must be >= 0 (it seeds numpy's SeedSequence)")
