"""Per-task intermediate arrays: written atomically, read back memory-mapped.

Later stages read only the slices they need (one band's hashes, a few signature rows, the rows of
one output shard) from every earlier task's files, so their memory follows the slice, not the corpus.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from data_tools.storage import atomic_file

MAX_OPEN = 256  # each memory map holds a file descriptor


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save under a temporary name, then rename: a killed or failed write leaves no file under `path`."""
    with atomic_file(path) as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def load_npy(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r", allow_pickle=False)


class TaskArrays:
    """`load(task)` for task indices, memoised for at most MAX_OPEN tasks at a time."""

    def __init__(self, load: Callable[[int], np.ndarray]) -> None:
        self.load, self.cache = load, {}

    def __getitem__(self, task: int) -> np.ndarray:
        task = int(task)
        if task not in self.cache:
            if len(self.cache) >= MAX_OPEN:
                self.cache.clear()
            self.cache[task] = self.load(task)
        return self.cache[task]
