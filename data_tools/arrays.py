"""A stage's tasks as SLURM job arrays that a cluster accepts, with a bound on how many run at once.

SLURM refuses an array index at or above `MaxArraySize` (1001 on many clusters, the default of
slurm.conf), and often limits the jobs a user may have queued (`MaxSubmitJobs`). So a stage of N
tasks becomes ceil(N / max_size) arrays of at most `max_size` elements, each element running task
`first + SLURM_ARRAY_TASK_ID`. Only `lanes = ceil(parallelism / max_size)` arrays are queued at
once: array j waits (`afterok`) for array j - lanes, and each carries the throttle `%P` with
P = floor(parallelism / lanes), so at most `parallelism` elements run at any time and at most
`lanes × max_size` are queued. The next stage waits for every array of this one.

Kept in data_tools (not launch) because plan.json records the arrays; `launch` submits them.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_ARRAY_SIZE = 1001
DEFAULT_PARALLELISM = 64


@dataclass(frozen=True)
class ArrayChunk:
    """One job array: plan tasks `tasks[first:first + count]`, at most `throttle` running, after array `after`."""

    first: int
    count: int
    throttle: int
    after: int | None  # index of the chunk of the same stage it waits for, or None

    @property
    def spec(self) -> str:
        """sbatch's `--array` value."""
        return f"0-{self.count - 1}%{self.throttle}"


def split_array(n_tasks: int, parallelism: int, max_size: int = DEFAULT_MAX_ARRAY_SIZE) -> list[ArrayChunk]:
    """The arrays of a stage with `n_tasks` elements (see the module docstring)."""
    if parallelism < 1:
        raise ValueError(f"--array-parallelism {parallelism}: must be at least 1")
    if max_size < 1:
        raise ValueError(f"--max-array-size {max_size}: must be at least 1 (SLURM's MaxArraySize)")
    lanes = -(-parallelism // max_size)
    throttle = parallelism // lanes
    chunks = []
    for j, first in enumerate(range(0, n_tasks, max_size)):
        count = min(max_size, n_tasks - first)
        chunks.append(ArrayChunk(first, count, min(throttle, count), j - lanes if j >= lanes else None))
    return chunks
