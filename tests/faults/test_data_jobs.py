"""SIGKILL of `prepare` workers (and of the whole job) at seeded random moments of every per-task stage (extract,
bucket, tokenize, pack) and right after the last bucket task (in cluster or the stage after): a killed worker ends the
job with one line, nothing is presented as complete, and the rerun finishes with shards byte-identical to an uninterrupted
job. A disk that fills mid-stage ends the job with one line and leaves no marker of an unfinished task.
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
from prepare_runs import WARCS, outputs, prepare_cmd, run
from test_storage import fill, small_disk  # noqa: F401 (a fixture)
from trainer_runs import descendants, kill

from data_tools.cli import main as data_main
from data_tools.config import DedupConfig
from data_tools.dedup import bucket_count
from data_tools.manifest import load_manifest
from data_tools.pipeline import PER_TASK_STAGES, STAGES, Job

pytestmark = pytest.mark.slow

ARGS = ("--workers", "2", "--task-mb", "0.3", "--valid-fraction", "0.05")  # 3 ranges of each WARC: 6 tasks a stage
TASKS = 6
CONFIG = ("pack: {rows_per_shard: 64, rows_per_sample: 16}\n"  # 11 train shards: a pack task writes one or two
          "dedup: {buckets_per_band: 1}\n")  # a bucket task per band and one for the exact key
BUCKETS = bucket_count(DedupConfig(buckets_per_band=1))  # CONFIG's: a task per band and one for the exact key
_rng = random.Random(3)
KILLS = [  # (stage, tasks to finish first, then a delay in s, whole job or one worker): every stage once
    ("extract", _rng.randint(1, 3), _rng.uniform(0, 0.3), "worker"),
    ("bucket", _rng.randint(1, 20), _rng.uniform(0, 0.1), "worker"),
    ("bucket", BUCKETS, 0.0, "job"),  # the rest of them: lands in cluster or just after
    ("tokenize", _rng.randint(1, 3), _rng.uniform(0, 0.3), "job"),
    ("pack", _rng.randint(1, 3), _rng.uniform(0, 0.1), "worker"),
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
    reference, out, config = tmp_path / "reference", tmp_path / "job", tmp_path / "pipeline.yaml"
    config.write_text(CONFIG)
    assert run(prepare_cmd(corpora, reference, "--tokenizer", str(gpt2_dir), "--config", str(config), *ARGS,
                           inputs=WARCS)).returncode == 0
    command = prepare_cmd(corpora, out, "--tokenizer", str(gpt2_dir), "--config", str(config), *ARGS, inputs=WARCS)
    assert len(load_manifest(reference / "tokens" / "train").shards) >= 8
    assert len(Job(reference).plan.tasks) == TASKS
    for stage, tasks, delay, what in KILLS:
        target = min(finished(out, stage) + tasks, BUCKETS if stage == "bucket" else TASKS)
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env=os.environ | {"DSTRAIN_DEBUG_TASK_DELAY_S": "0.5"})  # > any delay: the kill lands mid-stage
        deadline = time.monotonic() + 300
        while not (finished(out, stage) >= target and (what == "job" or workers(proc.pid))):
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


def run_stages(job: Job, stages: tuple[str, ...]) -> None:
    """What has no marker yet of `stages`, one `data_tools run` at a time (in this process: 152 bucket tasks)."""
    for stage in stages:
        for index in job.pending(stage) if stage in PER_TASK_STAGES else [None] * (not job.is_done(stage)):
            task = [] if index is None else ["--task", str(index)]
            assert data_main(["-q", "run", str(job.out), "--stage", stage, *task]) == 0


def unfinished_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp" in p.name]


def test_a_disk_full_mid_stage_leaves_no_marker_and_the_rerun_finishes(small_disk, tmp_path, corpora, gpt2_dir):
    """The disk fills during the bucket tasks, then while pack writes a shard: each time the job ends with one line,
    the task that was writing has no marker and no half-written file is left; with space again, the same command
    finishes with the shards of a job that never ran out of space."""
    args = ("--tokenizer", str(gpt2_dir), "--task-mb", "0.5", "--valid-fraction", "0.1")
    reference, out = tmp_path / "reference", small_disk / "job"
    assert run(prepare_cmd(corpora, reference, *args, inputs=WARCS)).returncode == 0
    command = prepare_cmd(corpora, out, *args, inputs=WARCS)
    assert run([*command, "--plan-only"]).returncode == 0
    job = Job(out)
    for stage, leave in (("bucket", 48 * 1024), ("pack", 96 * 1024)):
        run_stages(job, STAGES[: STAGES.index(stage)])
        filler = fill(small_disk, leave)
        result = run(command)
        filler.unlink()
        errors = [line for line in result.stderr.splitlines() if not line.startswith("INFO:")]
        assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
        assert errors[0].startswith(f"error: {out}: no space left on the device;"), result.stderr
        assert 0 < len(job.pending(stage)) < job.task_count(stage) or stage == "pack", job.pending(stage)
        assert job.pending(stage) and not unfinished_files(out)
        assert not (out / "stats.json").exists()
    result = run(command)
    assert result.returncode == 0, result.stderr[-2000:]
    assert outputs(out) == outputs(reference)
