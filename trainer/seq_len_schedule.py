"""Sequence-length warmup (`data.seq_len_schedule`): early steps train on shorter rows cut from the shards' rows.

`[[0, 256], [2000, 512], [4000, 1024]]` on shards packed at seq_len 1024: global batches 0–1999 (the steps logged
1–2000) train on rows of 256 tokens, batches 2000–3999 on 512, the rest on the shards' 1024. A step's length is a
function of its number alone, so a run resumed from `step_002000` trains its next step at 512, as the uninterrupted
run did.

Why cut and not read shorter rows: the loader delivers exactly the rows it delivers without a schedule, so the
lanes contract, the batch digest and exact resume are untouched. Each row of S tokens becomes S/s consecutive rows
of s tokens (row i → rows i·S/s … (i + 1)·S/s − 1), so the micro-batch split over the same rank batch gives
micro-batches of train.micro_batch·S/s rows holding the same tokens: tokens per step and per micro-batch stay
constant and the accumulation steps do not change. Each piece is an independent row: its first token is no target
(the model predicts a row's token i + 1 from tokens 0 … i) and, with document positions, its positions restart at
its first token as a row's do (`trainer.data.doc_positions`); the loss stays a mean per target token.

Memory peaks at the longest rows: every activation but attention's scores is the same per token at any s, and
the scores (s² per row, S/s times as many rows) grow with s; so `plan` and the memory check size a run at the
shards' seq_len, and a schedule never needs more than the run without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from trainer.config import Config, ConfigError
from trainer.tasks import DATA_TASK

log = logging.getLogger("trainer")

KEY = "data.seq_len_schedule"
PACKED_TASKS = tuple(task for task, data in DATA_TASK.items() if data == (None,))  # tasks that read packed token rows


@dataclass(frozen=True)
class SeqLenSchedule:
    """The row length of every step: (first global batch, length) phases, ascending; the last phase lasts to the end."""

    phases: tuple[tuple[int, int], ...]
    seq_len: int  # the shards' rows, which every length divides
    global_batch: int  # shard rows per step (train.global_batch), for the log line

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(length for _, length in self.phases)

    def at(self, step: int) -> int:
        """The row length of global batch `step` (0-based: the number of steps completed before it)."""
        return next(length for first, length in reversed(self.phases) if step >= first)

    def cut(self, rows: torch.Tensor, step: int) -> torch.Tensor:
        """This rank's rows of global batch `step` at the step's length; logs (rank 0) when the length changes here."""
        length = self.at(step)
        if step and length != self.at(step - 1):
            log.info("step %d: rows of %d tokens from here on (%s): %d rows per step, the same tokens", step + 1, length, KEY,
                     self.global_batch * (self.seq_len // length))
        return cut_rows(rows, length)

    def describe(self) -> str:
        """`rows of 16 tokens from step 1, 32 from step 3, 64 from step 5`, steps numbered as they are logged."""
        (first, length), *later = self.phases
        return ", ".join([f"rows of {length} tokens from step {first + 1}", *(f"{s} from step {t + 1}" for t, s in later)])


def cut_rows(rows: torch.Tensor, length: int) -> torch.Tensor:
    """[R, S] token rows as [R·S/s, s]; [R, 2, S] document rows (tokens, positions) as [R·S/s, 2, s], each piece's
    positions restarted at its first token. Rows already of `length` come back as they are."""
    seq_len = rows.shape[-1]
    if seq_len == length:
        return rows
    if rows.dim() == 2:
        return rows.reshape(-1, length)
    pieces = rows.reshape(len(rows), 2, seq_len // length, length).transpose(1, 2).reshape(-1, 2, length)
    # a token's position in its document counted from the piece's first token at most: min(position, offset in piece)
    pieces[:, 1] = torch.minimum(pieces[:, 1], torch.arange(length, device=rows.device, dtype=rows.dtype))
    return pieces


def seq_len_schedule(config: Config, seq_len: int) -> SeqLenSchedule:
    """`data.seq_len_schedule` for shards of `seq_len`, or one phase at `seq_len` when it is unset; what cannot work
    is refused in one line naming the key."""
    given, parallel = config.data.seq_len_schedule, config.parallel
    if not given:
        return SeqLenSchedule(((0, seq_len),), seq_len, config.train.global_batch)
    if config.task.type not in PACKED_TASKS:
        raise ConfigError(f"{KEY}: task.type {config.task.type} reads whole examples, not packed rows to cut (it applies to "
                          f"{', '.join(PACKED_TASKS)}); remove it")
    if parallel.pp > 1:
        raise ConfigError(f"{KEY}: pipeline stages (parallel.pp {parallel.pp}) run fixed micro-batch shapes; remove it "
                          "or set parallel.pp=1")
    if any(len(phase) != 2 for phase in given):
        raise ConfigError(f"{KEY}: {given} is not a list of [step, seq_len] pairs, e.g. [[0, 256], [2000, 512], [4000, 1024]]")
    steps, lengths = [phase[0] for phase in given], [phase[1] for phase in given]
    if steps[0] != 0:
        raise ConfigError(f"{KEY}: starts at step {steps[0]}; the first entry must be [0, seq_len], the length from the start")
    if any(b <= a for a, b in zip(steps, steps[1:])) or any(b <= a for a, b in zip(lengths, lengths[1:])):
        raise ConfigError(f"{KEY}: {given}: steps and lengths must both ascend (a warmup to longer rows)")
    for length in lengths:
        if length > seq_len:
            raise ConfigError(f"{KEY}: length {length} is longer than the shards' seq_len {seq_len}; rows are cut from "
                              f"the shards' rows, so use lengths up to {seq_len}")
        if length < 2 or seq_len % length:
            raise ConfigError(f"{KEY}: length {length} does not divide the shards' seq_len {seq_len} into rows of 2 or more "
                              f"tokens; use divisors of {seq_len}")
        if length % parallel.tp:
            raise ConfigError(f"{KEY}: length {length} is not a multiple of parallel.tp {parallel.tp} (sequence parallel "
                              f"splits every row over the tp ranks); use multiples of {parallel.tp}")
    return SeqLenSchedule(tuple(zip(steps, lengths)), seq_len, config.train.global_batch)
