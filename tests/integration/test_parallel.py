"""Tensor, sequence, pipeline and hybrid-sharded data parallel on the device mesh (FSDP2 engine): 4 processes over gloo.

Every layout trains on the same global batches, so its losses and grad norms must be the
1-process run's up to fp32 reduction order; a checkpoint written at one layout continues at another.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration.conftest import STEPS
from tests.integration.trainer_runs import digests, losses, metrics, rewind, train
from trainer.export import consolidated_state_dict

RTOL = 1e-5
TINY = ("engine.type=fsdp2", "model.num_heads=4")  # 4 heads: tp up to 4
# 4 layers: 2 stages of 2, or 2 ranks × 2 interleaved stages of 1. The embeddings are tied (the default): the first stage
# holds the embedding, the last a copy as its head. Document attention is on (the data records document starts): every
# stage masks per document as the unsplit model does.
PIPE = (*TINY, "model.num_layers=4", "train.ckpt_every=2")


def grad_norms(run_dir) -> dict[int, float]:
    return {m["step"]: m["grad_norm"] for m in metrics(run_dir) if "grad_norm" in m}


def assert_same_curve(run, reference, steps) -> None:
    got, want = losses(run), losses(reference)
    assert list(got) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=RTOL), (step, got[step], want[step])
        assert grad_norms(run)[step] == pytest.approx(grad_norms(reference)[step], rel=RTOL), step
        assert digests(run)[step] == digests(reference)[step], step  # the same global batch


def one_process(config_file, tmp_path_factory, overrides) -> Path:
    """The run every layout is compared with: the same config on one process."""
    run = tmp_path_factory.mktemp("parallel") / "one"
    train(config_file, 1, run, *overrides)
    return run


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
    return one_process(config_file, tmp_path_factory, TINY)


def test_dp2_tp2_matches_one_process_and_resumes_at_tp4(config_file, reference, tmp_path):
    run = tmp_path / "dp2tp2"
    train(config_file, 4, run, *TINY, "parallel.tp=2")
    assert_same_curve(run, reference, range(1, STEPS + 1))
    assert (run / "export" / "config.json").exists()  # a tensor-parallel checkpoint exports to a plain model
    resumed = tmp_path / "tp4"
    rewind(run, resumed, 4)
    train(config_file, 4, resumed, *TINY, "parallel.tp=4")
    assert_same_curve(resumed, reference, range(1, STEPS + 1))  # steps 1-4 from the dp2×tp2 log, 5-8 at tp4


def test_hsdp_2x2_matches_one_process_and_resumes_on_one_process(config_file, reference, tmp_path):
    run = tmp_path / "hsdp"
    train(config_file, 4, run, *TINY, "parallel.dp_replicate=2")
    assert_same_curve(run, reference, range(1, STEPS + 1))
    resumed = tmp_path / "one"
    rewind(run, resumed, 4)
    train(config_file, 1, resumed, *TINY)
    assert_same_curve(resumed, reference, range(1, STEPS + 1))  # steps 1-4 at hsdp 2×2, 5-8 on one process


def eval_losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["eval_loss"] for m in metrics(run_dir) if "eval_loss" in m}


@pytest.fixture(scope="module")
def pipe_reference(config_file, tmp_path_factory):
    return one_process(config_file, tmp_path_factory, PIPE)


def test_tp2_pp2_matches_one_process_and_resumes_at_dp2_tp2_then_on_one_process(config_file, pipe_reference, tmp_path):
    """1F1B over 2 stages, each tensor parallel over 2 ranks, the embedding on the first and its tied copy on the last
    (their gradients summed); its step-4 checkpoint continues at dp2×tp2, whose step-6 checkpoint continues on one
    process: one curve, the uninterrupted run's."""
    run = tmp_path / "tp2pp2"
    train(config_file, 4, run, *PIPE, "parallel.tp=2", "parallel.pp=2", "parallel.pp_schedule=1f1b")
    assert_same_curve(run, pipe_reference, range(1, STEPS + 1))
    assert eval_losses(run) == pytest.approx(eval_losses(pipe_reference), rel=RTOL)  # the forward-only pass through the stages
    assert (run / "export" / "config.json").exists()
    weights = consolidated_state_dict(run / "checkpoints" / f"step_{STEPS:06d}")  # the tied copies stayed equal
    assert torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    dp2tp2, one = tmp_path / "dp2tp2", tmp_path / "one"
    rewind(run, dp2tp2, 4)
    train(config_file, 4, dp2tp2, *PIPE, "parallel.tp=2")
    rewind(dp2tp2, one, 6)
    train(config_file, 1, one, *PIPE)
    assert_same_curve(one, pipe_reference, range(1, STEPS + 1))  # steps 1-4 at tp2×pp2, 5-6 at dp2×tp2, 7-8 on one process


def test_dp2_pp2_interleaved_matches_one_process(config_file, pipe_reference, tmp_path):
    """Interleaved 1F1B, 2 stages of 1 layer on each pipeline rank, each stage sharded over 2 data-parallel ranks."""
    run = tmp_path / "dp2pp2"
    train(config_file, 4, run, *PIPE, "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2")
    assert_same_curve(run, pipe_reference, range(1, STEPS + 1))


def test_a_one_process_checkpoint_continues_at_pp2_with_the_tied_weights_optimizer_state(config_file, pipe_reference,
                                                                                        tmp_path):
    """One process saves the tied weight's optimizer state once, under the embedding's name; the last stage's head
    copy reads it from there (GPipe over 2 stages, steps 5-8)."""
    run = tmp_path / "pp2"
    rewind(pipe_reference, run, 4)
    train(config_file, 2, run, *PIPE, "parallel.pp=2", "parallel.pp_schedule=gpipe")
    assert_same_curve(run, pipe_reference, range(1, STEPS + 1))


def test_pp2_with_untied_embeddings_matches_one_process(config_file, tmp_path_factory, tmp_path):
    """Untied, the last stage owns its head outright: no copy, no gradient all-reduce between first and last stage."""
    untied = (*PIPE, "model.tie_embeddings=false")
    reference = one_process(config_file, tmp_path_factory, untied)
    run = tmp_path / "pp2"
    train(config_file, 2, run, *untied, "parallel.pp=2", "parallel.pp_schedule=1f1b")
    assert_same_curve(run, reference, range(1, STEPS + 1))
    weights = consolidated_state_dict(run / "checkpoints" / f"step_{STEPS:06d}")
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])


def test_a_world_size_the_layout_does_not_divide_is_one_line(config_file, tmp_path):
    result = train(config_file, 1, tmp_path / "tp2", *TINY, "parallel.tp=2", expect=2)
    assert result.stderr.strip().splitlines()[-1] == (
        "error: parallel: pp × dp_replicate × cp × tp = 1 × 1 × 1 × 2 = 2 does not divide the world size 1; "
        "choose sizes whose product divides it")
