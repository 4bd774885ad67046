"""Multi-process DeepSpeed pretraining over gloo on CPU: determinism, exact resume, resharding."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainer_runs import ENV, digests, losses, metrics, rewind, train, train_cmd

from trainer.data import LanesLoader, Source

pytestmark = pytest.mark.slow

STEPS = 8  # as in conftest.config_file


ENGINES = {"deepspeed": ["engine.type=deepspeed", "engine.zero_stage=2"], "fsdp2": ["engine.type=fsdp2"]}


@pytest.fixture(scope="module", params=sorted(ENGINES))
def engine(request) -> list[str]:
    """The exactness tests run for both engines (their numbers differ slightly: never compared)."""
    return ENGINES[request.param]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, config_file, engine) -> Path:
    """An uninterrupted 2-process run of 8 steps, checkpoints at 4 and 8."""
    run_dir = tmp_path_factory.mktemp("ref") / "two"
    train(config_file, 2, run_dir, *engine)
    return run_dir


def test_loss_falls_and_everything_is_written(reference: Path):
    got = losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS] < got[1]
    assert (reference / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:06d}"
    assert {p.name for p in (reference / "checkpoints").glob("step_*")} == {"step_000004", "step_000008"}
    state = json.loads((reference / "checkpoints" / "step_000008" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2
    assert list((reference / "tb").glob("events.out.tfevents.*"))
    assert any("eval_loss" in m for m in metrics(reference))


def test_document_attention_is_on_for_these_shards_and_changes_the_losses_not_the_batches(tmp_path, config_file, token_data):
    """The shards record document starts, so every run here attends within documents unless told not to
    (the exact-resume tests above and below run with it, on both engines). Off reads the same batches and
    gives bitwise the same losses until the first batch in which a document starts inside a row."""
    steps = 6
    runs = {}
    for name, setting in (("masked", []), ("plain", ["data.doc_attention=false"])):
        result = train(config_file, 1, tmp_path / name, "engine.type=fsdp2", f"train.max_steps={steps}", *setting)
        runs[name] = losses(tmp_path / name), digests(tmp_path / name), "attention within documents" in result.stderr
    (on, on_digests, on_logged), (off, off_digests, off_logged) = runs["masked"], runs["plain"]
    assert on_logged and not off_logged and on_digests == off_digests
    config = json.loads(config_file.read_text())
    with LanesLoader([Source(token_data / "tokens/train")], global_batch=config["train"]["global_batch"],
                     lanes=config["data"]["lanes"], seed=config["run"]["seed"], rank=0, world_size=1,
                     doc_positions=True) as loader:
        stream = loader.batches(0)
        first = next(step for step, batch in enumerate(stream, 1) if (batch[:, 1, 1:] == 0).any())
    assert 1 < first <= steps  # the layout this test relies on: unmasked steps first, then a masked one
    assert all(on[step] == off[step] for step in range(1, first))
    assert all(abs(on[step] - off[step]) > 1e-6 for step in range(first, steps + 1))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_consumes_the_same_batches(tmp_path, config_file, engine, reference, before, after):
    source = reference if before == 2 else tmp_path / "one"
    if before == 1:
        train(config_file, 1, source, *engine)
        assert digests(source) == digests(reference)  # the batches do not depend on world size
    rewind(source, tmp_path / "resized", 4)
    train(config_file, after, tmp_path / "resized", *engine)
    assert digests(tmp_path / "resized") == digests(reference)
    for step, loss in losses(reference).items():
        assert losses(tmp_path / "resized")[step] == pytest.approx(loss, rel=1e-4), step


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_1_and_3_checkpoints_reshard_from_2_to_1(tmp_path, config_file, stage):
    """ZeRO-1/3 optimizer partitions go through the universal format too (ZeRO-2: the test above)."""
    overrides = [f"engine.zero_stage={stage}", "train.max_steps=4", "train.ckpt_every=2"]
    train(config_file, 2, tmp_path / "two", *overrides)
    rewind(tmp_path / "two", tmp_path / "one", 2)
    train(config_file, 1, tmp_path / "one", *overrides)
    assert digests(tmp_path / "one") == digests(tmp_path / "two")
    for step, loss in losses(tmp_path / "two").items():
        assert losses(tmp_path / "one")[step] == pytest.approx(loss, rel=1e-4), step


@pytest.mark.parametrize(
    "variant",
    [
        ["engine.zero_stage=0"],
        ["engine.zero_stage=1", "engine.activation_checkpointing=full", "optim.impl=fused"],
        ["engine.zero_stage=3", "engine.activation_checkpointing=full"],
        ["engine.zero_stage=3", "engine.offload=cpu"],
        ["engine.type=fsdp2", "engine.offload=cpu"],
        ["engine.type=fsdp2", "engine.activation_checkpointing=selective", "train.async_checkpoint=true", "optim.impl=foreach"],
    ],
    ids=["zero0", "zero1-full-checkpointing-fused-adamw", "zero3-full-checkpointing", "zero3-offload", "fsdp2-offload",
         "fsdp2-selective-checkpointing-async-checkpoints-foreach-adamw"],
)
def test_every_engine_variant_trains_and_resumes(tmp_path, config_file, variant):
    run_dir = tmp_path / "run"
    overrides = [*variant, "train.max_steps=6", "train.ckpt_every=3"]
    train(config_file, 2, run_dir, *overrides)
    uninterrupted = losses(run_dir)
    rewind(run_dir, tmp_path / "resumed", 3)
    train(config_file, 2, tmp_path / "resumed", *overrides)
    assert losses(tmp_path / "resumed") == uninterrupted
    assert uninterrupted[6] < uninterrupted[1]


@pytest.mark.parametrize("procs, sig", [(1, signal.SIGUSR1), (2, signal.SIGTERM)])
def test_signal_checkpoints_at_the_step_boundary(tmp_path, config_file, engine, procs, sig):
    """SIGUSR1 to a trainer, or SIGTERM to torchrun (which forwards it): checkpoint at the next step, exit."""
    run_dir = tmp_path / "signalled"
    proc = subprocess.Popen(train_cmd(config_file, procs, run_dir, *engine, "train.max_steps=100000", "train.ckpt_every=100000"),
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    if procs == 1:
        assert proc.returncode == 75, err[-2000:]
    assert "stopping at step" in err
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / latest / "COMPLETE").exists()
    assert int(latest.split("_")[1]) == max(losses(run_dir))


def test_export_gives_the_same_logits(tmp_path, reference):
    """The exported directory loads with from_pretrained and computes what the trained weights compute."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.config import load_config
    from trainer.export import consolidated_state_dict
    from trainer.models import build_model

    exported = AutoModelForCausalLM.from_pretrained(reference / "export")
    tokenizer = AutoTokenizer.from_pretrained(reference / "export")
    ids = torch.tensor([tokenizer("The Debian project publishes a handbook.").input_ids])
    config = load_config(reference / "config.yaml")
    trained = build_model(config, 512, 64, tokenizer.eos_token_id, labels=[], seed=0)
    trained.load_state_dict(consolidated_state_dict(reference / "checkpoints" / "step_000008"))
    assert torch.equal(exported(ids).logits, trained(ids).logits)
    out = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "trainer", "export", str(reference / "checkpoints" / "step_000004"), str(out)],
                   check=True, capture_output=True)
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 512


