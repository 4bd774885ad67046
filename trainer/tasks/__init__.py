"""Tasks: what a run learns. Each turns lane rows into model inputs and evaluates on the valid split.

`task.type` picks one; the row layout it expects is checked against the manifest's `task`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from trainer.config import ConfigError
from trainer.tasks.base import Evaluation, TaskContext

__all__ = ["DATA_TASK", "Evaluation", "Task", "TaskContext", "build_task", "model_vocab_size"]


class Task(Protocol):
    """What the loop needs from a task."""

    def tokens(self, rows: np.ndarray) -> int: ...  # real input tokens in a batch (throughput, token budget)

    def inputs(self, rows: torch.Tensor, step: int, micro: int = 0, train: bool = False) -> dict[str, torch.Tensor]:
        ...  # model kwargs incl. `labels`: the model computes the loss

    def evaluate(self, engine) -> Evaluation: ...  # scalars (eval/<name>) and texts, identical on every rank

    def close(self) -> None: ...

# the manifest `task` values each task reads: None = packed token rows from `data_tools prepare`
DATA_TASK = {
    "causal_lm": (None,), "mlm": (None,), "classification": ("classification",),
    "token_classification": ("token_classification",), "sft": ("sft",), "seq2seq": ("seq2seq",),
    "multitask": ("classification", "token_classification"),  # one head per source, each of its own kind
}


def build_task(ctx: TaskContext) -> Task:
    kind = ctx.config.task.type
    if kind == "causal_lm":
        from trainer.tasks.causal_lm import CausalLM as cls
    elif kind == "mlm":
        from trainer.tasks.mlm import MaskedLM as cls
    elif kind == "classification":
        from trainer.tasks.classification import Classification as cls
    elif kind == "token_classification":
        from trainer.tasks.token_classification import TokenClassification as cls
    elif kind == "sft":
        from trainer.tasks.sft import SFT as cls
    elif kind == "seq2seq":
        from trainer.tasks.seq2seq import Seq2Seq as cls
    elif kind == "multitask":
        from trainer.tasks.multitask import MultiTask as cls
    else:  # the config loader already refuses other values
        raise ConfigError(f"task.type {kind!r}: unknown")
    return cls(ctx)


def model_vocab_size(config, tokenizer, vocab_size: int) -> int:
    """The embedding rows a model built from config needs: the tokenizer's, plus a [MASK] id for mlm without one."""
    if config.task.type == "mlm":
        from trainer.tasks.mlm import MASK_TOKENS

        if all(tokenizer.token_to_id(t) is None for t in MASK_TOKENS):
            return vocab_size + 1
    return vocab_size
