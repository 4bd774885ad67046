"""What every SLURM submission shares: the job's resources as submitit parameters, the sbatch
script they make (what `--dry-run` prints), submission through submitit with sbatch's refusal
turned into one line, and the list of submissions that `python -m launch status` reads.

The jobs go through `submitit.SlurmExecutor` itself rather than `AutoExecutor`: AutoExecutor picks
its backend from what is on PATH and renames parameters, and a launcher that says "SLURM" must
submit to SLURM or fail saying so.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import FailedJobError, JobPaths
from submitit.slurm.slurm import _make_sbatch_string

SUBMISSIONS = "submissions.jsonl"  # under <dir>/slurm/: one line per submitted job


class LaunchError(Exception):
    """What the CLI reports as one line, `error: <message>`, with exit code 2: a job that cannot be submitted, a bad directory."""


def minutes(value: str) -> int:
    """A SLURM --time value in whole minutes (rounded up, as SLURM does).

    submitit keeps the limit as a number of minutes and does arithmetic with it in its signal
    handler, so the string SLURM accepts is converted here, once, with SLURM's own formats.
    """
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not match:
        raise ValueError(f"--time {value}: use MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    days, first, second, third = match.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        total_s = int(days) * 86400 + int(first) * 3600 + int(second or 0) * 60 + int(third or 0)
    elif third is not None:  # HH:MM:SS
        total_s = int(first) * 3600 + int(second) * 60 + int(third)
    elif second is not None:  # MM:SS
        total_s = int(first) * 60 + int(second)
    else:
        total_s = int(first) * 60
    if total_s <= 0:
        raise ValueError(f"--time {value}: must be at least one minute")
    return -(-total_s // 60)


@dataclass
class Resources:
    """The sbatch options common to training and data jobs (the CLI flags of the same names)."""

    time: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    mem: str | None = None
    cpus_per_task: int | None = None
    setup: list[str] = field(default_factory=list)

    def parameters(self, job_name: str, **extra: Any) -> dict[str, Any]:
        """`submitit.SlurmExecutor` parameters for a job of these resources plus `extra`."""
        params: dict[str, Any] = {
            "job_name": job_name,
            "time": minutes(self.time),
            "partition": self.partition,
            "account": self.account,
            "qos": self.qos,
            "constraint": self.constraint,
            "exclusive": self.exclusive or None,
            "cpus_per_task": self.cpus_per_task,
            "setup": self.setup or None,
        }
        params = {k: v for k, v in params.items() if v is not None}
        params["wckey"] = None  # submitit would add --wckey=submitit, which a cluster enforcing wckeys refuses
        additional = dict(extra.pop("additional_parameters", {}))
        if self.mem is not None:  # SLURM's own syntax (200G, 0 = all); submitit's `mem` would expect gigabytes
            additional["mem"] = self.mem
        if additional:
            params["additional_parameters"] = additional
        return {**params, **extra}


def folder(directory: Path) -> Path:
    """submitit's folder for a run or data directory: one `<dir>/slurm/<job id>/` per submission."""
    return directory.resolve() / "slurm" / "%j"


def log_path(directory: Path, job_id: str) -> Path:
    """The stderr file of the job's first task, where the trainer and data_tools log (`job_id`: an
    array element's id, `<array id>_<element>`, for an array)."""
    return JobPaths(folder(directory), job_id=job_id, task_id=0).stderr


def script(directory: Path, params: dict[str, Any], array: int | None = None) -> str:
    """The sbatch script submitit writes for these parameters (an array of `array` elements)."""
    where = folder(directory)
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(where))}"
    return _make_sbatch_string(command=command, folder=where, map_count=array, **params)


def _executor(directory: Path, params: dict[str, Any], max_requeues: int) -> submitit.SlurmExecutor:
    if not shutil.which("sbatch") or not shutil.which("srun"):
        raise LaunchError("sbatch not found on PATH: run this on a SLURM login node, or add --dry-run to see the job")
    executor = submitit.SlurmExecutor(folder=folder(directory), max_num_timeout=max_requeues)
    executor.update_parameters(**params)
    return executor


@contextlib.contextmanager
def _refusals(directory: Path) -> Iterator[None]:
    """sbatch's refusal as one LaunchError line, and no files left behind by the failed submission."""
    parent = folder(directory).parent
    parent.mkdir(parents=True, exist_ok=True)
    before = set(parent.iterdir())
    quiet = io.StringIO()  # submitit prints sbatch's stderr itself; the error line below says it once
    try:
        with contextlib.redirect_stderr(quiet):
            yield
    except (FailedJobError, subprocess.CalledProcessError) as err:
        for leftover in set(parent.iterdir()) - before:
            leftover.unlink()
        text = str(getattr(err, "stderr", None) or err).strip().splitlines() or ["(no message)"]
        reason = text[-1].removeprefix("sbatch: error: ")
        raise LaunchError(f"sbatch refused the job: {reason}") from None


def submit(directory: Path, params: dict[str, Any], fn: Callable[..., Any], *args: Any, max_requeues: int = 0) -> str:
    """Submit `fn(*args)` as one job; return its job id."""
    executor = _executor(directory, params, max_requeues)
    with _refusals(directory):
        return executor.submit(fn, *args).job_id


def submit_array(directory: Path, params: dict[str, Any], fn: Callable[..., Any], calls: Sequence[tuple]) -> tuple[str, str]:
    """Submit `fn(*args)` for each args in `calls` as one job array; return (the array's job id,
    its first element's id). submitit submits a single call as a plain job: then both are the same."""
    executor = _executor(directory, params, 0)
    with _refusals(directory), executor.batch():
        jobs = [executor.submit(fn, *args) for args in calls]
    return jobs[0].job_id.split("_")[0], jobs[0].job_id


def record(directory: Path, job_id: str, kind: str, **info: Any) -> None:
    """Append the submission to `<dir>/slurm/submissions.jsonl` (what `status` starts from)."""
    path = directory.resolve() / "slurm" / SUBMISSIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "job_id": job_id, "kind": kind, **info}
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def submissions(directory: Path) -> list[dict]:
    path = directory / "slurm" / SUBMISSIONS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
