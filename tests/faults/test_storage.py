"""Faults of what a run reads and writes: a full disk at a checkpoint, damaged shards and
checkpoints, non-finite losses. Each ends in one clear error (or a visible record), nothing used."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from faults import deterministic, latest_step
from trainer_runs import ENV, losses, metrics, train, train_cmd

from data_tools.manifest import load_manifest

pytestmark = pytest.mark.slow


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error:` line a refused run prints."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs: the run directory's disk, filled on demand."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill the disk but `leave` bytes."""
    stat = shutil.disk_usage(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, stat.free - leave))
    return filler


def test_disk_full_at_a_checkpoint_keeps_the_previous_one(small_disk, config_file):
    run_dir = small_disk / "run"
    train(config_file, 1, run_dir, "train.max_steps=4")
    filler = fill(small_disk, leave=96 * 1024)  # room for logs, not for a checkpoint (~400 KiB at 1 process)
    result = train(config_file, 1, run_dir, expect=2)
    line = error_line(result)
    assert line.startswith(f"error: {run_dir / 'checkpoints' / 'step_000008.tmp'}: writing the checkpoint failed")
    assert "MiB free" in line
    assert "`latest` still names step_000004" in line
    assert latest_step(run_dir) == 4
    filler.unlink()
    result = train(config_file, 1, run_dir)  # the previous checkpoint still loads
    assert "checkpoints/step_000004 (step 4" in result.stdout + result.stderr and max(losses(run_dir)) == 8


def _with_a_second_shard(split: Path) -> Path:
    """Give a one-shard split a healthy second shard (a copy of the first), so that skipping the first
    leaves data; return the first."""
    manifest = load_manifest(split)
    first = manifest.shards[0]
    shutil.copyfile(split / first.path, split / "shard-copy.tar")
    manifest.shards.append(replace(first, path="shard-copy.tar"))
    manifest.save(split)
    return split / first.path


def _truncate(shard: Path) -> None:
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)


@pytest.mark.parametrize("damage, message", [
    (_truncate, r"size \d+ bytes, manifest says \d+; the shard is truncated or replaced"),
    (Path.unlink, "shard listed in the manifest is missing"),
], ids=["truncated", "deleted"])  # flipped bytes (sha256 found vs expected): tests/integration/test_train_errors.py
def test_a_damaged_shard_stops_the_run_before_any_step_unless_told_to_skip(tmp_path, config_file, token_data, damage, message):
    data = tmp_path / "data"
    shutil.copytree(token_data, data)
    shard = _with_a_second_shard(data / "tokens/train")
    damage(shard)
    command = train_cmd(config_file, 1, tmp_path / "run", f"data.train={data / 'tokens/train'}", "train.max_steps=2")
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 2
    line = error_line(result)
    assert str(shard) in line
    assert re.search(message, line), line
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not metrics(tmp_path / "run")

    skipping = subprocess.run([*command, "data.on_corrupt=skip"], capture_output=True, text=True, env=ENV, timeout=300)
    assert skipping.returncode == 0, skipping.stderr[-3000:]
    assert re.search(f"data.on_corrupt=skip: skipping {re.escape(str(shard))}: {message}", skipping.stderr)
    assert sorted(losses(tmp_path / "run")) == [1, 2]


def test_a_truncated_engine_file_is_named_and_resume_from_previous_continues_exactly(tmp_path, config_file, reference):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    engine_file = run_dir / "checkpoints" / "step_000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _truncate(engine_file)
    result = subprocess.run(train_cmd(config_file, 1, run_dir), capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith(f"error: {engine_file}: unreadable (") and "truncated or corrupt" in line
    assert line.endswith("`--resume-from previous` continues from the checkpoint before step_000008")

    resumed = train(config_file, 2, run_dir, "--resume-from", "previous")
    assert "checkpoints/step_000004 (step 4" in resumed.stdout + resumed.stderr
    assert "moved step_000008 to" in resumed.stdout + resumed.stderr
    assert deterministic(run_dir) == deterministic(reference)
    assert latest_step(run_dir) == 8 and (run_dir / "checkpoints" / "abandoned" / "step_000008").is_dir()


def test_nonfinite_losses_are_skipped_up_to_the_limit_then_the_run_stops_on_its_last_good_step(tmp_path, config_file):
    """Skipping one NaN and stopping at the next (max_nan_skips=1); the stop policy alone and the skip's
    effect on the losses are tested in tests/integration/test_train.py. Here: both on record, in order."""
    run_dir = tmp_path / "nan"
    result = train(config_file, 1, run_dir, "train.eval_every=100", "train.max_nan_skips=1", "debug.nan_at_steps=[2,4]",
                   expect=65)
    assert "stopped at step 4: non-finite loss (train.nan_policy=skip); last good state saved" in result.stderr
    assert [(m["step"], m["nan_skips"]) for m in metrics(run_dir) if "loss" in m] == [(1, 0), (2, 1), (3, 1)]
    assert latest_step(run_dir) == 3
    tags = {tag for path in (run_dir / "tb").glob("events.*") for tag in _scalar_tags(path)}
    assert "train/nan_skips" in tags


def _scalar_tags(path: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return {value.tag for event in EventFileLoader(str(path)).Load() for value in event.summary.value}
