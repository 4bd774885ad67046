"""Causal-LM pretraining on packed token rows: every token predicts the next one.

With document attention (`data.doc_attention`) a row is [2, seq_len], tokens and their positions in
their documents. The positions go to the model as `position_ids`: Hugging Face decoders restart
their position embeddings with them and, given no padding mask, derive a block-diagonal causal mask
from them (SDPA and eager take it as a dense mask, flex attention as a BlockMask, flash attention as
varlen `cu_seqlens`, which Hugging Face reads from position ids in a batch of one row only, so
the micro-batch goes to flash-attn as one row laid end to end). The first token of each document
is not a target: it would be predicted from the previous document, which it cannot see. So a
packed row's loss is its documents' losses, weighted by their targets, exactly as if each were run alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from trainer import distributed
from trainer.data import LanesLoader, Source
from trainer.models import attention_kernel
from trainer.tasks.base import IGNORE, Evaluation, TaskContext, deal

LABELS = {"labels", "next_sentence_label"}  # inputs a padding row of an eval batch must not count in


class CausalLM:
    def __init__(self, ctx: TaskContext) -> None:
        self.ctx, self.config = ctx, ctx.config
        kernel = attention_kernel(self.config).get("attn_implementation")
        self.one_row = ctx.doc_attention and kernel == "flash_attention_2"  # see the module docstring
        self.valid_loader = None
        if ctx.valid:
            # Every rank reads each whole eval batch (the training run's lanes, one row each) and scores its share of
            # it: the same rows, inputs and loss at every world size, and no constraint on the layout.
            lanes = self.config.data.lanes
            self.valid_loader = LanesLoader(
                [Source(ctx.valid)], global_batch=lanes, lanes=lanes, seed=self.config.run.seed, rank=0, world_size=1,
                verify=self.config.data.verify, doc_positions=ctx.doc_attention,
            )

    def tokens(self, rows: np.ndarray) -> int:
        return len(rows) * self.ctx.seq_len

    def inputs(self, rows: torch.Tensor, step: int, micro: int = 0, train: bool = False) -> dict[str, torch.Tensor]:
        inputs = self.row_inputs(rows, step, micro, distributed.dist.get_rank())
        return as_one_row(inputs) if self.one_row else inputs

    def row_inputs(self, rows: torch.Tensor, step: int, micro: int, rank: int) -> dict:
        """The model inputs of `rows`, one input row per row; `rank` seeds a task's random choices (MLM masks)."""
        return document_inputs(rows) if self.ctx.doc_attention else {"input_ids": rows, "labels": rows}

    def valid_micro_batches(self, engine) -> Iterator[tuple[dict, torch.Tensor]]:
        """(model inputs, real rows) of this data rank's share of the first `train.eval_batches` valid batches, in
        forwards of at most train.micro_batch rows. The inputs are made from the whole batch as rank 0's, so
        the same at every eval and world size; padding rows (`deal`) have no labels."""
        micro, batches = self.config.train.micro_batch, self.valid_loader.batches(0)
        try:
            for i in range(self.config.train.eval_batches):
                rows = torch.from_numpy(next(batches)).to(distributed.device())
                inputs = self.row_inputs(rows, -1, i, rank=0)
                for indices, real in deal(len(rows), engine.data_rank, engine.data_world, micro):
                    chunk, kept = torch.from_numpy(indices).to(rows.device), torch.from_numpy(real).to(rows.device)
                    share = {name: value[chunk] if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}
                    for name in LABELS & share.keys():
                        share[name] = torch.where(kept.view(-1, *[1] * (share[name].dim() - 1)), share[name], IGNORE)
                    yield (as_one_row(share) if self.one_row else share), kept
        finally:
            batches.close()

    def evaluate(self, engine) -> Evaluation:
        """The mean token loss of the valid rows, each forward's mean weighted by its targets: under document
        attention rows have fewer targets the more documents start in them, so weighting by rows would make the
        number depend on micro_batch and world size."""
        total, count = 0.0, 0
        with torch.no_grad():
            for inputs, _ in self.valid_micro_batches(engine):
                loss, targets = engine.forward(**inputs).loss, target_count(inputs["labels"])
                total, count = total + (loss.item() * targets if targets else 0.0), count + targets  # padding only: no mean
        summed = distributed.all_reduce([total, count])
        loss = (summed[0] / summed[1]).item()
        return Evaluation({"loss": loss, "perplexity": math.exp(min(loss, 50))})

    def close(self) -> None:
        if self.valid_loader is not None:
            self.valid_loader.close()


def document_inputs(rows: torch.Tensor) -> dict:
    """Causal-LM inputs of [rows, 2, seq_len] document-attention rows: position ids restart at each document, whose
    first token is no target. No cache: Hugging Face derives the per-document mask from position ids only without one."""
    ids, positions = split_positions(rows)
    return {"input_ids": ids, "labels": torch.where(positions == 0, IGNORE, ids), "position_ids": positions, "use_cache": False}


def target_count(labels: torch.Tensor) -> int:
    """The tokens a causal LM's built-in loss averages over: every label but each row's first that is not IGNORE."""
    return int((labels[:, 1:] != IGNORE).sum())


def as_one_row(inputs: dict) -> dict:
    """The micro-batch's rows end to end as one row. Exact under document attention: every row starts at
    position 0, so no row attends to another, and a row's first token is no target of the row before."""
    return {name: value.reshape(1, -1) if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}


def split_positions(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, document positions) of [rows, 2, seq_len] document-attention rows, each contiguous."""
    return rows[:, 0].contiguous(), rows[:, 1].contiguous()
