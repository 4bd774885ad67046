"""How the training tests launch runs (torchrun, the deepspeed launcher, or one plain process, on CPU) and read their logs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def train_cmd(config_file: Path, procs: int, run_dir: Path, *overrides: str, launcher: str = "torchrun") -> list[str]:
    args = ["--config", str(config_file), f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", *overrides]
    if launcher == "deepspeed":
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(procs), "--master_port", str(_port()),
                "--module", "trainer", *args]
    if procs == 1:
        return [sys.executable, "-m", "trainer", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", str(_port()),
            "-m", "trainer", *args]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(config_file: Path, procs: int, run_dir: Path, *overrides: str, launcher: str = "torchrun", expect: int = 0):
    result = subprocess.run(train_cmd(config_file, procs, run_dir, *overrides, launcher=launcher), capture_output=True,
                            text=True, env=ENV, timeout=600)
    assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    """Train loss by step; a step logged twice (a resume that did not purge) fails the test."""
    steps = [m["step"] for m in metrics(run_dir) if "loss" in m]
    assert steps == sorted(set(steps)), steps
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def digests(run_dir: Path) -> dict[int, str]:
    return {m["step"]: m["batch_digest"] for m in metrics(run_dir) if "batch_digest" in m}


def rewind(src: Path, dst: Path, step: int) -> None:
    """A copy of run `src` as it was after checkpoint `step` (later checkpoints and logs removed)."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:06d}\n")
    best = json.loads((dst / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").read_text()).get("best")
    if best:  # `best` as it was then
        (dst / "checkpoints" / "best").write_text(f"step_{best['step']:06d}\n")
    shutil.rmtree(dst / "export", ignore_errors=True)


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it, stopped ones included (torchrun starts each
    rank in a session of its own, so the launcher's process group does not reach them)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def descendants(pid: int) -> list[int]:
    try:
        children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    except FileNotFoundError:
        return []
    return [grandchild for child in children for grandchild in (child, *descendants(child))]
