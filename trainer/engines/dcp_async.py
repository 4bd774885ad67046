"""DCP checkpoints written in the background (`train.async_checkpoint`), for the FSDP2 engine.

`dcp.async_save` copies this rank's shards to host memory while the loop waits (the checkpoint is the state at
its step, whatever the optimizer does next), then a thread plans, writes and, on the coordinator rank, writes
`.metadata`. That thread's collectives run in a gloo group of their own: a CPU group is required, and sharing
the training group with the loop's own collectives would deadlock on CPU. Rank 0's future completes only
after every rank's files are written (the coordinator gathers all write results before the metadata), so
rank 0 alone can tell when the checkpoint may be published.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions


class _DelayedWriter(FileSystemWriter):
    """A FileSystemWriter that waits `delay_s` before writing its data (debug.checkpoint_write_delay_s): lets a
    test kill a run while a background write is surely in progress."""

    def __init__(self, path: Path, delay_s: float) -> None:
        super().__init__(path)
        self.delay_s = delay_s

    def write_data(self, plan, planner):
        time.sleep(self.delay_s)
        return super().write_data(plan, planner)


class BackgroundWriter:
    """Starts background DCP saves; built once per run by every rank together (creating the group is collective)."""

    def __init__(self, timeout_s: float, delay_s: float = 0.0) -> None:
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        self.delay_s = delay_s
        # one stager for the run: it keeps its host buffers, so later checkpoints copy into memory already mapped
        # (reusing them is safe: the previous write has finished before the next save starts)
        self.stager = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                                                   use_async_staging=False, use_non_blocking_copy=False))

    def save(self, state: dict, path: Path) -> Future:
        """Stage `state` to host memory now; write it to `path` in a thread. The future holds DCP's metadata."""
        return dcp.async_save(state, storage_writer=_DelayedWriter(path, self.delay_s), process_group=self.group,
                              async_stager=self.stager)
