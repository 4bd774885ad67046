"""SIGKILL of `prepare` workers (and of the whole job) at seeded random moments: a killed worker ends the
job with one line, nothing is presented as complete, and the rerun finishes with shards byte-identical to an uninterrupted job.
(Malformed Wikipedia pages and broken WARC records are counted and skipped: tests/integration/test_prepare.py.)"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from faults import alive
from prepare_runs import outputs, prepare_cmd, run
from trainer_runs import descendants, kill

pytestmark = pytest.mark.slow

ARGS = ("--workers", "2", "--task-mb", "0.25", "--valid-fraction", "0.05")  # 15 extract and 15 tokenize tasks
_rng = random.Random(3)
KILLS = [  # (stage, tasks to finish first, then a delay in s, whole job or one worker)
    ("extract", _rng.randint(1, 5), _rng.uniform(0, 0.3), "worker"),
    ("extract", _rng.randint(1, 4), _rng.uniform(0, 0.3), "job"),
    ("tokenize", _rng.randint(1, 5), _rng.uniform(0, 0.3), "worker"),
    ("tokenize", _rng.randint(1, 4), _rng.uniform(0, 0.3), "job"),
]


def workers(job: int) -> list[int]:
    """The pool's worker processes (spawned children, not the resource tracker)."""
    found = []
    for pid in descendants(job):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_text()
        except FileNotFoundError:
            continue
        if "spawn_main" in command and "resource_tracker" not in command:
            found.append(pid)
    return found


def finished(out: Path, stage: str) -> int:
    return len(list((out / "_done").glob(f"{stage}-t*.json"))) if (out / "_done").exists() else 0


def test_killed_workers_then_rerun_give_the_uninterrupted_shards(tmp_path, corpora, gpt2_dir):
    reference, out = tmp_path / "reference", tmp_path / "job"
    assert run(prepare_cmd(corpora, reference, "--tokenizer", str(gpt2_dir), *ARGS)).returncode == 0
    command = prepare_cmd(corpora, out, "--tokenizer", str(gpt2_dir), *ARGS)
    for stage, tasks, delay, what in KILLS:
        target = finished(out, stage) + tasks
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.monotonic() + 300
        while not (finished(out, stage) >= target and workers(proc.pid)):
            assert proc.poll() is None, f"the job ended before {tasks} more {stage} tasks: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(delay)
        if what == "job":
            kill(proc)
            print(f"{stage}: killed the job after {target} tasks (+{delay:.2f} s)")
        else:
            victim = random.Random(target).choice(workers(proc.pid))
            os.kill(victim, signal.SIGKILL)
            _, err = proc.communicate(timeout=120)
            print(f"{stage}: killed worker {victim} after {target} tasks (+{delay:.2f} s): exit {proc.returncode}")
            assert proc.returncode == 2 and not alive(victim)
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            expected = (f"error: {stage}: a worker process died (killed by a signal or out of memory); "
                        "finished tasks are kept, run the same command to resume")
            assert errors == [expected], err[-2000:]
        assert not (out / "stats.json").exists()  # nothing presented as complete
    result = run(command)
    assert result.returncode == 0, result.stderr[-2000:]
    assert outputs(out) == outputs(reference)
