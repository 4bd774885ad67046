"""Examples → rows: one example per row, or (`--pack`, sft only) several whole examples per row.

Short SFT examples leave most of a row as padding, which the trainer still computes. `--pack`
fills the train split's rows next-fit, in the split's seeded order: an example joins the current
row when it fits and otherwise opens the next one, so an example is never split across rows and
the same input gives the same rows. Each example keeps its own targets, IGNORE on its prompt; as
every example starts with prompt tokens, the causal-LM shift never puts a loss on predicting the
next example's first token.

The trade-off: there is no attention reset, so an example attends to the examples before it in
its row, as in common SFT packing. That is cheaper per token (fewer, fuller rows) but lets
examples see each other, hence off by default. The valid split is never packed, so evaluation
losses and generated samples stay per example.

A block's json lists the records of its rows. Unpacked: {"records": [record, …]}, one per row.
Packed: {"records": [[record, …], …], "starts": [[0, offset, …], …]}, per row the records of
its examples in order and the token offset where each begins, enough to cut a row back into
its examples.
"""

from __future__ import annotations

from itertools import accumulate

import numpy as np

from data_tools.finetune.encode import IGNORE, PAD, Example

Row = list[Example]


def one_per_row(examples: list[Example]) -> list[Row]:
    return [[example] for example in examples]


def pack(examples: list[Example], seq_len: int) -> list[Row]:
    """Next-fit in the given order; first-fit would fill rows a little better but reorder the
    examples, undoing the seeded shuffle that the split gave the train split."""
    rows: list[Row] = []
    free = 0
    for example in examples:
        if len(example.inputs) > free:
            rows.append([])
            free = seq_len
        rows[-1].append(example)
        free -= len(example.inputs)
    return rows


def starts(row: Row) -> list[int]:
    """The token offset of each example in the row."""
    return [0, *accumulate(len(example.inputs) for example in row[:-1])]


def array(row: Row, seq_len: int) -> np.ndarray:
    """int32 [2, seq_len]: each example's inputs and targets from its start, PAD and IGNORE after the last."""
    out = np.empty((2, seq_len), np.int32)
    out[0], out[1] = PAD, IGNORE
    for start, example in zip(starts(row), row):
        out[0, start : start + len(example.inputs)] = example.inputs
        out[1, start : start + len(example.targets)] = example.targets
    return out


def packing_stats(rows: list[Row], seq_len: int) -> dict:
    """How many examples went into how many rows, and the share of row positions holding a token."""
    tokens = sum(len(example.inputs) for row in rows for example in row)
    return {"examples": sum(map(len, rows)), "rows": len(rows), "fill": round(tokens / (len(rows) * seq_len), 3)}
