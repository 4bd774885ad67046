"""Training on SLURM: one job of N nodes × one task per GPU (or per CPU process), each task running
`python -m trainer` with the rendezvous taken from SLURM's variables, and the job requeueing
itself when the trainer stops on a signal.

How a stop becomes a resume, with no step lost or repeated:

* SLURM sends SIGUSR2 `--signal-delay` seconds before `--time` (sbatch `--signal=USR2@…`), or
  SIGTERM when it preempts or requeues the job (`scontrol requeue`) or cancels it.
* Every process of the job gets it. The trainer checkpoints at the next step boundary (all ranks
  agree on the step) and exits with 75 (`trainer.loop.EXIT_REQUEUE`, = `os.EX_TEMPFAIL`).
* On SIGUSR1/SIGUSR2, global rank 0 then runs `scontrol requeue` on its own job, unless the job
  was already requeued `--max-requeues` times. On SIGTERM SLURM has decided itself (requeue or
  cancel), so nothing more is asked of it.
* The requeued job runs the same command in the same run directory, so the trainer resumes from
  `checkpoints/latest`. Rank 0 logs every start and stop to `<run_dir>/slurm/events.jsonl`.

Each task runs the trainer as a child process instead of calling it in-process: the trainer leaves
with `os._exit` (gloo can abort at interpreter shutdown), and a supervisor that outlives it is what
can requeue the job. The child starts with the stop signals ignored and the supervisor forwards
the signal it got once a second until the child exits: a signal that arrives while the trainer is
still loading (before its handlers are installed) is then acted on at the first step boundary
instead of killing it, so every allocation makes progress.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from submitit.helpers import Checkpointable

from launch import sbatch

EXIT_REQUEUE = os.EX_TEMPFAIL  # what the trainer returns after checkpointing on a signal (trainer.loop.EXIT_REQUEUE)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
EVENTS = "events.jsonl"  # under <run_dir>/slurm/


# ---------------------------------------------------------------------- rendezvous


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: `gpu[007-010,3],cpu1` → `gpu007`."""
    head = re.split(r",(?![^\[]*\])", nodelist, maxsplit=1)[0]
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", head)


def master_port(job_id: str, restart: int) -> int:
    """A port every task of one allocation derives alike; a requeued job gets a new one, so a port
    still in TIME_WAIT from the previous allocation is never reused."""
    return random.Random(f"{job_id}.{restart}").randint(20000, 59999)


