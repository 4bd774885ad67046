"""Sequence-length warmup in real 2-process runs over gloo: the length switches at the named steps, every step
trains on the same tokens and global batches as without the schedule, and a resume in the middle of it is bitwise."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from trainer_runs import digests, losses, metrics, rewind, train

from trainer.data import LanesLoader, Source, batch_digest

pytestmark = pytest.mark.slow

STEPS = 6
# 64-token shard rows, 8 per step (conftest.config_file); global batches 0-1 (logged steps 1-2) of 16 tokens, 2-3 of 32,
# then the shards' 64; the checkpoint at step 3 lies inside a phase and the resumed run crosses the next switch
WARMUP = ["data.seq_len_schedule=[[0, 16], [2, 32], [4, 64]]", f"train.max_steps={STEPS}", "train.ckpt_every=3"]
LENGTHS = [16, 16, 32, 32, 64, 64]
ENGINES = {"deepspeed": ["engine.type=deepspeed", "engine.zero_stage=2", "engine.activation_checkpointing=full"],
           "fsdp2": ["engine.type=fsdp2"]}


@pytest.fixture(scope="module")
def warmup_run(tmp_path_factory, config_file) -> Callable[[str], tuple[Path, str]]:
    """(run directory, stderr) of one uninterrupted 2-process run per engine, made on first use."""
    made: dict[str, tuple[Path, str]] = {}

    def run(engine: str) -> tuple[Path, str]:
        if engine not in made:
            run_dir = tmp_path_factory.mktemp(engine) / "warmup"
            made[engine] = run_dir, train(config_file, 2, run_dir, *ENGINES[engine], *WARMUP).stderr
        return made[engine]

    return run


def loader_digests(config_file, token_data) -> dict[int, str]:
    """The batch digest of each step, read straight from the loader on one rank: the batches without a schedule."""
    config = json.loads(config_file.read_text())
    with LanesLoader([Source(token_data / "tokens/train")], global_batch=config["train"]["global_batch"],
                     lanes=config["data"]["lanes"], seed=config["run"]["seed"], rank=0, world_size=1) as loader:
        stream = loader.batches(0)
        return {step: batch_digest(loader.local_lane_digests(next(stream))) for step in range(1, STEPS + 1)}


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_the_length_switches_at_the_named_steps_with_the_same_tokens_and_batches(warmup_run, config_file, token_data, engine):
    run, stderr = warmup_run(engine)
    logged = [m for m in metrics(run) if "loss" in m]
    assert [m["seq_len"] for m in logged] == LENGTHS
    tokens = [m["tokens"] for m in logged]
    assert [b - a for a, b in zip([0, *tokens], tokens)] == [8 * 64] * STEPS  # shard rows × 64 tokens, at every length
    assert digests(run) == loader_digests(config_file, token_data)  # the loader's batches, cut after it
    assert [m["step"] for m in metrics(run) if "eval_loss" in m] == [4, 6]  # valid rows at the shards' 64 tokens
    assert [line for line in stderr.splitlines() if "from here on (data.seq_len_schedule)" in line] == [
        "step 3: rows of 32 tokens from here on (data.seq_len_schedule): 16 rows per step, the same tokens",
        "step 5: rows of 64 tokens from here on (data.seq_len_schedule): 8 rows per step, the same tokens",
    ]


def test_a_resume_in_the_middle_of_the_schedule_is_bitwise(warmup_run, config_file, tmp_path):
    """The length is a function of the step: resumed at step 3, steps 4 (32 tokens) and 5-6 (64) are the same."""
    run, _ = warmup_run("fsdp2")
    resumed = tmp_path / "resumed"
    rewind(run, resumed, 3)
    train(config_file, 2, resumed, *ENGINES["fsdp2"], *WARMUP)
    assert losses(resumed) == losses(run)
    assert [m["seq_len"] for m in metrics(resumed) if "loss" in m] == LENGTHS
