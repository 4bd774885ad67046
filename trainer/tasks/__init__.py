"""Tasks: what a run learns. Each turns lane rows into model inputs and evaluates on the valid split.

`task.type` picks one; the row layout it expects is checked against the manifest's `task`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from data_tools.manifest import Manifest
from trainer.config import ConfigError
from trainer.models import attention_kernel
from trainer.tasks.base import Evaluation, TaskContext

__all__ = ["DATA_TASK", "Evaluation", "Task", "TaskContext", "build_task", "doc_attention", "model_vocab_size"]


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


DOC_ATTENTION_TASKS = ("causal_lm", "mlm")  # the tasks that read packed rows of several documents


def doc_attention(config, manifests: list[Manifest]) -> bool:
    """Whether rows attend per document (`data.doc_attention`): unset, on when every split (`manifests`:
    train sources and valid) records document starts and nothing needs attention across a row;
    on where it cannot apply, one line naming the key and what to do."""
    setting, task = config.data.doc_attention, config.task.type
    why_not = None
    if task not in DOC_ATTENTION_TASKS:
        why_not = f"task.type {task} reads no packed rows (it applies to {', '.join(DOC_ATTENTION_TASKS)}); remove it"
    elif task == "mlm" and config.task.sentence_task != "none":
        why_not = f"task.sentence_task {config.task.sentence_task} pairs the two halves of a row across documents; set it false"
    elif config.parallel.pp > 1 and attention_kernel(config).get("attn_implementation") == "flash_attention_2":
        why_not = ("flash-attn reads documents from one row laid end to end, which pipeline stages (parallel.pp > 1) "
                   "cannot split into micro-batches; set model.attention sdpa, or set it false")
    elif old := next((m for m in manifests if not m.has_doc_starts), None):
        why_not = (f"{old.directory} has no document starts (format_version {old.format_version}); prepare it again with "
                   "this dstrain, or set it false")
    if why_not and setting:
        raise ConfigError(f"data.doc_attention true: {why_not}")
    return setting is not False and why_not is None