def task_env(slurm: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables of one task (env:// rendezvous), from its SLURM variables.

    What submitit's TorchDistributedEnvironment exports, as a function of the variables alone, so
    that the dry run shows what the tasks will get; and the port changes at each requeue.
    """
    return {
        "RANK": slurm["SLURM_PROCID"],
        "LOCAL_RANK": slurm["SLURM_LOCALID"],
        "WORLD_SIZE": slurm["SLURM_NTASKS"],
        "LOCAL_WORLD_SIZE": str(int(slurm["SLURM_NTASKS"]) // int(slurm["SLURM_JOB_NUM_NODES"])),
        "MASTER_ADDR": first_host(slurm["SLURM_JOB_NODELIST"]),
        "MASTER_PORT": str(master_port(slurm["SLURM_JOB_ID"], int(slurm.get("SLURM_RESTART_COUNT", "0")))),
        # torchrun's default is 1 thread per process; a task given CPUs uses them
        "OMP_NUM_THREADS": slurm.get("OMP_NUM_THREADS") or slurm.get("SLURM_CPUS_PER_TASK") or "1",
    }


# ---------------------------------------------------------------------- the job's log of starts and stops


def log_event(run_dir: Path, event: str, **fields: object) -> None:
    path = run_dir / "slurm" / EVENTS
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "event": event, **fields}
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")


def read_events(run_dir: Path) -> list[dict]:
    path = run_dir / "slurm" / EVENTS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _say(message: str) -> None:
    print(f"launch: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- what each task runs


@dataclass
class TrainTask(Checkpointable):
    """Run by submitit in every task of the job: the trainer as a child, then requeue or not.

    A `Checkpointable`, so that a SIGUSR2 arriving in the instant before `__call__` replaces
    submitit's handler makes submitit requeue the job unchanged, which is also right.
    """

    command: list[str]  # python -m trainer --config … overrides
    workdir: str  # where the job was submitted from: relative paths in the config mean the same
    run_dir: str
    max_requeues: int
    resume_from: str | None = None  # the trainer's --resume-from (previous, step_N) in the job's first allocation

    def command_for(self, restart: int) -> list[str]:
        """The trainer's command line in allocation `restart` of the job: `--resume-from` in the first only.

        Why: a requeued allocation continues from the checkpoint its stop wrote (`latest`, which the first
        allocation's rewind made the requested one); resuming from the requested checkpoint again would
        rewind the run over every step made since.
        """
        return [*self.command, "--resume-from", self.resume_from] if self.resume_from and restart == 0 else self.command

    def __call__(self) -> int:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **task_env(os.environ)}  # unbuffered: the log follows the run
        rank0 = env["RANK"] == "0"
        job_id, restart = _allocation()
        command = self.command_for(restart)
        if rank0:
            log_event(Path(self.run_dir), "start", job_id=job_id, restart=restart, nodes=os.environ["SLURM_JOB_NODELIST"],
                      world_size=int(env["WORLD_SIZE"]))
        received: list[int] = []
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, frame: received.append(signum))
        # preexec_fn is safe here: this supervisor process runs no threads
        child = subprocess.Popen(command, cwd=self.workdir, env=env, preexec_fn=_ignore_stop_signals)  # noqa: PLW1509
        while True:
            try:
                code = child.wait(timeout=1)
                break
            except subprocess.TimeoutExpired:
                if received:
                    child.send_signal(received[-1])
        if code == EXIT_REQUEUE:
            if rank0:
                self.stopped(received[-1] if received else None)
            return code
        if rank0:
            log_event(Path(self.run_dir), "end", job_id=job_id, restart=restart, exit_code=code)
        if code:
            raise RuntimeError(f"the trainer exited with code {code} (its error is above)")
        return code

    def stopped(self, signum: int | None) -> None:
        """Rank 0, after the trainer checkpointed on a signal: requeue the job, or say why not.

        Leaves with SystemExit (no submitit result), as submitit's own requeue does: the job is
        not finished, and its result comes from the allocation that finishes it.
        """
        run_dir, (job_id, restart) = Path(self.run_dir), _allocation()
        latest = run_dir / "checkpoints" / "latest"
        stop = {"job_id": job_id, "restart": restart, "signal": signal.Signals(signum).name if signum else None,
                "checkpoint": latest.read_text().strip() if latest.exists() else None}
        if signum == signal.SIGTERM:
            log_event(run_dir, "stop", **stop,
                      action="left to SLURM (requeue or preemption: it runs again; scancel or time limit: it does not)")
            _say(f"checkpoint {stop['checkpoint']} written on SIGTERM; SLURM requeues or ends the job")
            raise SystemExit(EXIT_REQUEUE)
        if restart >= self.max_requeues:
            log_event(run_dir, "stop", **stop, action=f"not requeued: --max-requeues {self.max_requeues} reached")
            raise RuntimeError(f"checkpoint {stop['checkpoint']} written, but the job was already requeued {restart} times "
                               f"(--max-requeues {self.max_requeues}); submit the same command again to continue")
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
        if result.returncode:
            log_event(run_dir, "stop", **stop, action=f"requeue failed: {result.stderr.strip()}")
            raise RuntimeError(f"checkpoint {stop['checkpoint']} written, but scontrol requeue {job_id} failed: "
                               f"{result.stderr.strip()}")
        log_event(run_dir, "stop", **stop, action=f"requeued ({restart + 1} of at most {self.max_requeues})")
        _say(f"checkpoint {stop['checkpoint']} written on {stop['signal']}; job {job_id} requeued "
             f"({restart + 1}/{self.max_requeues})")
        raise SystemExit(EXIT_REQUEUE)


def _allocation() -> tuple[str, int]:
    """(job id, how many times SLURM has requeued it so far) of the job this task belongs to."""
    return os.environ["SLURM_JOB_ID"], int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def _ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# ---------------------------------------------------------------------- submission


@dataclass
class TrainJob:
    """`python -m launch slurm train`: the job, its dry-run description, its submission."""

    config: Path
    overrides: list[str]
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    max_requeues: int
    signal_delay_s: int
    resources: sbatch.Resources
    resume_from: str | None = None  # previous or step_N: where the first allocation continues (`latest` is the default)

    def __post_init__(self) -> None:
        from trainer.checkpoint import Checkpoints
        from trainer.config import load_config

        self.config = self.config.resolve()
        self.run_dir = load_config(self.config, self.overrides).run_dir.resolve()  # also checks the config now, not in the queue
        if self.signal_delay_s >= sbatch.minutes(self.resources.time) * 60:
            raise sbatch.LaunchError(f"--signal-delay {self.signal_delay_s} s: must be shorter than --time {self.resources.time}")
        if self.resume_from == "latest":
            self.resume_from = None
        if self.resume_from:  # the checkpoint must exist now, not when the job leaves the queue
            Checkpoints(self.run_dir / "checkpoints").resume_tag(self.resume_from)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node

    def command(self) -> list[str]:
        return [sys.executable, "-m", "trainer", "--config", str(self.config), *self.overrides]

    def parameters(self) -> dict:
        extra = {"nodes": self.nodes, "ntasks_per_node": self.tasks_per_node, "signal_delay_s": self.signal_delay_s,
                 "additional_parameters": {"requeue": True}}
        if self.gpus_per_node:
            extra["gpus_per_node"] = self.gpus_per_node
        return self.resources.parameters(job_name=self.run_dir.name, **extra)

    def task(self) -> TrainTask:
        return TrainTask(self.command(), os.getcwd(), str(self.run_dir), self.max_requeues, self.resume_from)

    def task_envs(self) -> list[dict[str, str]]:
        """`task_env` of every task, from the variables srun sets (ranks in blocks of tasks per node)."""
        slurm = {"SLURM_NTASKS": str(self.world_size), "SLURM_JOB_NUM_NODES": str(self.nodes), "SLURM_JOB_ID": "0",
                 "SLURM_JOB_NODELIST": "<first host of $SLURM_JOB_NODELIST>"}
        if self.resources.cpus_per_task:
            slurm["SLURM_CPUS_PER_TASK"] = str(self.resources.cpus_per_task)
        if "OMP_NUM_THREADS" in os.environ:  # sbatch passes the submitting shell's environment on
            slurm["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
        per_node = self.tasks_per_node
        return [task_env({**slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % per_node)})
                for rank in range(self.world_size)]

    def describe(self) -> str:
        """The dry run: the sbatch script and what each task of the job starts with."""
        envs = self.task_envs()
        common = {k: v for k, v in envs[0].items() if k not in ("RANK", "LOCAL_RANK")}
        common["MASTER_PORT"] = "<20000-59999, from $SLURM_JOB_ID and $SLURM_RESTART_COUNT>"
        per_node = self.tasks_per_node
        lines = [
            f"run directory: {self.run_dir}",
            f"logs:          {sbatch.folder(self.run_dir)}/ (%j = the job id)",
            "", "# ---- sbatch script ----", sbatch.script(self.run_dir, self.parameters()).rstrip(), "",
            f"# ---- each of the {self.world_size} tasks ({self.nodes} nodes × {per_node}) runs, under submitit ----",
            shlex.join(self.task().command_for(0)),
            *([f"# (--resume-from {self.resume_from} in the first allocation only; a requeued one resumes from latest)"]
              if self.resume_from else []),
            "# with, in every task: " + " ".join(f"{k}={v}" for k, v in common.items()),
        ]
        for node in range(self.nodes):
            ranks = envs[node * per_node : (node + 1) * per_node]
            lines.append(f"#   node {node:>{len(str(self.nodes - 1))}}: RANK={_span(e['RANK'] for e in ranks)} "
                         f"LOCAL_RANK={_span(e['LOCAL_RANK'] for e in ranks)}")
        lines.append(f"# on SIGUSR2 ({self.signal_delay_s} s before --time) the trainer checkpoints and rank 0 requeues the job "
                     f"(at most {self.max_requeues} times); on SIGTERM (preemption, scontrol requeue) it checkpoints "
                     "and SLURM decides")
        return "\n".join(lines)

    def submit(self) -> str:
        job_id = sbatch.submit(self.run_dir, self.parameters(), self.task(), max_requeues=self.max_requeues)
        sbatch.record(self.run_dir, job_id, "train", nodes=self.nodes, tasks_per_node=self.tasks_per_node,
                      command=self.command(), resume_from=self.resume_from, max_requeues=self.max_requeues)
        return job_id


def _span(values: Iterable[str]) -> str:
    values = [int(v) for v in values]
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
