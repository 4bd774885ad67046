"""Token classification (NER with BIO tags); the data labels only each word's first sub-token.

The metric is entity-level precision / recall / F1 as `seqeval` computes them (CoNLL scoring: an
entity counts only when its type and both boundaries are right), over the whole valid split.
"""

from __future__ import annotations

import numpy as np
import torch
from seqeval.metrics import f1_score, precision_score, recall_score

from trainer.tasks.base import IGNORE, LossMeter, MeteredTask, gather


class EntityMeter:
    """Loss and the tag sequences of a valid split, batch by batch; `scalars()` gathers all ranks' and scores
    them. Shared with multi-task runs, which score each token-classification head with it."""

    def __init__(self, labels: list[str]) -> None:
        self.names, self.truth, self.guess, self.loss = labels, [], [], LossMeter()

    def add(self, logits: torch.Tensor, labels: torch.Tensor, real: np.ndarray) -> None:
        """`logits` [rows, tokens, tags] and `labels` [rows, tokens] of one batch; only `real` rows count."""
        self.loss.add(logits, labels, real)
        predicted = logits.argmax(-1)
        for i in real.nonzero()[0]:
            words = labels[i] != IGNORE
            self.truth.append([self.names[t] for t in labels[i][words].tolist()])
            self.guess.append([self.names[p] for p in predicted[i][words].tolist()])

    def scalars(self) -> dict[str, float]:
        truth, guess = gather(self.truth), gather(self.guess)
        return {
            "loss": self.loss.mean(),
            "precision": precision_score(truth, guess, zero_division=0),
            "recall": recall_score(truth, guess, zero_division=0),
            "f1": f1_score(truth, guess, zero_division=0),
        }


class TokenClassification(MeteredTask):
    meter = EntityMeter
