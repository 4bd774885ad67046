"""DeepSpeed ZeRO 0–3 (optionally CPU offload) as a dstrain engine.

The DeepSpeed JSON comes from `ds_configs/zero<stage>.json` (or `engine.ds_config`); every
`"auto"` field is filled from the run config, and a number the user wrote that contradicts the
run config is refused, so no number is written twice. The optimizer is `torch.optim.AdamW` and the
LR schedule a `LambdaLR`, both handed to `deepspeed.initialize` so they are checkpointed with the
engine (and nothing is JIT-compiled: DeepSpeed's fused Adam would cost ~40 s on CPU).
"""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from data_tools.common import CheckpointError
from trainer.checkpoint import unreadable
from trainer.config import Config, ConfigError
from trainer.distributed import device
from trainer.engines import adamw_with_schedule, blocks

DS_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
log = logging.getLogger("trainer")
# the non-tensor classes DeepSpeed pickles into its checkpoint files: plain records, nothing runs on load
DEEPSPEED_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
)


def safe_globals():
    """The context in which `torch.load(..., weights_only=True)` reads DeepSpeed's files."""
    import importlib

    return torch.serialization.safe_globals([getattr(importlib.import_module(m), n) for m, n in DEEPSPEED_GLOBALS])


def verify_torch_files(checkpoint: Path) -> None:
    """Refuse a checkpoint whose `.pt` files are unreadable (truncated, corrupt) or hold a pickle that
    would need more than tensors and DeepSpeed's records (a pickle can run code), before DeepSpeed
    itself reads them with `weights_only=False`. Tensor data is memory-mapped, not read."""
    for path in sorted(checkpoint.rglob("*.pt")):
        try:
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as err:
            raise unreadable(path, err) from None


def ds_config(config: Config, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config for this run, with "auto" fields filled and contradictions refused."""
    engine = config.engine
    if engine.ds_config:
        path = Path(engine.ds_config)
    else:
        offload = "_offload" if engine.offload == "cpu" and engine.zero_stage == 3 else ""
        path = DS_CONFIGS / f"zero{engine.zero_stage}{offload}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"engine.ds_config {path}: cannot read a JSON DeepSpeed config ({err})") from None
    grad_accum = config.train.accumulation(world_size)
    wanted = {
        ("train_batch_size",): config.train.global_batch,
        ("train_micro_batch_size_per_gpu",): config.train.micro_batch,
        ("gradient_accumulation_steps",): grad_accum,
        ("gradient_clipping",): config.optim.grad_clip,
        ("bf16", "enabled"): config.precision == "bf16",
        ("zero_optimization", "stage"): engine.zero_stage,
    }
    for keys, value in wanted.items():
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        current = node.get(keys[-1], "auto")
        if current == "auto":
            node[keys[-1]] = value
        elif current != value:
            raise ConfigError(f"{path}: '{'.'.join(keys)}' is {current} but the run config gives {value}; set it to \"auto\"")
    zero = data["zero_optimization"]
    if zero.get("overlap_comm") == "auto":
        # CUDA: gradient reductions run on a side stream while backward goes on. DeepSpeed's CPU accelerator has no
        # streams, so there they run in the backward hook either way and overlap would only double the bucket buffer.
        zero["overlap_comm"] = torch.cuda.is_available()
    if engine.offload == "cpu" and "offload_optimizer" not in zero:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if engine.offload == "cpu":
        data["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on CPU: no cpu_adam build
    if load_universal:
        data.setdefault("checkpoint", {})["load_universal"] = True
    return data


def convert_to_universal(checkpoint: Path) -> Path:
    """DeepSpeed's universal format, which any world size can load; done once, on rank 0."""
    target = checkpoint / "universal"
    if not (target / "COMPLETE").exists():
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint),
               "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise CheckpointError(f"{checkpoint}: conversion to a universal checkpoint failed ({tail})")
        (target / "COMPLETE").write_text("")
    return target


class DeepSpeedEngine:
    """`resume_world`: the world size of the checkpoint this run will load, if any. When it differs,
    ZeRO 1-3 state must come through DeepSpeed's universal format, which is chosen at initialize."""

    def __init__(self, model: torch.nn.Module, config: Config, world_size: int, total_steps: int,
                 resume_world: int | None = None) -> None:
        import deepspeed

        if config.engine.zero_stage in (1, 2):
            # lets ds_to_universal convert ZeRO-1/2 checkpoints when the world size changes
            model.universal_checkpoint_info = {"universal_checkpoint_version": 0.4}
        blocks.checkpoint_activations(model, config.engine.activation_checkpointing)
        if config.engine.compile:
            blocks.compile_blocks(model)
        optimizer, scheduler = adamw_with_schedule(model, config, total_steps)
        self.universal = resume_world not in (None, world_size) and config.engine.zero_stage > 0
        self.data_rank, self.data_world = dist.get_rank(), world_size  # ZeRO: every rank is a data-parallel rank
        self.data_leader = True
        self.pipelined = False  # forward/backward per micro-batch, driven by the loop
        self.ds_config = ds_config(config, world_size, self.universal)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )

    def place_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model that only runs forwards (a distillation teacher), placed as the student is: under
        ZeRO-3 partitioned across ranks (its parameters on the CPU with `offload_param`), gathered
        layer by layer for each forward; under ZeRO 0-2 a replica on this rank's device."""
        model = model.requires_grad_(False).eval()
        if self.ds_config["zero_optimization"]["stage"] < 3:
            return model.to(device())
        import deepspeed

        zero = {k: v for k, v in self.ds_config["zero_optimization"].items() if k != "offload_optimizer"}
        frozen = {**{k: v for k, v in self.ds_config.items() if k != "checkpoint"}, "zero_optimization": zero}
        engine, *_ = deepspeed.initialize(model=model, config=frozen, dist_init_required=False)
        engine.eval()
        return engine

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def forward(self, **inputs: torch.Tensor):
        return self.engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    @property
    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, root: Path, tag: str) -> None:
        self.engine.save_checkpoint(str(root), tag=tag, save_latest=False)

    def load(self, root: Path, tag: str) -> None:
        verify_torch_files(root / tag)
        if self.universal:
            if dist.get_rank() == 0:
                log.info("%s was written at another world size: converting it to a universal checkpoint", root / tag)
                convert_to_universal(root / tag)
            dist.barrier()
            root, tag = root / tag, "universal"
        path, _ = self.engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"{root / tag}: DeepSpeed found no checkpoint to load")

    def eval(self) -> None:
        self.engine.eval()

    def train(self) -> None:
        self.engine.train()
