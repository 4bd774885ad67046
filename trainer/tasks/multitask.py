"""Multi-task finetuning on a mixture of classification and token-classification sources (trainer.multitask_model).

Training rows carry no task of their own: a row's source is fixed by its position in the batch
(lane i of this rank fills rows i*k .. (i+1)*k - 1, `LanesLoader.row_sources`), so the loop hands
the task that routing once and `inputs` adds each row's head index as `source_ids`.

Each source with a `valid:` split is scored with its own task's metric code, under its name:
eval/<name>/accuracy, eval/<name>/macro_f1 (classification), eval/<name>/precision|recall|f1
(NER) and eval/<name>/loss; eval/loss is the mean of the tasks' losses.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.multitask_model import head_targets, heads
from trainer.tasks.base import Evaluation, FinetuneTask, ValidSplit
from trainer.tasks.classification import ClassificationMeter
from trainer.tasks.token_classification import EntityMeter

METERS = {"classification": ClassificationMeter, "token_classification": EntityMeter}


class MultiTask(FinetuneTask):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.heads = heads(self.config, ctx.sources)
        self.splits = [ValidSplit(valid, self.config.data.verify) if valid else None for valid in ctx.source_valid]
        self.sources: torch.Tensor | None = None

    def route(self, row_sources: np.ndarray) -> None:
        """The source index of each of this rank's rows in every training batch (`LanesLoader.row_sources`)."""
        self.sources = torch.from_numpy(row_sources)

    def inputs(self, rows: torch.Tensor, step: int, micro: int = 0, train: bool = False) -> dict[str, torch.Tensor]:
        """Micro-batch `micro` of a training batch holds the batch's rows micro*len(rows) … onwards."""
        return self._with_sources(rows, self.sources[micro * len(rows) : (micro + 1) * len(rows)])

    def _with_sources(self, rows: torch.Tensor, source_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**super().inputs(rows, 0), "source_ids": source_ids.to(rows.device)}

    def evaluate(self, engine) -> Evaluation:
        scalars: dict[str, float] = {}
        losses = []
        for index, (head, split) in enumerate(zip(self.heads, self.splits)):
            if split is None:
                continue
            meter = METERS[head.task](head.labels)
            with torch.no_grad():
                for real, rows in split.batches(self.config.train.micro_batch):
                    inputs = self._with_sources(rows, torch.full((len(rows),), index))
                    output = engine.forward(**inputs)
                    meter.add(output.heads[head.name], head_targets(head.task, inputs["labels"]), real)
            result = meter.scalars()
            losses.append(result["loss"])
            scalars.update({f"{head.name}/{key}": value for key, value in result.items()})
        return Evaluation({"loss": sum(losses) / len(losses), **scalars})
