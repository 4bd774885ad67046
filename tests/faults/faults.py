"""Helpers of the fault-injection tests: start a run in the background, wait for a moment in it,
inject the fault, and compare what survives with an uninterrupted run."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from trainer_runs import ENV, descendants, metrics, train_cmd

ENGINES = {"deepspeed": (), "fsdp2": ("engine.type=fsdp2",)}  # overrides of the test config (default: DeepSpeed ZeRO)
TIMING = {"tokens_per_s", "step_s", "data_wait_frac", "peak_mem_gb", "mfu"}  # wall-clock numbers: never equal twice


def deterministic(run_dir: Path) -> list[dict]:
    """metrics.jsonl without its timings: what an exact resume must reproduce bit for bit."""
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics(run_dir)]


def start(config_file: Path, procs: int, run_dir: Path, *overrides: str, env: dict | None = None) -> subprocess.Popen:
    """A run in its own process group; its stderr goes to <run_dir>.err (see `stderr_of`)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.with_suffix(".err"), "w") as err:
        return subprocess.Popen(train_cmd(config_file, procs, run_dir, *overrides), env=env or ENV, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)


def stderr_of(run_dir: Path) -> str:
    return run_dir.with_suffix(".err").read_text()


def wait_for(proc: subprocess.Popen, moment: Callable[[], bool], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not moment():
        assert proc.poll() is None, "the run ended before the moment came"
        assert time.monotonic() < deadline, "the moment never came"
        time.sleep(0.005)


def logged(run_dir: Path, step: int) -> bool:
    """Whether the train record of `step` is in metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    return path.exists() and f'"step": {step}, "loss"' in path.read_text()


def staging(run_dir: Path, step: int) -> bool:
    """Whether the checkpoint of `step` is being written (its step_N.tmp directory exists)."""
    return (run_dir / "checkpoints" / f"step_{step:06d}.tmp").exists()


def published(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / f"step_{step:06d}" / "COMPLETE").exists()


def latest_step(run_dir: Path) -> int:
    """The step `latest` names (0: none), after checking that every published step_N directory is complete."""
    root = run_dir / "checkpoints"
    if not root.exists():
        return 0
    for ckpt in root.glob("step_*"):
        assert ckpt.suffix == ".tmp" or (ckpt / "COMPLETE").exists(), f"{ckpt} is published without COMPLETE"
    pointer = root / "latest"
    if not pointer.exists():
        return 0
    name = pointer.read_text().strip()
    assert (root / name / "COMPLETE").exists(), f"latest names {name}, which is incomplete"
    return int(name.split("_")[1])


def rank_pids(launcher: int) -> dict[int, int]:
    """{rank: pid} of the workers a torchrun launcher started."""
    ranks = {}
    for pid in descendants(launcher):
        environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        if "RANK" in environ:
            ranks[int(environ["RANK"])] = pid
    return ranks


def alive(pid: int) -> bool:
    """Running or stopped; not exited (a zombie not yet reaped has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
