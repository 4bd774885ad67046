"""What every task shares: turning lane rows into model inputs, and a full pass over a valid split.

A task is the only part of the trainer that knows what a row means. Packed pretraining rows are
token ids [seq_len]; finetuning rows are [2, seq_len]: channel 0 the input ids padded with -1,
channel 1 the targets with -100 wherever no loss is taken (the data_tools finetuning contract).
Hugging Face models compute their own loss from `labels`, so a task's job is mostly to build the
inputs and, at evaluation, to turn outputs into metrics.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from data_tools.manifest import Manifest, iter_blocks, verify_shard
from trainer import distributed

PAD = -1  # input padding in finetuning rows
IGNORE = -100  # targets without a loss (the value Hugging Face losses ignore)


@dataclass
class TaskContext:
    """What a task needs to know about the run beyond its config section."""

    config: object  # trainer.config.Config
    seq_len: int
    tokenizer: object  # tokenizers.Tokenizer: word boundaries, special tokens, decoding generated text
    eos_id: int
    pad_id: int  # the model's pad token id (padding is masked out; any valid id works)
    labels: list[str]  # label vocabulary from the manifest (classification, NER)
    valid: Manifest | None  # data.valid
    sources: list[Manifest] = field(default_factory=list)  # data.train's, in order
    source_valid: list[Manifest | None] = field(default_factory=list)  # each source's own valid split (multitask)
    doc_attention: bool = False  # packed rows come as [2, seq_len]: tokens and document positions (data.doc_attention)

    def token_id(self, *candidates: str) -> int | None:
        """The id of the first of these special tokens that the tokenizer has."""
        return next((i for t in candidates if (i := self.tokenizer.token_to_id(t)) is not None), None)


@dataclass
class Evaluation:
    """Scalars go to TensorBoard as eval/<name>; texts (generated samples) as TensorBoard text."""

    scalars: dict[str, float]
    texts: dict[str, str] = field(default_factory=dict)


def step_generator(seed: int, step: int, micro: int, rank: int | None = None) -> torch.Generator:
    """A generator for one micro-batch's random choices (masking, noise): a function of (seed, step, rank,
    micro-batch) only, so a resumed run draws exactly what the uninterrupted one drew. `rank` defaults to
    this process's; an evaluation that draws for a whole batch on every rank passes 0."""
    rank = distributed.dist.get_rank() if rank is None else rank
    state = np.random.SeedSequence([seed, step + 1, rank, micro]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def special_ids(ctx: TaskContext) -> torch.Tensor:
    """Ids never masked or dropped: EOS and the tokenizer's special tokens ([CLS], [SEP], <|im_start|>, …)."""
    added = ctx.tokenizer.get_added_tokens_decoder()
    return torch.tensor(sorted({ctx.eos_id, *(i for i, token in added.items() if token.special)}))


def trim(ids: torch.Tensor, pad: int = PAD) -> torch.Tensor:
    """Cut the columns that are padding in every row: short examples then cost short forwards."""
    used = (ids != pad).any(0).nonzero()
    return ids[:, : int(used.max()) + 1 if len(used) else 1]


def encoder_inputs(ids: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids (trimmed) with -1 padding replaced by the model's pad id, and the matching attention mask."""
    ids = trim(ids)
    mask = ids != PAD
    return {"input_ids": torch.where(mask, ids, pad_id), "attention_mask": mask.long()}


class FinetuneTask:
    """Base for tasks on finetuning rows: inputs from the two channels, evaluation over the whole split."""

    def __init__(self, ctx: TaskContext) -> None:
        self.ctx, self.config = ctx, ctx.config
        self.valid = ValidSplit(ctx.valid, self.config.data.verify) if ctx.valid else None

    def tokens(self, rows: np.ndarray) -> int:
        """Real (non-padding) input tokens in a batch, for throughput."""
        return int((rows[:, 0] != PAD).sum())

    def inputs(self, rows: torch.Tensor, step: int, micro: int = 0, train: bool = False) -> dict[str, torch.Tensor]:
        inputs = encoder_inputs(rows[:, 0], self.ctx.pad_id)
        return {**inputs, "labels": rows[:, 1, : inputs["input_ids"].shape[1]].contiguous()}  # HF losses .view() them

    def close(self) -> None:
        pass


def deal(count: int, rank: int, world: int, micro_batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rank `rank`'s share of `count` evaluation items in micro-batches: (item indices, which of them are real).
    Rank r takes items r, r + W, …, the stride padded to a multiple of the world size with copies of item 0
    whose results are discarded.

    Why equal counts: under ZeRO-3 and FSDP2 every forward is collective, so a rank with one batch
    fewer would hang the others.
    """
    indices = np.arange(rank, math.ceil(count / world) * world, world)
    real = indices < count
    indices = np.where(real, indices, 0)
    for first in range(0, len(indices), micro_batch):
        yield indices[first : first + micro_batch], real[first : first + micro_batch]


class ValidSplit:
    """A finetuning valid split held in memory, dealt (`deal`) so every rank runs the same number of batches."""

    def __init__(self, manifest: Manifest, verify: bool) -> None:
        """`verify` (data.verify): check each shard's size and checksum against the manifest first, as training data is."""
        if verify:
            for shard in manifest.shards:
                verify_shard(manifest.directory, shard)
        blocks = [rows for shard in manifest.shards for rows, _ in iter_blocks(manifest.shard_path(shard))]
        self.rows = np.concatenate(blocks).astype(np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, micro_batch: int):
        """(real mask, int64 rows on the device) for each micro-batch of this rank's share."""
        for chunk, real in deal(len(self), distributed.dist.get_rank(), distributed.dist.get_world_size(), micro_batch):
            yield real, torch.from_numpy(self.rows[chunk]).to(distributed.device())


class MeteredTask(FinetuneTask):
    """A task scored by a meter (`meter(labels)` with `add(logits, labels, real)` and `scalars()`) over the whole valid split."""

    meter: type

    def evaluate(self, engine) -> Evaluation:
        meter = self.meter(self.ctx.labels)
        for real, inputs, output in valid_outputs(engine, self, self.config.train.micro_batch):
            meter.add(output.logits, inputs["labels"], real)
        return Evaluation(meter.scalars())


def valid_outputs(engine, task: FinetuneTask, micro_batch: int):
    """(real mask, model inputs, model output) for each of this rank's valid micro-batches, without gradients."""
    with torch.no_grad():
        for real, rows in task.valid.batches(micro_batch):
            inputs = task.inputs(rows, 0)
            yield real, inputs, engine.forward(**inputs)


def token_losses(logits: torch.Tensor, labels: torch.Tensor, shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy at every label position (0 where the label is IGNORE) and the mask of counted positions.

    `shift`: causal LMs predict position i + 1 from position i, as their built-in loss does.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape)
    return losses, labels != IGNORE


class LossMeter:
    """Sums token losses of real examples on this rank; `mean()` combines all ranks."""

    def __init__(self, shift: bool = False) -> None:
        self.shift, self.total, self.count = shift, 0.0, 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor, real: np.ndarray) -> None:
        losses, counted = token_losses(logits, labels, self.shift)
        keep = torch.as_tensor(real, device=losses.device)
        self.total += losses[keep].sum().item()
        self.count += counted[keep].sum().item()

    def mean(self) -> float:
        summed = distributed.all_reduce([self.total, self.count])
        return (summed[0] / max(summed[1], 1)).item()


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    out: list[list] = [None] * distributed.dist.get_world_size()  # type: ignore[list-item]
    distributed.dist.all_gather_object(out, items)
    return [item for part in out for item in part]


def generate(engine, ctx: TaskContext, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Greedy continuations: the generated tokens only.

    `synced_gpus` keeps every rank stepping until all are done: with sharded parameters (ZeRO-3,
    FSDP2) each decoding step is a collective forward.
    """
    model = engine.module
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=ctx.config.task.max_new_tokens, do_sample=False,
        num_beams=1, eos_token_id=ctx.eos_id, pad_token_id=ctx.pad_id, synced_gpus=distributed.dist.get_world_size() > 1,
    )
    # an encoder-decoder's output starts with its decoder start token (often EOS or pad), a decoder's with the prompt
    return output[:, 1:] if model.config.is_encoder_decoder else output[:, input_ids.shape[1] :]


def decode(ctx: TaskContext, ids: torch.Tensor | list[int]) -> str:
    """Text of token ids, stopping at the first EOS and leaving out padding and special tokens."""
    ids = [i for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids) if i >= 0]
    if ctx.eos_id in ids:
        ids = ids[: ids.index(ctx.eos_id)]
    return ctx.tokenizer.decode(ids, skip_special_tokens=True).strip()
