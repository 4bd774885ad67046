"""SIGKILL at random moments of a 2-process run, and a rank that dies or stalls: nothing lost, nothing hangs."""

from __future__ import annotations

import functools
import os
import random
import signal
import time

import pytest
from faults import ENGINES, alive, deterministic, latest_step, logged, published, rank_pids, staging, start, stderr_of, wait_for
from trainer_runs import kill, losses, train

pytestmark = pytest.mark.slow


def _after(run_dir, k: int, delay: float) -> bool:
    """Step k's train record is logged; then wait `delay` s more."""
    return logged(run_dir, k) and not time.sleep(delay)


_rng = random.Random(8)  # the random moments: after the train record of step k, plus a delay
RANDOM = [(_rng.randint(1, 7), round(_rng.uniform(0.0, 0.4), 3)) for _ in range(2)]
MOMENTS = {
    "writing-checkpoint-4": functools.partial(staging, step=4),
    "writing-checkpoint-8": functools.partial(staging, step=8),
    "evaluating-at-step-4": functools.partial(logged, step=4),  # eval runs right after step 4's record, before its checkpoint
    **{f"after-step-{k}+{delay}s": functools.partial(_after, k=k, delay=delay) for k, delay in RANDOM},
}


ENGINE = {moment: "fsdp2" if moment.startswith("after-step") else "deepspeed" for moment in MOMENTS}


@pytest.mark.parametrize("moment", sorted(MOMENTS))
def test_sigkill_at_any_moment_then_rerun_gives_the_uninterrupted_metrics(tmp_path, config_file, references, moment):
    engine = ENGINES[ENGINE[moment]]
    run_dir = tmp_path / "killed"
    proc = start(config_file, 2, run_dir, *engine)
    wait_for(proc, lambda: MOMENTS[moment](run_dir))
    kill(proc)
    last = max(losses(run_dir), default=0)
    kept = latest_step(run_dir)  # also: nothing without COMPLETE is published or named by `latest`
    print(f"{moment} ({ENGINE[moment]}): killed after step {last}, checkpoint {kept}, {last - kept} steps to redo")
    result = train(config_file, 2, run_dir, *engine)
    resumed = "resumed from" in result.stdout + result.stderr
    assert resumed == (kept > 0), result.stderr[-2000:]
    if kept:
        assert f"checkpoints/step_{kept:06d} (step {kept}" in result.stdout + result.stderr
    assert deterministic(run_dir) == deterministic(references(ENGINE[moment]))


TIMEOUT_S = 10


@pytest.mark.parametrize(("engine", "sig"),
                         [("deepspeed", signal.SIGKILL), ("deepspeed", signal.SIGSTOP), ("fsdp2", signal.SIGSTOP)],
                         ids=["killed", "stalled", "stalled-fsdp2"])
def test_a_dead_or_stalled_rank_ends_the_run_within_the_collective_timeout(tmp_path, config_file, request, engine, sig):
    """FSDP2's collectives (all-gather, reduce-scatter) wait on a stalled peer like DeepSpeed's: both end
    within the timeout. The rerun after a stall is the DeepSpeed run's (FSDP2 resumes in the SIGKILL test)."""
    run_dir = tmp_path / "run"
    proc = start(config_file, 2, run_dir, *ENGINES[engine], f"train.collective_timeout_s={TIMEOUT_S}")
    try:
        wait_for(proc, lambda: published(run_dir, 4))
        ranks = rank_pids(proc.pid)
        os.kill(ranks[1], sig)
        began = time.monotonic()
        while alive(ranks[0]) and time.monotonic() - began < TIMEOUT_S + 60:
            time.sleep(0.05)
        detected = time.monotonic() - began
    finally:
        kill(proc)
    print(f"{engine}, rank 1 {sig.name}: rank 0 exited {detected:.1f} s later (timeout {TIMEOUT_S} s)")
    assert not alive(ranks[0]) and detected < TIMEOUT_S + 15
    assert "another rank died or stalled" in stderr_of(run_dir)
    assert latest_step(run_dir) >= 4
    if sig == signal.SIGSTOP and engine == "deepspeed":  # the rerun resumes (a dead rank resumes alike: the SIGKILL test)
        result = train(config_file, 2, run_dir)
        assert "resumed from" in result.stderr + result.stdout
        assert deterministic(run_dir) == deterministic(request.getfixturevalue("reference"))


ASYNC = ("engine.type=fsdp2", "train.async_checkpoint=true", "train.ckpt_every=2")


def test_a_kill_during_a_background_checkpoint_write_leaves_the_previous_one_latest(tmp_path, config_file, references):
    """train.async_checkpoint: the loop trains on while checkpoint 4 is written (each write slowed by 2 s); a SIGKILL
    then leaves `latest` at checkpoint 2, and the rerun continues from it bit for bit, so checkpoint 2 holds the
    state of step 2 although steps 3 and 4 updated the parameters while it was being written."""
    run_dir = tmp_path / "killed"
    proc = start(config_file, 2, run_dir, *ASYNC, "debug.checkpoint_write_delay_s=2")
    wait_for(proc, lambda: published(run_dir, 2) and staging(run_dir, 4) and logged(run_dir, 5))
    kill(proc)
    assert latest_step(run_dir) == 2
    result = train(config_file, 2, run_dir, *ASYNC)
    assert "checkpoints/step_000002 (step 2" in result.stdout + result.stderr
    assert deterministic(run_dir) == deterministic(references("fsdp2"))
