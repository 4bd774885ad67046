"""The job's worker pool: a worker killed from outside ends the stage with one line, also when it died
while the pool was idle between two stages (the next stage's submit finds the pool broken)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from data_tools.errors import DataError
from data_tools.executor import run_tasks, worker_pool


def test_a_worker_killed_between_stages_ends_the_next_stage_in_one_line():
    with worker_pool(2) as pool:
        pool.executor.submit(time.sleep, 0).result()  # the workers are up
        victim = next(iter(pool.executor._processes))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not pool.executor._broken and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(DataError) as err:
            run_tasks(len, [0, 1], pool, "tokenize")
    assert str(err.value).startswith("tokenize: a worker process died (killed by a signal or out of memory); ")
