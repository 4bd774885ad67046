"""Token batches of a weighted mixture (`data.sources`), by the mixture contract (ARCHITECTURE.md, "Contracts: mixtures").

Why not lanes: under lanes a source's share is its share of `data.lanes`, fixed for the run and
quantised to lanes/L. Here every global batch holds each source's rows by the weights' share at
that step (trainer.mixture_weights: largest remainder, carried over steps), whatever the lanes and
the world size, and the weights may follow a schedule.

Each source is an endless row stream: its rows cut into `data.lanes` contiguous ranges, read in an
order fresh every epoch and fixed by (seed, epoch, source). After t steps source s has given the
first C_s(t) rows of its stream, so the batch of step t is, in source order, each source's stream
rows C_s(t) .. C_s(t + 1) - 1, and data rank r of W takes global rows [r·B/W, (r + 1)·B/W). A rank
may thus read any source's shards (they sit on a shared file system or an object store); it
verifies and indexes a shard the first time it reads from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from data_tools.common import DataError
from data_tools.manifest import Manifest, ShardIndex, index_shard, verify_shard
from trainer.config import Config
from trainer.data import (BatchStream, Corpus, Lane, LaneReader, LanesLoader, Source, check_ranks, deal_rows, open_corpora,
                          row_shape)
from trainer.mixture_weights import RowCounts, WeightSchedule

__all__ = ["MixtureLoader", "WeightedSource", "build_loader"]

log = logging.getLogger("trainer.data")


@dataclass(frozen=True)
class WeightedSource:
    """One source of a mixture: its name (in metrics), its train split and its weight over the run."""

    name: str
    manifest: Manifest
    weight: WeightSchedule
    exhaust: str = "wrap"  # out of rows: wrap to its next epoch, or stop the run at the last full step


def build_loader(config: Config, train: Sequence[Manifest], rank: int, world_size: int, doc_positions: bool):
    """The run's loader: a mixture for `data.sources`, lanes for `data.train`; `train` holds their manifests, in order."""
    data, common = config.data, dict(seed=config.run.seed, rank=rank, world_size=world_size, prefetch=config.data.prefetch,
                                     verify=config.data.verify, on_corrupt=config.data.on_corrupt, doc_positions=doc_positions)
    if data.sources:
        sources = [WeightedSource(s.name, manifest, WeightSchedule.parse(s.weight, f"data.sources[{i}].weight"), s.exhaust)
                   for i, (s, manifest) in enumerate(zip(data.sources, train, strict=True))]
        return MixtureLoader(sources, global_batch=config.train.global_batch, pieces=data.lanes, **common)
    sources = [Source(manifest, s.weight) for manifest, s in zip(train, data.train_sources(), strict=True)]
    return LanesLoader(sources, global_batch=config.train.global_batch, lanes=data.lanes, **common)


class _Shards(Mapping):
    """(source, shard) → ShardIndex, verified (when asked) and indexed the first time a reader asks for it."""

    def __init__(self, corpora: Sequence[Corpus], verify: bool) -> None:
        self._corpora, self._verify, self._index = corpora, verify, {}

    def __getitem__(self, key: tuple[int, int]) -> ShardIndex:
        if key not in self._index:
            corpus = self._corpora[key[0]]
            info = corpus.manifest.shards[key[1]]
            if self._verify:
                verify_shard(corpus.directory, info)
            self._index[key] = index_shard(corpus.manifest, info)
        return self._index[key]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


