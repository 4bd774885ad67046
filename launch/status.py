"""`python -m launch status DIR`: where a training run or a data job submitted to SLURM stands.

A run directory: the last submitted job's id and state, how often it was requeued and why, the
latest checkpoint, the last logged step and the log to follow. A data directory (it has a
plan.json): the tasks done per stage and the state of every job submitted for it. Job states come
from `sacct` (which also knows finished jobs), else from `squeue`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from launch import sbatch
from launch.slurm import read_events


def job_state(job_id: str) -> str:
    """'RUNNING', or for an array e.g. '3 COMPLETED, 1 RUNNING, PENDING'."""
    for cmd in (["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], ["squeue", "-h", "-o", "%T", "-j", job_id]):
        if not shutil.which(cmd[0]):
            continue
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        states = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
        if result.returncode == 0 and states:
            return ", ".join(state if n == 1 else f"{n} {state}" for state, n in Counter(states).items())
    return "unknown (neither sacct nor squeue knows it here)"


def last_record(metrics: Path, key: str = "loss") -> dict | None:
    """The last line of metrics.jsonl that has `key`, reading only the end of the file."""
    if not metrics.exists():
        return None
    with metrics.open("rb") as f:
        f.seek(max(0, f.seek(0, 2) - 65536))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the first, cut line
            continue
        if key in record:
            return record
    return None


def train_status(run_dir: Path) -> list[str]:
    lines = [f"run:        {run_dir}"]
    jobs = [s for s in sbatch.submissions(run_dir) if s["kind"] == "train"]
    if jobs:
        last = jobs[-1]
        job_id = last["job_id"]
        lines.append(f"job:        {job_id} {job_state(job_id)} (submitted {last['time']}; "
                     f"{last['nodes']} nodes × {last['tasks_per_node']} tasks)")
        events = [e for e in read_events(run_dir) if e.get("job_id") == job_id]
        requeues = max((e["restart"] for e in events if e["event"] == "start"), default=0)
        lines.append(f"requeues:   {requeues} (at most {last['max_requeues']})")
        lines += [f"            {e['time']}  {e['signal'] or 'stop'} at {e['checkpoint']}: {e['action']}"
                  for e in events if e["event"] == "stop"]
        lines.append(f"log:        tail -f {sbatch.log_path(run_dir, job_id)}")
    else:
        lines.append("job:        none submitted for this directory (no slurm/submissions.jsonl)")
    latest = run_dir / "checkpoints" / "latest"
    lines.append(f"checkpoint: {latest.read_text().strip() if latest.exists() else 'none yet'}")
    record = last_record(run_dir / "metrics.jsonl")
    lines.append(f"last step:  {record['step']} (loss {record['loss']:.4f})" if record else "last step:  none logged yet")
    return lines


def data_status(out: Path) -> list[str]:
    from data_tools.pipeline import PER_TASK_STAGES, STAGES, Job

    job = Job(out)
    lines = [f"data job:   {out} ({len(job.plan.tasks)} tasks)"]
    for stage in STAGES:
        if stage in PER_TASK_STAGES:
            n = job.task_count(stage)
            done = f"{n - len(job.pending(stage))}/{n} tasks done"
        else:
            done = "done" if job.is_done(stage) else "to do"
        lines.append(f"{stage + ':':<11} {done}")
    for s in sbatch.submissions(out):
        lines.append(f"job {s['job_id']}:  {s['kind']} (submitted {s['time']}): {job_state(s['job_id'])}")
    return lines


def status(directory: Path) -> list[str]:
    directory = directory.resolve()
    if (directory / "plan.json").exists():
        return data_status(directory)
    if not directory.is_dir():
        raise sbatch.LaunchError(f"{directory}: no such directory")
    return train_status(directory)
