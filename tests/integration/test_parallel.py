"""Tensor, sequence and hybrid-sharded data parallel on the device mesh (FSDP2 engine): 4 processes over gloo.

Every layout trains on the same global batches, so its losses and grad norms must be the
1-process run's up to fp32 reduction order; a checkpoint written at one layout continues at another.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import STEPS
from tests.integration.trainer_runs import digests, losses, metrics, rewind, train

RTOL = 1e-5
TINY = ("engine.type=fsdp2", "model.num_heads=4")  # 4 heads: tp up to 4


def grad_norms(run_dir) -> dict[int, float]:
    return {m["step"]: m["grad_norm"] for m in metrics(run_dir) if "grad_norm" in m}


def assert_same_curve(run, reference, steps) -> None:
    got, want = losses(run), losses(reference)
    assert list(got) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=RTOL), (step, got[step], want[step])
        assert grad_norms(run)[step] == pytest.approx(grad_norms(reference)[step], rel=RTOL), step
        assert digests(run)[step] == digests(reference)[step], step  # the same global batch


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("parallel") / "one"
    train(config_file, 1, run, *TINY)
    return run


def test_dp2_tp2_matches_one_process_and_resumes_at_tp4_and_on_one_process(config_file, reference, tmp_path):
    run = tmp_path / "dp2tp2"
    train(config_file, 4, run, *TINY, "parallel.tp=2")
    assert_same_curve(run, reference, range(1, STEPS + 1))
    assert (run / "export" / "config.json").exists()  # a tensor-parallel checkpoint exports to a plain model
    for procs, layout in ((4, "parallel.tp=4"), (1, "parallel.tp=1")):
        resumed = tmp_path / f"resumed{procs}"
        rewind(run, resumed, 4)
        train(config_file, procs, resumed, *TINY, layout)
        assert_same_curve(resumed, reference, range(1, STEPS + 1))  # steps 1-4 from the dp2×tp2 log, 5-8 resumed


def test_hsdp_2x2_matches_one_process(config_file, reference, tmp_path):
    run = tmp_path / "hsdp"
    train(config_file, 4, run, *TINY, "parallel.dp_replicate=2", "train.ckpt_every=100")
    assert_same_curve(run, reference, range(1, STEPS + 1))


def test_layouts_that_cannot_run_are_refused_in_one_line(config_file, tmp_path):
    cases = {
        ("parallel.tp=2",): "parallel: pp × dp_replicate × cp × tp = 1 × 1 × 1 × 2 = 2 does not divide the world size 1",
        ("parallel.cp=2",): "parallel.cp 2: context parallel (ring attention over SDPA) needs CUDA devices",
    }
    for overrides, message in cases.items():
        result = train(config_file, 1, tmp_path / "_".join(overrides).replace("=", ""), *TINY, *overrides, expect=1)
        assert message in result.stderr.strip().splitlines()[-1]
