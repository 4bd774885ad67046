"""PyTorch FSDP2 (`fully_shard`) as a dstrain engine, on the run's device mesh (trainer.parallel.mesh).

With `parallel.tp > 1` the model is first sharded by tensor parallel plans (trainer.parallel.tensor)
over the mesh's tp dimension; FSDP then shards over the data-parallel dimensions, replicating over
dp_replicate when it is > 1 (HSDP). Each transformer block is sharded on its own, then the root (embeddings, final norm, head), so
parameters are gathered one block at a time. Mixed precision keeps fp32 master weights and
computes in bf16 with fp32 gradient reduction unless told otherwise. Checkpoints are
`torch.distributed.checkpoint` (DCP) directories — one file per rank plus metadata — which load
at any world size: DCP reshards on read. With `parallel.pp > 1` the model is split into pipeline stages
(trainer.parallel.pipeline), each tensor parallel over tp and sharded over the data-parallel ranks of its
pp coordinate; optimizer state is saved keyed by parameter name, so a checkpoint of any stage layout
loads into any other.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from data_tools.common import CheckpointError, first_line
from trainer import models
from trainer.checkpoint import unreadable
from trainer.config import Config, ConfigError, ParallelConfig
from trainer.distributed import device
from trainer.engines import adamw_with_schedule, blocks
from trainer.engines.dcp_async import BackgroundWriter
from trainer.parallel import tensor
from trainer.parallel.mesh import Layout, Mesh
from trainer.parallel.pipeline import Pipeline


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks sharded one by one: decoder layers, BERT `encoder.layer`, T5/BART encoder and
    decoder blocks, also inside a peft wrapper (trainer.models.transformer_blocks)."""
    blocks = models.transformer_blocks(model)
    if not blocks:
        raise ConfigError(f"engine.type fsdp2: cannot find the transformer blocks of {type(model).__name__}")
    return blocks


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a plain pickle: allow its record classes, torch dtypes and sizes, paths; nothing callable else."""

    def find_class(self, module: str, name: str):
        allowed = (
            ("." not in name and module.startswith("torch.distributed.checkpoint.")) or (module, name) in _METADATA_GLOBALS
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        found = super().find_class(module, name) if allowed else None
        if found is None or (module.startswith("torch.distributed.checkpoint.") and not isinstance(found, type)):
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed")
        return found


_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                     ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}


def verify_dcp(directory: Path):
    """Refuse a DCP checkpoint whose `.metadata` or non-tensor items would unpickle more than records and plain
    values (DCP reads both with full pickle, a pickle can run code), or that is unreadable, before `dcp.load`;
    return its metadata."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    path = directory / ".metadata"
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        for fqn, item in metadata.state_dict_metadata.items():
            if isinstance(item, BytesStorageMetadata):
                info = metadata.storage_data[MetadataIndex(fqn)]
                path = directory / info.relative_path
                with open(path, "rb") as f:
                    f.seek(info.offset)
                    torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, KeyError, AttributeError) as err:
        raise unreadable(path, err) from None
    return metadata


# Optimizer state and hyperparameters keyed by parameter name: a pipeline stage holds some of the parameters,
# and a checkpoint written at one stage layout loads at any other (or into the whole model).
BY_NAME = StateDictOptions(flatten_optimizer_state_dict=True)
GROUPED = StateDictOptions()  # checkpoints written before: param groups as lists (`optim.param_groups.0.lr`)


def _check_unsupported(parallel: ParallelConfig) -> None:
    """Dimensions this engine does not run yet, refused before any process group is built (cp on CPU: Layout.resolve)."""
    if parallel.cp > 1:
        raise ConfigError(f"parallel.cp {parallel.cp}: context parallel is not available in this engine yet; set parallel.cp=1")


