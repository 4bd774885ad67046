"""Training engines behind one interface, so the loop does not know which one runs:

    forward(input_ids) -> (loss, logits)     one micro-batch, causal-LM loss before accumulation scaling
    backward(loss); step()                   after every micro-batch; the update happens at the boundary
    grad_norm, lr                            of the last update
    save(root, tag) / load(root, tag)        collective: every rank writes/reads its shards in root/tag
    module; train() / eval()
"""

from __future__ import annotations

import torch

from trainer.config import Config
from trainer.schedule import lr_factor_fn


def adamw_with_schedule(model: torch.nn.Module, config: Config, total_steps: int):
    """AdamW (weight decay on matrices only, not on biases and norm gains) and its LambdaLR schedule."""
    optim = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, foreach=False)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_fn(config.schedule, total_steps))


def build_engine(model: torch.nn.Module, config: Config, world_size: int, total_steps: int, resume_world: int | None):
    """The engine `engine.type` names, ready to `load` a checkpoint written at `resume_world` processes."""
    if config.engine.type == "fsdp2":
        from trainer.engines.fsdp2_engine import FSDP2Engine

        return FSDP2Engine(model, config, world_size, total_steps)
    from trainer.engines.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(model, config, world_size, total_steps, resume_world)
