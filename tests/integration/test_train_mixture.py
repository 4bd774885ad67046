"""A weighted mixture (`data.sources`) through real training runs over gloo on CPU: realised shares per step,
a schedule that switches mid-run, bitwise resume mid-schedule, 2 → 1 resume, a source that ends the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_runs import digests, losses, metrics, rewind, train

from data_tools.manifest import load_manifest
from trainer.mixture_weights import RowCounts, WeightSchedule

pytestmark = pytest.mark.slow

STEPS = 8  # as in conftest.config_file: checkpoints at 4 and 8, global batch 8
WEB = [[0, 0.75], [4, 0.75], [5, 0.25]]  # the train split: 6 of 8 rows for steps 1-5, then (as much as held) 4 of 8
HELD = 0.25  # the valid split as a second source (and its validation: eval/held/loss)
OVERRIDES = ["engine.type=fsdp2"]


@pytest.fixture(scope="module")
def mixture_file(tmp_path_factory, config_file, token_data) -> Path:
    config = json.loads(config_file.read_text())
    tokens = token_data / "tokens"
    config["data"] = {"lanes": 4, "sources": [{"name": "web", "train": str(tokens / "train"), "weight": WEB},
                                              {"name": "held", "train": str(tokens / "valid"), "valid": str(tokens / "valid"),
                                               "weight": HELD}]}
    path = tmp_path_factory.mktemp("cfg") / "mixture.yaml"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mixture_file) -> Path:
    run_dir = tmp_path_factory.mktemp("mix") / "two"
    train(mixture_file, 2, run_dir, *OVERRIDES)
    return run_dir


def test_each_step_holds_each_sources_share_and_the_schedule_switches_at_its_step(reference):
    counts = RowCounts([WeightSchedule.parse(WEB, "web"), WeightSchedule.parse(HELD, "held")], 8)
    logged = {m["step"]: m for m in metrics(reference) if "loss" in m}
    assert sorted(logged) == list(range(1, STEPS + 1))
    for step, record in logged.items():
        assert [record["data/web/rows"], record["data/held/rows"]] == counts.at(step)
        assert record["data/web/weight"] == WeightSchedule.parse(WEB, "web").at(step - 1)
    web_per_step = [logged[s]["data/web/rows"] - (logged[s - 1]["data/web/rows"] if s > 1 else 0) for s in logged]
    assert web_per_step == [6] * 5 + [4] * 3
    state = json.loads((reference / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["sources"] == {"web": {"rows": 24, "epoch": 0}, "held": {"rows": 8, "epoch": 0}}
    assert any("eval_held/loss" in m for m in metrics(reference))


def test_resume_mid_schedule_is_bitwise_and_at_one_process_reads_the_same_batches(tmp_path, mixture_file, reference):
    rewind(reference, tmp_path / "again", 4)
    train(mixture_file, 2, tmp_path / "again", *OVERRIDES)
    assert losses(tmp_path / "again") == losses(reference) and digests(tmp_path / "again") == digests(reference)
    rewind(reference, tmp_path / "one", 4)
    train(mixture_file, 1, tmp_path / "one", *OVERRIDES)
    assert digests(tmp_path / "one") == digests(reference)


def test_a_source_with_exhaust_stop_ends_the_run_at_a_checkpoint(tmp_path, mixture_file, token_data):
    held_rows, batch = load_manifest(token_data / "tokens/valid").total_rows, 128
    weight = held_rows / (batch * 5.5)  # of 1 for web: the held rows run out in step 6
    sources = json.loads(mixture_file.read_text())["data"]["sources"]
    sources[0]["weight"], sources[1]["weight"], sources[1]["exhaust"] = 1 - weight, weight, "stop"
    result = train(mixture_file, 1, tmp_path / "stop", *OVERRIDES, f"data.sources={json.dumps(sources)}",
                   f"train.global_batch={batch}", "train.micro_batch=16")
    counts = RowCounts([WeightSchedule.parse(1 - weight, "web"), WeightSchedule.parse(weight, "held")], batch)
    last = max(step for step in range(STEPS + 1) if counts.at(step)[1] <= held_rows)
    assert last == 5
    assert sorted(losses(tmp_path / "stop")) == list(range(1, last + 1))
    assert (tmp_path / "stop" / "checkpoints" / "latest").read_text().strip() == f"step_{last:06d}"
    assert f"data.sources held (exhaust: stop) runs out of rows after step {last}" in result.stderr
