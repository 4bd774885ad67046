"""Sequence classification (sentiment, topic, …) on an encoder or a decoder model.

Metrics over the whole valid split: accuracy and macro-F1 from a confusion matrix summed across
ranks. Optional input noise for training only: `token_dropout` hides random tokens from attention,
`random_mask` replaces them with the mask (or unknown) token; special tokens are never touched.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer import distributed
from trainer.config import ConfigError
from trainer.tasks.base import LossMeter, MeteredTask, encoder_inputs, special_ids, step_generator


class ClassificationMeter:
    """Loss and a confusion matrix over a valid split, batch by batch; `scalars()` combines all ranks.
    Shared with multi-task runs, which score each classification head with it."""

    def __init__(self, labels: list[str]) -> None:
        self.confusion = torch.zeros(len(labels), len(labels), dtype=torch.float64)  # [true, predicted]
        self.loss = LossMeter()

    def add(self, logits: torch.Tensor, labels: torch.Tensor, real: np.ndarray) -> None:
        """`logits` [rows, classes] and `labels` [rows] of one batch; only `real` rows count."""
        self.loss.add(logits, labels, real)
        for true, pred in zip(labels[real].tolist(), logits.argmax(-1)[real].tolist()):
            self.confusion[true, pred] += 1

    def scalars(self) -> dict[str, float]:
        return {"loss": self.loss.mean(), **scores(distributed.all_reduce(self.confusion))}


class Classification(MeteredTask):
    meter = ClassificationMeter

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.special = special_ids(ctx)
        self.noise_id = ctx.token_id("[MASK]", "<mask>", "[UNK]", "<unk>")
        if self.config.task.input_noise == "random_mask" and self.noise_id is None:
            raise ConfigError("task.input_noise: random_mask needs a mask or unknown token, this tokenizer has neither; "
                              "use token_dropout")

    def inputs(self, rows: torch.Tensor, step: int, micro: int = 0, train: bool = False) -> dict[str, torch.Tensor]:
        inputs = {**encoder_inputs(rows[:, 0], self.ctx.pad_id), "labels": rows[:, 1, 0]}  # the label sits at position 0
        task = self.config.task
        if train and task.input_noise != "none":
            ids = inputs["input_ids"]
            draw = torch.rand(ids.shape, generator=step_generator(self.config.run.seed, step, micro)).to(ids.device)
            hit = draw < task.input_noise_prob
            hit &= inputs["attention_mask"].bool() & ~torch.isin(ids, self.special.to(ids.device))
            if task.input_noise == "token_dropout":
                inputs["attention_mask"] = inputs["attention_mask"] * ~hit
            else:
                inputs["input_ids"] = torch.where(hit, self.noise_id, ids)
        return inputs


def scores(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 (unweighted mean over classes present in the truth or the predictions)."""
    tp = confusion.diag()
    predicted, actual = confusion.sum(0), confusion.sum(1)
    present = (predicted + actual) > 0
    f1 = 2 * tp / (predicted + actual).clamp(min=1)
    accuracy = (tp.sum() / confusion.sum().clamp(min=1)).item()
    return {"accuracy": accuracy, "macro_f1": f1[present].mean().item() if present.any() else 0.0}
