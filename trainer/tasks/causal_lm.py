"""Causal-LM pretraining on packed token rows: every token predicts the next one."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from trainer import distributed
from trainer.data import LanesLoader, Source
from trainer.parallel.mesh import data_coordinate
from trainer.tasks.base import Evaluation, TaskContext


class CausalLM:
    def __init__(self, ctx: TaskContext) -> None:
        self.ctx, self.config = ctx, ctx.config
        self.valid_loader = None
        if ctx.valid:
            data = data_coordinate(self.config, distributed.dist.get_rank(), distributed.dist.get_world_size())
            # The training run's lanes, one row each per eval batch, dealt over the data ranks (tensor/pipeline peers
            # read the same rows): an eval scores the same rows at every world size, so its loss does not depend on it.
            lanes = self.config.data.lanes
            self.valid_loader = LanesLoader(
                [Source(ctx.valid)], global_batch=lanes, lanes=lanes, seed=self.config.run.seed,
                rank=data.rank, world_size=data.world, verify=self.config.data.verify,
            )

    def tokens(self, rows: np.ndarray) -> int:
        return rows.size

    def inputs(self, rows: torch.Tensor, step: int, micro: int = 0, train: bool = False) -> dict[str, torch.Tensor]:
        return {"input_ids": rows, "labels": rows}

    def valid_batches(self) -> Iterator[torch.Tensor]:
        """The first `train.eval_batches` batches of the valid split: the same ones at every eval and world size."""
        batches = self.valid_loader.batches(0)
        try:
            for _ in range(self.config.train.eval_batches):
                yield torch.from_numpy(next(batches)).to(distributed.device())
        finally:
            batches.close()

    def evaluate(self, engine) -> Evaluation:
        """The mean loss of the valid rows, each rank's share run in forwards of at most train.micro_batch rows."""
        total, count, micro = 0.0, 0, self.config.train.micro_batch
        with torch.no_grad():
            for i, batch in enumerate(self.valid_batches()):
                for rows in batch.split(micro):  # every row has seq_len tokens: a row-weighted mean is the token mean
                    total, count = total + engine.forward(**self.inputs(rows, -1, i)).loss.item() * len(rows), count + len(rows)
        summed = distributed.all_reduce([total, count])
        loss = (summed[0] / summed[1]).item()
        return Evaluation({"loss": loss, "perplexity": math.exp(min(loss, 50))})

    def close(self) -> None:
        if self.valid_loader is not None:
            self.valid_loader.close()
