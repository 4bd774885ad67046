"""Sequence-length warmup: shorter rows cut from the loader's rows, each piece a row of its own.

The references share no code with the cut: positions come from `trainer.data.doc_positions` run on
each piece's own document starts, and losses from each piece run alone through the task and model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from data_tools.manifest import doc_starts_array
from trainer.cli import main
from trainer.config import ConfigError, ModelConfig, load_config
from trainer.data import doc_positions
from trainer.plan import Shape, activation_bytes
from trainer.seq_len_schedule import cut_rows, seq_len_schedule
from trainer.tasks import TaskContext, build_task
from trainer.tasks.base import IGNORE

pytestmark = pytest.mark.usefixtures("one_process_group")

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
SEQ_LEN, PIECE, VOCAB = 48, 16, 300
STARTS = [[7, 19, 20, 40], [30], [16, 33]]  # document starts per row: inside pieces, on a piece's first token, none at all


def loader_rows() -> torch.Tensor:
    """[3, 2, SEQ_LEN] rows as the loader gives them with document positions: tokens, positions."""
    tokens = torch.randint(0, VOCAB, (len(STARTS), SEQ_LEN), generator=torch.Generator().manual_seed(1))
    positions = torch.from_numpy(doc_positions(doc_starts_array(STARTS), SEQ_LEN).astype(np.int64))
    return torch.stack([tokens, positions], 1)


def test_plain_rows_are_cut_into_consecutive_pieces_of_the_same_tokens():
    rows = torch.arange(2 * SEQ_LEN).reshape(2, SEQ_LEN)
    cut = cut_rows(rows, PIECE)
    assert cut.shape == (2 * SEQ_LEN // PIECE, PIECE)
    assert torch.equal(cut.flatten(), rows.flatten())  # row i becomes rows i·S/s … (i + 1)·S/s − 1, in order
    assert cut_rows(rows, SEQ_LEN) is rows  # the shards' length: nothing to cut


def test_each_piece_restarts_document_positions_at_its_first_token_as_a_row_does():
    rows = loader_rows()
    cut = cut_rows(rows, PIECE)
    per_row = SEQ_LEN // PIECE
    assert torch.equal(cut[:, 0].flatten(), rows[:, 0].flatten())
    for i, piece in enumerate(cut):
        first = (i % per_row) * PIECE
        own_starts = [s - first for s in STARTS[i // per_row] if first < s < first + PIECE]
        assert piece[1].tolist() == doc_positions(doc_starts_array([own_starts]), PIECE)[0].tolist(), i


def causal_task(doc_attention: bool):
    config = load_config(DEMO, [f"data.doc_attention={str(doc_attention).lower()}"])
    return build_task(TaskContext(config, SEQ_LEN, None, 0, 0, [], None, doc_attention=doc_attention))


@pytest.mark.parametrize("doc_attention", [True, False], ids=["doc-attention", "plain"])
def test_the_loss_of_cut_rows_is_the_per_token_mean_of_the_pieces_run_alone(doc_attention):
    """Each piece is an independent row: its first token is no target, and no piece sees another."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ_LEN)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    rows = loader_rows() if doc_attention else loader_rows()[:, 0]
    task = causal_task(doc_attention)
    cut = cut_rows(rows, PIECE)
    total = targets = 0.0
    with torch.no_grad():
        batch_loss = model(**task.inputs(cut, 0)).loss.item()
        for piece in cut:
            inputs = task.inputs(piece[None], 0)
            count = (inputs["labels"][:, 1:] != IGNORE).sum().item()  # the model predicts token i + 1 from 0 … i
            total, targets = total + model(**inputs).loss.item() * count, targets + count
        whole_rows = model(**task.inputs(rows, 0)).loss.item()
    inner_starts = sum(1 for row in STARTS for s in row if s % PIECE) if doc_attention else 0
    assert targets == len(cut) * (PIECE - 1) - inner_starts
    assert batch_loss == pytest.approx(total / targets, rel=1e-5)
    assert abs(whole_rows - batch_loss) > 1e-3  # the pieces do not see the tokens before them: measurably different


def schedule_config(schedule: str, *overrides: str):
    return load_config(DEMO, [f"data.seq_len_schedule={schedule}", *overrides])


def test_the_length_of_a_step_follows_the_schedule_and_the_switch_is_logged_once(caplog):
    schedule = seq_len_schedule(schedule_config("[[0, 16], [2, 24], [4, 48]]"), SEQ_LEN)
    assert [schedule.at(step) for step in range(7)] == [16, 16, 24, 24, 48, 48, 48]
    assert seq_len_schedule(load_config(DEMO), SEQ_LEN).lengths == (SEQ_LEN,)  # unset: the shards' rows throughout
    rows = loader_rows()
    with caplog.at_level(logging.INFO, logger="trainer"):
        shapes = [tuple(schedule.cut(rows, step).shape) for step in range(6)]
    assert shapes == [(9, 2, 16)] * 2 + [(6, 2, 24)] * 2 + [(3, 2, 48)] * 2
    global_batch = load_config(DEMO).train.global_batch
    assert [r.getMessage() for r in caplog.records] == [
        f"step 3: rows of 24 tokens from here on (data.seq_len_schedule): {global_batch * 2} rows per step, the same tokens",
        f"step 5: rows of 48 tokens from here on (data.seq_len_schedule): {global_batch} rows per step, the same tokens",
    ]
    assert schedule.describe() == "rows of 16 tokens from step 1, 24 from step 3, 48 from step 5"


