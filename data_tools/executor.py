"""Run a stage's tasks: inline for one worker, else in a spawned process pool, with a progress bar.

One pool serves every stage of a job (`worker_pool`): a worker imports the pipeline, loads the
language model and the tokenizer once, not once per stage. Workers report processed documents
through a queue; the parent turns that into one tqdm bar per stage (docs/s). A task that fails
stops the stage with its own error; finished tasks keep their markers, so the rerun starts from
them. A worker killed from outside (the OOM killer, a SIGKILL) ends the stage with one line saying
so, not a pool traceback.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass

from tqdm import tqdm

from data_tools.errors import DataError

TaskFn = Callable[..., None]  # fn(index, progress)
_progress_queue: mp.Queue | None = None
# fault tests: every pooled task takes at least this long, so that a kill after n finished tasks lands mid-stage
TASK_DELAY_S = float(os.environ.get("DSTRAIN_DEBUG_TASK_DELAY_S", "0"))
_WORKER_DIED = ("a worker process died (killed by a signal or out of memory); finished tasks are kept, "
                "run the same command to resume")


@dataclass
class WorkerPool:
    executor: ProcessPoolExecutor
    progress: mp.Queue


def _init_worker(progress_queue: mp.Queue, log_level: int) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    logging.basicConfig(level=log_level, format="%(levelname)s: %(message)s")


def _report(n: int) -> None:
    _progress_queue.put(n)


def _run(fn: TaskFn, index: int) -> None:
    time.sleep(TASK_DELAY_S)
    fn(index, _report)


@contextmanager
def worker_pool(workers: int) -> Iterator[WorkerPool | None]:
    """`workers` spawned processes for all the stages run inside the block; None for one worker (tasks run inline)."""
    if workers <= 1:
        yield None
        return
    ctx = mp.get_context("spawn")
    progress_queue = ctx.Queue()
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(progress_queue, level)) as executor:
        yield WorkerPool(executor, progress_queue)


def run_tasks(fn: TaskFn, indices: list[int], pool: WorkerPool | None, desc: str) -> None:
    """Run `fn(index, progress)` for every index, in `pool` (then `fn` must be picklable) or inline without one."""
    with tqdm(desc=desc, unit=" docs", disable=None, dynamic_ncols=True) as bar:
        if pool is None or len(indices) <= 1:
            for index in indices:
                fn(index, bar.update)
            return
        try:
            pending = {pool.executor.submit(_run, fn, index) for index in indices}
        except BrokenProcessPool:  # a worker of the job's pool died after the previous stage finished
            raise DataError(f"{desc}: {_WORKER_DIED}") from None
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            _drain(pool.progress, bar)
            for future in done:
                if (error := future.exception()) is not None:
                    for other in pending:
                        other.cancel()
                    if isinstance(error, BrokenProcessPool):
                        raise DataError(f"{desc}: {_WORKER_DIED}") from None
                    raise error
        _drain(pool.progress, bar)


def _drain(progress_queue: mp.Queue, bar: tqdm) -> None:
    while True:
        try:
            bar.update(progress_queue.get_nowait())
        except queue.Empty:
            return
