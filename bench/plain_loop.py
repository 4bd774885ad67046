"""The plain PyTorch loop that the trainer benches measure dstrain against: the run's Hugging Face model (built by
`trainer.models.build_model` under the run's seed), torch AdamW and LambdaLR as dstrain's engines build them, and the
very global batches dstrain's loop gets from `LanesLoader`, in memory; forward/backward per micro-batch, grad
clipping, step. Nothing else: no engine, loader thread, NaN checks, collectives or logging.

Shared by bench/trainer_bench.py (a pretraining step) and bench/dp_bench.py (finetuning and pretraining against
1 and 2 data-parallel processes), so both compare against the same loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by the side that runs the loop, in its own process
    import numpy as np
    import torch

    from data_tools.manifest import Manifest
    from trainer.config import Config


@dataclass
class PlainRun:
    """Per step (index 0 = step 1): wall seconds, mean loss, batch digest; and the trained model."""

    step_s: list[float]
    loss: list[float]
    digests: list[str]
    model: torch.nn.Module


def global_batches(config: Config, manifest: Manifest, steps: int) -> tuple[list[np.ndarray], list[str]]:
    """The first `steps` global batches exactly as dstrain's loop gets them, and their digests."""
    from trainer.data import LanesLoader, Source, batch_digest

    loader = LanesLoader([Source(manifest)], global_batch=config.train.global_batch, lanes=config.data.lanes,
                         seed=config.run.seed, rank=0, world_size=1)
    with loader:
        stream = loader.batches(0)
        batches = [next(stream) for _ in range(steps)]
    return batches, [batch_digest(loader.local_lane_digests(rows)) for rows in batches]


def model_and_optimizer(
    config: Config, manifest: Manifest, steps: int
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The model, AdamW and LambdaLR exactly as dstrain's engines build them."""
    from trainer.engines import adamw_with_schedule
    from trainer.models import build_model

    tok = manifest.tokenizer
    model = build_model(config, tok.vocab_size, manifest.seq_len, tok.eos_id, manifest.labels, config.run.seed)
    return (model, *adamw_with_schedule(model, config, steps))


def pad_id(model: torch.nn.Module, manifest: Manifest) -> int:
    """The id that fills padded positions, as the trainer's tasks choose it."""
    return model.config.pad_token_id if model.config.pad_token_id is not None else manifest.tokenizer.eos_id


def train(config: Config, manifest: Manifest, steps: int) -> PlainRun:
    """`steps` optimizer steps of the plain loop over dstrain's first global batches."""
    import torch

    from trainer.compress.evaluate import model_inputs  # the inputs the tasks build from rows: packed LM or labelled

    batches, digests = global_batches(config, manifest, steps)
    model, optimizer, scheduler = model_and_optimizer(config, manifest, steps)
    model.train()
    micro, accum, pad = config.train.micro_batch, config.train.accumulation(1), pad_id(model, manifest)
    step_s, losses = [], []
    for rows in batches:
        started, step_loss = time.perf_counter(), 0.0
        for first in range(0, len(rows), micro):
            loss = model(**model_inputs(manifest, torch.from_numpy(rows[first : first + micro]), pad)).loss
            (loss / accum).backward()
            step_loss += loss.item() / accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - started)
        losses.append(step_loss)
    return PlainRun(step_s, losses, digests, model)