@pytest.mark.parametrize("schedule, overrides, message", [
    ("[[0, 16], [4, 48]]", ["task.type=sft"], "data.seq_len_schedule: task.type sft reads whole examples, not packed rows to "
     "cut (it applies to causal_lm, mlm); remove it"),
    ("[[0, 16], [4, 48]]", ["engine.type=fsdp2", "parallel.pp=2"], "data.seq_len_schedule: pipeline stages (parallel.pp 2) "
     "run fixed micro-batch shapes; remove it or set parallel.pp=1"),
    ("[[0, 16, 2]]", [], "data.seq_len_schedule: [[0, 16, 2]] is not a list of [step, seq_len] pairs, "
     "e.g. [[0, 256], [2000, 512], [4000, 1024]]"),
    ("[[10, 16], [40, 48]]", [], "data.seq_len_schedule: starts at step 10; the first entry must be [0, seq_len], "
     "the length from the start"),
    ("[[0, 16], [40, 48], [20, 24]]", [], "data.seq_len_schedule: [[0, 16], [40, 48], [20, 24]]: steps and lengths must "
     "both ascend (a warmup to longer rows)"),
    ("[[0, 24], [40, 16]]", [], "data.seq_len_schedule: [[0, 24], [40, 16]]: steps and lengths must both ascend "
     "(a warmup to longer rows)"),
    ("[[0, 16], [40, 96]]", [], "data.seq_len_schedule: length 96 is longer than the shards' seq_len 48; rows are cut "
     "from the shards' rows, so use lengths up to 48"),
    ("[[0, 20], [40, 48]]", [], "data.seq_len_schedule: length 20 does not divide the shards' seq_len 48 into rows of 2 "
     "or more tokens; use divisors of 48"),
    ("[[0, 1], [40, 48]]", [], "data.seq_len_schedule: length 1 does not divide the shards' seq_len 48 into rows of 2 "
     "or more tokens; use divisors of 48"),
    ("[[0, 6], [40, 48]]", ["engine.type=fsdp2", "parallel.tp=4"], "data.seq_len_schedule: length 6 is not a multiple of "
     "parallel.tp 4 (sequence parallel splits every row over the tp ranks); use multiples of 4"),
], ids=["finetuning-task", "pipeline", "not-pairs", "not-from-step-0", "steps-not-ascending", "lengths-not-ascending",
        "longer-than-shards", "not-a-divisor", "one-token", "not-divisible-by-tp"])
def test_what_cannot_work_is_refused_in_one_line(schedule, overrides, message):
    with pytest.raises(ConfigError) as err:
        seq_len_schedule(schedule_config(schedule, *overrides), SEQ_LEN)
    assert str(err.value) == message


def test_shorter_rows_never_need_more_activation_memory_so_plan_sizes_the_longest(capsys):
    """S/s times the rows of s tokens: the same per-token activations, and attention scores that grow with s."""
    shape = Shape.of(ModelConfig(arch="llama", hidden_size=256, num_layers=4, num_heads=4), 512, 1024)
    for eager in (False, True):
        full = activation_bytes(shape, 4, 1024, "bf16", checkpointing=False, eager=eager)
        for length in (256, 512):
            cut = activation_bytes(shape, 4 * 1024 // length, length, "bf16", checkpointing=False, eager=eager)
            assert cut <= full if eager else cut == pytest.approx(full)
    argv = ["plan", "--config", str(DEMO), "--nodes", "1", "--gpus-per-node", "1", "--vocab-size", "512", "--seq-len", "1024"]
    assert main([*argv, "data.seq_len_schedule=[[0, 256], [100, 1024]]"]) == 0
    planned = capsys.readouterr().out
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert planned.splitlines()[1] == ("data.seq_len_schedule: rows of 256 tokens from step 1, 1024 from step 101; memory "
                                       "and FLOPs per token below are at the longest rows, 1024 tokens")
    assert planned.splitlines()[2:] == plain.splitlines()[1:]  # the same table as the shards' rows alone
    assert main([*argv, "data.seq_len_schedule=[[0, 2048]]"]) == 2
    assert capsys.readouterr().err.strip() == ("error: data.seq_len_schedule: length 2048 is longer than the shards' seq_len "
                                               "1024; rows are cut from the shards' rows, so use lengths up to 1024")