class MixtureLoader(BatchStream):
    """This rank's batches of a mixture's global batch sequence; see the module docstring for the contract.

    The interface is LanesLoader's (`batches`, `local_lane_digests`, `fingerprint`, `close`), plus the
    per-source counts the loop logs and checkpoints (`source_record`, `source_state`) and the step a
    source with `exhaust: stop` ends the run at (`end_step`).
    """

    def __init__(
        self,
        sources: Sequence[WeightedSource],
        *,
        global_batch: int,
        pieces: int,
        seed: int,
        rank: int,
        world_size: int,
        prefetch: int = 4,
        verify: bool = True,
        on_corrupt: str = "stop",
        doc_positions: bool = False,
    ):
        check_ranks(global_batch, seed, rank, world_size, prefetch)
        if pieces < 1:
            raise DataError(f"data.lanes {pieces}: must be >= 1 (each source's rows are cut into that many ranges)")
        self.sources = list(sources)
        self.corpora, self.verify = open_corpora([Source(s.manifest) for s in self.sources], on_corrupt, verify, rank,
                                                 doc_positions)
        self.global_batch, self.pieces, self.seed, self.doc_positions = global_batch, pieces, seed, doc_positions
        self.row_shape = row_shape(self.corpora[0].manifest, doc_positions)
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.rows_per_rank = global_batch // world_size
        self.seq_len = self.corpora[0].manifest.seq_len
        self.streams = [Lane(i, i, tuple(r for ranges in deal_rows([s.rows for s in c.manifest.shards], pieces) for r in ranges))
                        for i, c in enumerate(self.corpora)]
        self.counts = RowCounts([s.weight for s in self.sources], global_batch)  # the loop's; the prefetch thread has its own

    def fingerprint(self) -> str:
        """What fixes the batch sequence (shard checksums, weight schedules, seed, batch, pieces), not world size
        and not `exhaust`: a run stopped by an exhausted source may go on with `exhaust: wrap`."""
        payload = {
            "mixture": [{"name": s.name, "shards": [i.sha256 for i in c.manifest.shards], "weight": s.weight.points}
                        for s, c in zip(self.sources, self.corpora)],
            "seed": self.seed,
            "global_batch": self.global_batch,
            "pieces": self.pieces,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def end_step(self, start: int, steps: int) -> int:
        """The step a run at `start` ends at: `steps`, or earlier when a source with `exhaust: stop` has no rows
        for the batch after (the last full step; `start` itself when it ran out before). Logged once."""
        stopping = [i for i, s in enumerate(self.sources) if s.exhaust == "stop"]
        if not stopping:
            return steps
        for step, _, after in self.counts.from_step(start):
            if step >= steps:
                return steps
            if short := [i for i in stopping if after[i] > self.streams[i].rows]:
                name = self.sources[short[0]].name
                if step == 0:
                    raise DataError(f"data.sources {name}: {self.streams[short[0]].rows} rows, fewer than its share of the "
                                    "first batch; give it more data or exhaust: wrap")
                log.info("data.sources %s (exhaust: stop) runs out of rows after step %d: the run ends there with a checkpoint",
                         name, step)
                return step
        raise AssertionError("unreachable: from_step is endless")

    def source_state(self, step: int) -> dict[str, dict[str, int]]:
        """Rows read and epoch of each source after `step` steps: stored in the checkpoint, checked on resume."""
        return {s.name: {"rows": rows, "epoch": rows // stream.rows}
                for s, stream, rows in zip(self.sources, self.streams, self.counts.at(step))}

    def source_record(self, step: int) -> dict[str, float]:
        """What the loop logs per source after `step` steps: rows, tokens, epoch, and the weight of the last batch."""
        record: dict[str, float] = {}
        for source, state in self.source_state(step).items():
            record.update({f"data/{source}/rows": state["rows"], f"data/{source}/tokens": state["rows"] * self.seq_len,
                           f"data/{source}/epoch": state["epoch"]})
        for s in self.sources:
            record[f"data/{s.name}/weight"] = s.weight.at(max(step - 1, 0))
        return record

    def local_lane_digests(self, rows: np.ndarray) -> np.ndarray:
        """Digest of each of this rank's rows in the global batch, int64 [global_batch], zero for other ranks' rows.

        All-reduce it with SUM and pass the result to `trainer.data.batch_digest`: equal at any world size
        for the same global batch. Only tokens count, as under lanes.
        """
        if rows.shape != (self.rows_per_rank, *self.row_shape) or rows.dtype != np.int64:
            raise ValueError(f"rows: expected int64 {[self.rows_per_rank, *self.row_shape]}, got {rows.dtype} {list(rows.shape)}")
        tokens = rows[:, 0] if self.doc_positions else rows
        digests = np.zeros(self.global_batch, np.uint64)
        first = self.rank * self.rows_per_rank
        for i, row in enumerate(tokens):
            digests[first + i] = xxhash.xxh3_64_intdigest(np.ascontiguousarray(row, "<i8"))
        return digests.view(np.int64)

    def _produce(self, start_step: int) -> Iterator[np.ndarray]:
        """Runs in the prefetch thread: each step's rows of every source that fall in this rank's part of the batch."""
        shards = _Shards(self.corpora, self.verify)
        readers = [LaneReader(stream, self.seed, shards, self.doc_positions) for stream in self.streams]
        first, stop = self.rank * self.rows_per_rank, (self.rank + 1) * self.rows_per_rank
        try:
            for step, before, after in self.counts.from_step(start_step):
                batch = np.empty((self.rows_per_rank, *self.row_shape), np.int64)
                offset = 0  # where this source's rows begin in the global batch
                for s, reader in enumerate(readers):
                    rows = after[s] - before[s]
                    lo, hi = max(first, offset), min(stop, offset + rows)
                    if lo < hi:
                        reader.read_into(before[s] + lo - offset, batch[lo - first : hi - first])
                    offset += rows
                    self._log_wrap(s, step, before[s], after[s])
                yield batch
        finally:
            for reader in readers:
                reader.close()

    def _log_wrap(self, source: int, step: int, before: int, after: int) -> None:
        """Log, once, the step whose batch starts a source's next epoch (its ranges read in a fresh order)."""
        rows = self.streams[source].rows
        if before and after > before and (before - 1) // rows < (after - 1) // rows and self.sources[source].exhaust == "wrap":
            log.info("data.sources %s: epoch %d starts in the batch of step %d (its rows reshuffled)",
                     self.sources[source].name, (after - 1) // rows, step + 1)
