"""Training engines behind one interface (`Engine`), so the loop does not know which one runs."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Protocol

import torch

from trainer.config import Config, ConfigError
from trainer.models import layer_indices, task_head
from trainer.schedule import lr_factor_fn


class Engine(Protocol):
    """What the loop needs from an engine (DeepSpeed ZeRO, FSDP2); see ARCHITECTURE.md, "Engines".

    `data_rank` / `data_world` are this process's coordinate among the data-parallel replicas: the
    loader deals lanes by them and the accumulation arithmetic divides by `data_world`. For ZeRO and
    plain FSDP they are the process rank and world size; a mesh with tensor or pipeline dimensions
    makes them smaller than the world. `data_leader` is true on one process of each data rank, the one
    that counts its rows' tokens and lane digests in sums over all processes.

    `pipelined` engines (FSDP2 with parallel.pp > 1) own the micro-batch schedule: the loop hands the
    whole step's rows to `forward_backward(inputs, poison)`, which returns (mean loss, non-finite
    micro-batches), then calls `step()` once; `forward` is then forward-only, for evaluation.
    """

    data_rank: int
    data_world: int
    data_leader: bool
    pipelined: bool

    @property
    def module(self) -> torch.nn.Module: ...  # the wrapped model

    @property
    def lr(self) -> float: ...  # of the last update

    @property
    def grad_norm(self) -> float | None: ...  # of the last update; None when the engine does not compute it

    def forward(self, **inputs: torch.Tensor): ...  # one micro-batch through the wrapped model; the task makes the loss

    def backward(self, loss: torch.Tensor) -> None: ...  # after every micro-batch

    def step(self) -> None: ...  # after every micro-batch; the update happens at the accumulation boundary

    def place_frozen(self, model: torch.nn.Module) -> torch.nn.Module: ...  # a forward-only model placed like the student

    # collective: every rank writes its shards into root/tag; with train.async_checkpoint the files are written in the
    # background and the future completes (on rank 0: after every rank's) when they are
    def save(self, root: Path, tag: str) -> Future | None: ...

    def load(self, root: Path, tag: str) -> None: ...  # collective: every rank reads its shards from root/tag

    def train(self) -> None: ...

    def eval(self) -> None: ...


def adamw_with_schedule(model: torch.nn.Module, config: Config, total_steps: int):
    """AdamW over the trainable parameters and a LambdaLR with one lambda per parameter group.

    Groups split weight decay (matrices only, not biases and norm gains) and, when configured,
    layer-wise LR decay (layer l of L + 1 gets lr · layer_decay^(L + 1 − l); trainer.models.layer_indices),
    `optim.head_lr` for the task head, and gradual unfreezing: layer l's lambda is 0 until step
    unfreeze_every · (L + 1 − l), so the top (head, final norm) trains from the start and one more
    block thaws every N steps, embeddings last. Gating the LR instead of requires_grad keeps the
    optimizer's parameter set fixed (DeepSpeed fixes it at initialize) and makes a resumed run
    exact, since each lambda depends only on the step. Layers not yet thawed still get gradients and
    Adam moments, only no update. Group 0 has the plain `optim.lr` schedule whenever some group does:
    it is the LR engines report. `optim.impl` picks the kernels: the same update, computed per parameter, as one
    multi-tensor pass, or fused (fewer kernel launches on a GPU; fused has a CPU kernel too).
    """
    optim = config.optim
    groups, thaw_steps = param_groups(model, config)
    kernels = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[optim.impl]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, **kernels)
    factor = lr_factor_fn(config.schedule, total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, [_gated(factor, thaw) for thaw in thaw_steps])


def param_groups(model: torch.nn.Module, config: Config) -> tuple[list[dict], list[int]]:
    """(optimizer param groups, the step each group thaws at), main group first; frozen parameters left out."""
    optim, every = config.optim, config.freeze.unfreeze_every
    _check(optim.layer_decay, optim.head_lr, every)
    head = task_head(model) if optim.head_lr is not None else None
    if optim.head_lr is not None and head is None:
        raise ConfigError(f"optim.head_lr: {type(model).__name__} has no classification head; unset it")
    head_params = {id(p) for p in head[1].parameters()} if head else set()
    by_layer = optim.layer_decay != 1 or every is not None
    index, layers = layer_indices(model) if by_layer else ({}, 0)
    groups: dict[tuple[bool, int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head, layer, decay = id(param) in head_params, index.get(name, layers + 1), param.dim() >= 2
        if (is_head, layer, decay) not in groups:
            lr = (optim.head_lr if is_head else optim.lr) * optim.layer_decay ** (layers + 1 - layer)
            label = "head" if is_head else f"layer{layer}" if by_layer else ""
            groups[is_head, layer, decay] = {
                "params": [], "weight_decay": optim.weight_decay if decay else 0.0, "lr": lr,
                "name": ".".join(filter(None, (label, "decay" if decay else "no_decay"))),
                "thaw": 0 if is_head or every is None else every * (layers + 1 - layer),
            }
        groups[is_head, layer, decay]["params"].append(param)

    def order(key: tuple[bool, int, bool]) -> tuple:
        group = groups[key]
        return group["lr"] != optim.lr or group["thaw"] > 0, key[0], -key[1], not key[2]

    ordered = [groups[key] for key in sorted(groups, key=order)]
    return [{k: v for k, v in group.items() if k != "thaw"} for group in ordered], [group["thaw"] for group in ordered]


def _check(layer_decay: float, head_lr: float | None, unfreeze_every: int | None) -> None:
    if not 0 < layer_decay <= 1:
        raise ConfigError(f"optim.layer_decay must be in (0, 1], got {layer_decay}; 1 turns layer-wise decay off")
    if head_lr is not None and head_lr <= 0:
        raise ConfigError(f"optim.head_lr must be positive, got {head_lr}; unset it to use optim.lr")
    if unfreeze_every is not None and unfreeze_every < 1:
        raise ConfigError(f"freeze.unfreeze_every must be a positive number of steps, got {unfreeze_every}; "
                          "unset it to train all layers from the start")


def _gated(factor: Callable[[int], float], thaw: int) -> Callable[[int], float]:
    """The schedule factor, 0 before step `thaw`."""
    if thaw == 0:
        return factor
    return lambda step: factor(step) if step >= thaw else 0.0


def build_engine(model: torch.nn.Module, config: Config, world_size: int, total_steps: int, resume_world: int | None) -> Engine:
    """The engine `engine.type` names, ready to `load` a checkpoint written at `resume_world` processes."""
    if config.engine.type == "fsdp2":
        from trainer.engines.fsdp2_engine import FSDP2Engine

        return FSDP2Engine(model, config, world_size, total_steps)
    from trainer.engines.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(model, config, world_size, total_steps, resume_world)
