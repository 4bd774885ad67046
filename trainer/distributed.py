"""Process-group setup and the few collectives the loop needs.

Works under the `deepspeed` launcher, `torchrun`, or plain `python -m trainer` (one process).
On a machine without CUDA it selects DeepSpeed's CPU accelerator and gloo, and skips the
`deepspeed_shm_comm` JIT build that `init_distributed` would otherwise do (~25 s; ZeRO training
never uses it).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from collections.abc import Mapping
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from data_tools.common import first_line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(timeout_s: float = 600) -> tuple[int, int, int]:
    """Start the process group; return (rank, world_size, local_rank).

    `timeout_s` bounds every collective: when another rank dies or stalls, this one fails after at
    most that long (instead of waiting forever) and its last stderr line says so."""
    if "RANK" not in os.environ:  # a plain single-process run
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        share_cores()
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)  # its per-call INFO lines would drown the step log
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    if not cuda:
        deepspeed.ops.__compatible_ops__ = {}
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = timedelta(seconds=timeout_s)
    # Process groups created later (DeepSpeed's clone of the world group, which carries ZeRO's gradient
    # reductions) take torch's module default (30 min), not the world group's timeout: set that too.
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout)
    _explain_collective_failures(dist.get_rank(), timeout_s)
    return dist.get_rank(), dist.get_world_size(), local_rank


def cpu_threads(environ: Mapping[str, str], cores: int) -> int | None:
    """Torch threads for one of a node's processes on CPU: `cores` (what torch would take in a process alone)
    shared out among the node's processes (the launcher's LOCAL_WORLD_SIZE, or the deepspeed launcher's
    LOCAL_SIZE), at least 1; None to keep torch's own choice: one process, or OMP_NUM_THREADS given. torchrun sets
    OMP_NUM_THREADS=1 for several processes, the deepspeed launcher sets nothing, and torch's default (every core in
    each process) would put 2 × N threads on N cores with 2 processes: they then wait for each other at every
    parallel op, and a step takes longer than with one process."""
    local_world = int(environ.get("LOCAL_WORLD_SIZE") or environ.get("LOCAL_SIZE") or 1)
    if "OMP_NUM_THREADS" in environ or local_world == 1:
        return None
    return max(1, cores // local_world)


def share_cores() -> None:
    """Set torch's thread count by `cpu_threads`."""
    threads = cpu_threads(os.environ, torch.get_num_threads())
    if threads is not None:
        torch.set_num_threads(threads)


def _explain_collective_failures(rank: int, timeout_s: float) -> None:
    """After the traceback of an uncaught collective failure (ours or DeepSpeed's), one line saying what it means."""
    previous = sys.excepthook

    def hook(kind, error, trace) -> None:
        previous(kind, error, trace)
        if isinstance(error, dist.DistError) or "gloo" in str(error).lower() or "nccl" in str(error).lower():
            print(f"error: rank {rank}: a collective failed or waited over {timeout_s:g} s ({first_line(error, 200)}); "
                  "another rank died or stalled (train.collective_timeout_s bounds the wait); "
                  "run the same command to resume from the last checkpoint",
                  file=sys.stderr)

    sys.excepthook = hook


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce(values: list[float] | torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float64 if not isinstance(values, torch.Tensor) else values.dtype).to(device())
    dist.all_reduce(tensor, op=op)
    return tensor.cpu()


def barrier() -> None:
    dist.barrier()
