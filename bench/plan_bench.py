"""`trainer plan`'s memory estimate against the memory each process really uses, layout by layout.

Each layout trains a Llama-style model (hidden 512, 4 layers, 8 heads, 2 kv heads, vocabulary 8192,
256-token rows, fp32) for STEPS steps on random tokens with the FSDP2 engine under `torchrun` on
CPU (gloo). Measured: the process's heap in use (glibc `mallinfo2`: allocated + mmapped bytes, the
CPU allocator does not cache), sampled every 0.2 ms by a thread and at every module's forward,
during forward and backward (the plan's peak), less the heap before the model was built; the
optimizer step's own peak (foreach temporaries) is shown beside it, not compared. Components
counted exactly at the end: local parameter shards, AdamW state, and the unsharded gradients FSDP2
accumulates between micro-batches. The estimate is `trainer.plan_mesh.plan_mesh` for the same
config. Pipeline layouts are not measured here yet.

    PYTHONPATH=. .venv/bin/python bench/plan_bench.py [LAYOUT …]
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, STEPS = 8192, 256, 3
MODEL = ["model.arch=llama", "model.hidden_size=512", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=2",
         "model.intermediate_size=1408", "model.tie_embeddings=false"]
# (name, world, overrides); global batch 8 rows; micro_batch sets the accumulation steps
LAYOUTS = [
    ("dp1", 1, ["train.micro_batch=8"]),
    ("dp1, 2 micro-batches", 1, ["train.micro_batch=4"]),
    ("dp1, recomputation", 1, ["train.micro_batch=8", "engine.activation_checkpointing=true"]),
    ("dp2", 2, ["train.micro_batch=4"]),
    ("dp2, 2 micro-batches", 2, ["train.micro_batch=2"]),
    ("dp4", 4, ["train.micro_batch=2"]),
    ("hsdp 2×2", 4, ["parallel.dp_replicate=2", "train.micro_batch=2"]),
    ("dp2 × tp2", 4, ["parallel.tp=2", "train.micro_batch=4"]),
]


def overrides(extra: list[str]) -> list[str]:
    return [*MODEL, "engine.type=fsdp2", "precision=fp32", "data.train=unused", "data.lanes=8", "train.global_batch=8",
            "train.max_steps=3", *extra]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                      "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def heap() -> int:
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakSampler:
    """The largest heap seen while `active`, from a polling thread and from module forward hooks."""

    def __init__(self) -> None:
        import torch

        self.active, self.peak, self.done = False, 0, False
        torch.nn.modules.module.register_module_forward_hook(lambda *_: self.sample())
        threading.Thread(target=self._poll, daemon=True).start()

    def sample(self) -> None:
        if self.active:
            self.peak = max(self.peak, heap())

    def _poll(self) -> None:
        while not self.done:
            self.sample()
            time.sleep(0.0002)


def worker(extra: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from trainer import distributed
    from trainer.config import load_config
    from trainer.engines.fsdp2_engine import FSDP2Engine
    from trainer.models import build_model

    rank, world, _ = distributed.init()
    config = load_config(None, overrides(extra))
    sampler = PeakSampler()
    base = heap()
    model = build_model(config, VOCAB, SEQ, eos_id=0, labels=[], seed=0)
    engine = FSDP2Engine(model, config, world, STEPS)
    accumulation = engine.accum
    generator = torch.Generator().manual_seed(engine.data_rank)  # tensor-parallel peers read the same rows
    step_peak = 0
    accumulated = 0
    for _ in range(STEPS):
        for micro in range(accumulation):
            tokens = torch.randint(0, VOCAB, (config.train.micro_batch, SEQ), generator=generator)
            sampler.active = True
            engine.backward(engine.forward(input_ids=tokens, labels=tokens).loss)
            sampler.active = False
            if micro < accumulation - 1:  # FSDP2's unsharded gradients kept until the last micro-batch
                accumulated = sum(_accumulated(p) for state in _fsdp_states(model) for p in state)
            before = heap()
            engine.step()
            step_peak = max(step_peak, heap(), before)
    sampler.done = True
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    optimizer = sum(t.to_local().numel() * t.element_size() for s in engine.optimizer.state.values() for t in s.values()
                    if getattr(t, "dim", lambda: 0)() > 0)
    result = {"rank": rank, "peak": sampler.peak - base, "step_peak": step_peak - base, "params": local,
              "optimizer": optimizer, "accumulated_grads": accumulated}
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        print("RESULT " + json.dumps(gathered))
    dist.destroy_process_group()


def _fsdp_states(model) -> list:
    """Each FSDP2 unit's parameters (FSDPParam records: they hold the accumulated unsharded gradient)."""
    from trainer.engines.fsdp2_engine import transformer_blocks

    groups = [module._get_fsdp_state()._fsdp_param_group for module in [*transformer_blocks(model), model]]
    return [group.fsdp_params for group in groups if group is not None]


def _accumulated(param) -> int:
    """Bytes of one FSDPParam's unsharded gradient kept across micro-batches: a separate buffer when the
    reduce dtype differs from the compute dtype, else the unsharded parameter's own .grad."""
    grad = param.unsharded_accumulated_grad
    if grad is None and hasattr(param, "_unsharded_param"):
        grad = param._unsharded_param.grad
    return 0 if grad is None else grad.numel() * grad.element_size()


def estimate(world: int, extra: list[str]):
    from trainer.config import load_config
    from trainer.plan import Shape
    from trainer.plan_mesh import Mesh, plan_mesh

    config = load_config(None, overrides(extra))
    return plan_mesh(Shape.of(config.model, VOCAB, SEQ), Mesh.of(config, world), SEQ, config.precision, world).memory


def measure(world: int, extra: list[str]) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
               __file__, "--worker", *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{' '.join(extra)}: no result\n{done.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main(only: list[str]) -> None:
    """Every layout, or those named (`dp4 'hsdp 2×2'`)."""
    mib = 2**20
    print(f"{'layout':<26}{'estimate MiB':>13}{'measured MiB':>13}{'ratio':>7}{'step peak':>10}"
          "   exact parts (estimate = measured)")
    for name, world, extra in [layout for layout in LAYOUTS if not only or layout[0] in only]:
        memory = estimate(world, extra)
        ranks = measure(world, extra)
        peak = max(r["peak"] for r in ranks)
        worst = max(ranks, key=lambda r: r["peak"])
        parts = f"params {worst['params'] / mib:.1f}, optimizer {worst['optimizer'] / mib:.1f}"
        if worst["accumulated_grads"]:
            parts += f", accumulated grads {worst['accumulated_grads'] / mib:.1f}"
        print(f"{name:<26}{memory.total / mib:>13.1f}{peak / mib:>13.1f}{memory.total / peak:>7.2f}"
              f"{max(r['step_peak'] for r in ranks) / mib:>10.1f}   {parts}; estimate params+gathered {memory.params / mib:.1f}, "
              f"optimizer {memory.optimizer / mib:.1f}, grads {memory.grads / mib:.1f}, "
              f"activations {memory.activations / mib:.1f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main(sys.argv[1:])
