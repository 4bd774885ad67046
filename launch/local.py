"""One machine, no scheduler: `python -m launch local --config X --nproc N [--launcher deepspeed]`
prints the `torchrun` (default) or `deepspeed` command line for N trainer processes and runs it.

On a machine without CUDA it also sets what the README asks for there: `DS_ACCELERATOR=cpu` (the
deepspeed launcher counts devices through it) and `OMP_NUM_THREADS` to each process's share of the cores.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

LAUNCHERS = ("torchrun", "deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(config: Path, overrides: list[str], nproc: int, launcher: str, port: int) -> list[str]:
    trainer = ["--config", str(config), *overrides]
    if launcher == "deepspeed":
        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        return [deepspeed, "--num_gpus", str(nproc), "--master_port", str(port), "--module", "trainer", *trainer]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
            "-m", "trainer", *trainer]


def cpu_environment(cuda: bool, nproc: int, cores: int) -> dict[str, str]:
    """The variables added on a machine without CUDA (none with it); set ones are kept. Each of the `nproc`
    processes gets its share of the `cores` torch would take alone: one process all of them, two half each."""
    if cuda:
        return {}
    wanted = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, cores // nproc))}
    return {k: v for k, v in wanted.items() if k not in os.environ}


def run(config: Path, overrides: list[str], nproc: int | None, launcher: str, dry_run: bool) -> int:
    import torch

    cuda = torch.cuda.is_available()
    nproc = nproc or (torch.cuda.device_count() if cuda else 1)
    cmd = command(config, overrides, nproc, launcher, free_port())
    extra = cpu_environment(cuda, nproc, torch.get_num_threads())
    print(" ".join([*(f"{k}={v}" for k, v in extra.items()), shlex.join(cmd)]), flush=True)
    if dry_run:
        return 0
    return subprocess.run(cmd, env={**os.environ, **extra}, check=False).returncode
