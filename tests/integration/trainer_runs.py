"""How the training tests launch runs: torchrun, the deepspeed launcher, or one plain process, on CPU."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def train_cmd(config_file: Path, procs: int, run_dir: Path, *overrides: str, launcher: str = "torchrun") -> list[str]:
    args = ["--config", str(config_file), f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", *overrides]
    if launcher == "deepspeed":
        return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(procs), "--master_port", str(_port()), "--module", "trainer", *args]
    if procs == 1:
        return [sys.executable, "-m", "trainer", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", str(_port()), "-m", "trainer", *args]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