def test_a_causal_lm_distils_from_a_teacher_placed_by_its_engine(tmp_path, config_file, engine, reference):
    """The reference's export teaches a student of half its width: under FSDP2 the teacher is sharded, under ZeRO-2 replicated."""
    run_dir = tmp_path / "student"
    result = train(config_file, 2, run_dir, *engine, f"distill.teacher={reference}", "model.hidden_size=16", "train.max_steps=4")
    placed = "sharded across 2 ranks by FSDP2" if "engine.type=fsdp2" in engine else "replicated on cpu"
    assert f"distillation from {reference}: " in result.stderr and placed in result.stderr
    assert all(math.isfinite(loss) for loss in losses(run_dir).values()) and losses(run_dir)[4] < losses(run_dir)[1]


def test_same_seed_same_losses_under_the_deepspeed_launcher(tmp_path, config_file, engine, reference):
    """A second run from scratch, started by `deepspeed` instead of torchrun, logs the reference's losses bit for bit."""
    train(config_file, 2, tmp_path / "ds", *engine, launcher="deepspeed")
    assert losses(tmp_path / "ds") == losses(reference)


def test_fsdp2_without_resharding_logs_the_references_losses(tmp_path, config_file, engine, reference):
    """`engine.reshard_after_forward=false` gathers each block once per step instead of twice per micro-batch:
    the same arithmetic, so the reference's losses bit for bit; its checkpoint at step 4 (written after an eval
    left the blocks gathered) resumes to them too."""
    if engine != ENGINES["fsdp2"]:
        pytest.skip("an FSDP2 option")
    kept = [*engine, "engine.reshard_after_forward=false"]
    train(config_file, 2, tmp_path / "kept", *kept)
    assert losses(tmp_path / "kept") == losses(reference)
    rewind(tmp_path / "kept", tmp_path / "resumed", 4)
    train(config_file, 2, tmp_path / "resumed", *kept)
    assert losses(tmp_path / "resumed") == losses(reference)


def test_nonfinite_loss_skip_policy_skips_and_goes_on(tmp_path, config_file, engine, reference):
    run_dir = tmp_path / "nan-skip"
    result = train(config_file, 2, run_dir, *engine, "debug.nan_at_steps=[3]", "train.nan_policy=skip")
    assert "step 3: non-finite loss in micro-batch 0" in result.stdout + result.stderr
    got, ref = losses(run_dir), losses(reference)
    assert got[1] == ref[1] and got[2] == ref[2] and got[3] != ref[3]  # step 3 lost one micro-batch
    assert all(math.isfinite(loss) for loss in got.values()) and max(got) == STEPS


def test_nonfinite_loss_stop_policy_checkpoints_the_last_good_step(tmp_path, config_file, engine, reference):
    run_dir = tmp_path / "nan-stop"
    result = train(config_file, 2, run_dir, *engine, "debug.nan_at_steps=[6]", "train.nan_policy=stop", expect=1)
    assert "exitcode  : 65" in result.stderr  # torchrun reports 1 and names each rank's own code
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000005"
    assert losses(run_dir) == {step: loss for step, loss in losses(reference).items() if step <= 5}
    train(config_file, 2, run_dir, *engine)  # the rerun resumes from step 5 and, without the injected NaN, finishes
    assert losses(run_dir) == losses(reference)