class FSDP2Engine:
    def __init__(self, model: torch.nn.Module, config: Config, world_size: int, total_steps: int) -> None:
        engine = config.engine
        blocks.checkpoint_activations(model, engine.activation_checkpointing)
        bf16 = config.precision == "bf16"
        mixed = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None,
            reduce_dtype=torch.bfloat16 if bf16 and engine.reduce_dtype == "bf16" else torch.float32 if bf16 else None,
        )
        offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if engine.offload == "cpu" else OffloadPolicy()
        _check_unsupported(config.parallel)
        layout = Layout.resolve(config.parallel, world_size)
        self.mesh = Mesh(layout, device().type, dist.get_rank())
        self.data_rank, self.data_world, self.data_leader = self.mesh.data.rank, self.mesh.data.world, self.mesh.data.leader
        self.tp, self.compile, self.whole = layout.tp, engine.compile, model
        self.reshard = engine.reshard_after_forward is not False  # false: gathered from forward to the step's end
        if self.tp > 1:
            # the grad norm of a parameter sharded over (dp, tp) reduces over both dims, one after the other: DTensor
            # warns that a flattened mesh would take one collective; the result is the same, so say it not on every step
            logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
            tensor.check(model, config, self.tp)
        self.sharding = {"mesh": self.mesh.dp, "mp_policy": mixed, "offload_policy": offload}
        self.pipeline: Pipeline | None = None
        if layout.pp > 1:  # the stages of this pp rank, each tensor parallel and sharded over its data-parallel ranks
            self.pipeline = Pipeline(model, config, self.mesh, config.train.global_batch // self.data_world, device(),
                                     self._parallelize, self._shard)
            self.model = self.pipeline.local
        else:
            self._parallelize(model)
            self._shard(model)
            self.model = model
        self.pipelined = self.pipeline is not None
        self.optimizer, self.scheduler = adamw_with_schedule(self.model, config, total_steps)
        self.accum = config.train.accumulation(self.data_world)
        self.clip = config.optim.grad_clip
        self.micro = 0
        self._grad_norm: float | None = None
        self.background = (BackgroundWriter(config.train.collective_timeout_s, config.debug.checkpoint_write_delay_s)
                           if config.train.async_checkpoint else None)

    def _parallelize(self, model: torch.nn.Module) -> None:
        if self.tp > 1:
            tensor.parallelize(model, self.mesh.tp)

    def _shard(self, model: torch.nn.Module) -> None:
        """`engine.compile`'s blocks (as the DeepSpeed engine compiles them), then sharded."""
        if self.compile:
            blocks.compile_blocks(model)
        self._fully_shard(model, self.reshard)

    def _fully_shard(self, model: torch.nn.Module, reshard_after_forward: bool = True) -> None:
        """FSDP over the data-parallel mesh: each transformer block, then `model` as the root."""
        for block in transformer_blocks(model):
            fully_shard(block, **self.sharding, reshard_after_forward=reshard_after_forward)
        fully_shard(model, **self.sharding, reshard_after_forward=reshard_after_forward)

    @property
    def module(self) -> torch.nn.Module:
        """The whole model (its config, its size); under pipelining this rank holds only its stages' parts of it."""
        return self.whole

    def place_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model that only runs forwards (a distillation teacher), sharded as the student is: each
        block's parameters split across ranks (on the CPU with `engine.offload: cpu`), gathered for
        its forward and freed after."""
        model = model.requires_grad_(False).eval()
        self._fully_shard(model)
        return model

    def forward(self, **inputs: torch.Tensor):
        if self.pipeline:  # forward only: evaluation
            return self.pipeline.forward(inputs)
        with tensor.loss_context(self.tp):  # under tp the model's own loss is vocab-parallel
            output = self.model(**inputs)
        if isinstance(output.loss, DTensor):  # replicated: the same scalar on every tp rank
            output.loss = output.loss.to_local()
        return output

    def forward_backward(self, inputs: dict[str, torch.Tensor], poison: bool = False) -> tuple[float, int]:
        """Pipelined: the step's forward and backward over all of the rank's rows; (mean loss, non-finite micro-batches).
        `poison` makes micro-batch 0's loss NaN (debug.nan_at_steps)."""
        return self.pipeline.forward_backward(inputs, poison)

    def backward(self, loss: torch.Tensor) -> None:
        # Reduce-scatter gradients only on the last micro-batch; earlier ones accumulate locally. Without
        # resharding after forward the blocks also stay gathered until then: the next forward gathers nothing.
        last = self.micro == self.accum - 1
        self.model.set_requires_gradient_sync(last)
        if not self.reshard:
            self.model.set_reshard_after_backward(last)
        with tensor.loss_context(self.tp):
            (loss / self.accum).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro < self.accum and not self.pipeline:
            return
        max_norm = self.clip if self.clip > 0 else float("inf")
        if self.pipeline:
            self._grad_norm = self.pipeline.clip_grad_norm(max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            self._grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.micro = 0

    @property
    def grad_norm(self) -> float | None:
        return self._grad_norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, root: Path, tag: str) -> Future | None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=BY_NAME)
        if self.pipeline:  # a tied embedding's state once, as the unsplit model saves it
            optim_state = self.pipeline.saved_optimizer_state(optim_state)
        state, path, written = {"model": model_state, "optim": optim_state}, root / tag / "dcp", None
        if self.background:  # train.async_checkpoint
            written = self.background.save(state, path)
        else:
            dcp.save(state, checkpoint_id=str(path))
        if dist.get_rank() == 0:
            (root / tag / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))
        return written

    def load(self, root: Path, tag: str) -> None:
        metadata = verify_dcp(root / tag / "dcp")
        options = GROUPED if "optim.param_groups.0.lr" in metadata.state_dict_metadata else BY_NAME
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
        if self.pipeline:  # a tied head copy reads the embedding's state
            optim_state = self.pipeline.optimizer_state_to_load(optim_state)
        state = {"model": model_state, "optim": optim_state}
        try:
            dcp.load(state, checkpoint_id=str(root / tag / "dcp"))
        except Exception as err:  # DCP wraps shape and key mismatches in CheckpointException
            raise CheckpointError(f"{root / tag}: cannot load into this model ({first_line(err, 200)})") from None
        if self.pipeline:
            state["optim"] = self.pipeline.optimizer_state_to_load(state["optim"], loaded=True)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)
        self.scheduler.load_state_dict(json.loads((root / tag / "scheduler.json").read_text()))

    def eval(self) -> None:
        self.model.eval()

    def train(self) -> None:
        self.model.train()
