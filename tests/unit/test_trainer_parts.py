"""Trainer components that need no process group: config, schedule, DeepSpeed config, checkpoints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from data_tools.common import CheckpointError
from trainer.checkpoint import Checkpoints, TrainerState, tag
from trainer.config import ConfigError, ScheduleConfig, load_config
from trainer.distributed import cpu_threads
from trainer.engines.deepspeed_engine import ds_config
from trainer.schedule import lr_factor_fn

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"


def test_overrides_are_typed_and_validated():
    config = load_config(DEMO, ["optim.lr=1e-4", "train.max_steps=7", "engine.zero_stage=3", "optim.betas=[0.8, 0.9]"])
    assert (config.optim.lr, config.train.max_steps, config.engine.zero_stage, config.optim.betas) == (1e-4, 7, 3, [0.8, 0.9])
    assert config.run_dir == Path("runs/demo")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        (["optimizer.lr=1"], "unknown key 'optimizer.lr'; did you mean 'optim'?"),
        (["train.global_batch=big"], "'train.global_batch' must be int, got 'big'"),
        (["schedule.decay=cosin"], "must be one of constant, linear, cosine, wsd, got 'cosin'; did you mean 'cosine'?"),
        (["precision=fp16"], "'precision' must be one of fp32, bf16"),
        (["data.lanes=0"], "'data.lanes' must be positive"),
        (["engine.zero_stage=4"], "'engine.zero_stage' must be 0, 1, 2 or 3"),
        (["engine.offload=cpu", "engine.zero_stage=0"], "needs engine.zero_stage 1-3"),
        (["train.max_steps=null"], "set 'train.max_steps' or 'train.max_tokens'"),
        (["optim.lr"], "expected key=value"),
        (["engine.type=fsdp2", "engine.zero_stage=3"], "'engine.zero_stage' is a deepspeed option, but engine.type is fsdp2"),
        (["engine.type=fsdp2", "engine.zero_stage=null", "engine.ds_config=x.json"], "'engine.ds_config' is a deepspeed option"),
        (["engine.reduce_dtype=bf16"], "'engine.reduce_dtype' is a fsdp2 option, but engine.type is deepspeed"),
        (["engine.activation_checkpointing=some"],
         "'engine.activation_checkpointing' must be one of none, full, selective, True, False, got 'some'"),
        (["optim.impl=fast"], "'optim.impl' must be one of for_loop, foreach, fused, got 'fast'"),
        (["engine.zero_stage=3", "engine.activation_checkpointing=selective"], "'engine.activation_checkpointing: selective' "
                                                                             "does not work with ZeRO-3's parameter gathering"),
        (["train.async_checkpoint=true"], "'train.async_checkpoint' needs engine.type fsdp2: DeepSpeed's decoupled checkpoint "
                                          "writer (checkpoint.writer.decoupled) fails on ZeRO optimizer state; set it to false"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_switching_engines_on_the_command_line_drops_the_recipes_other_engine_keys_with_one_warning(caplog):
    """demo.yaml is a DeepSpeed recipe (engine.zero_stage: 2); a command line cannot delete that key."""
    with caplog.at_level(logging.WARNING, logger="trainer"):
        config = load_config(DEMO, ["engine.type=fsdp2"])
    assert (config.engine.type, config.engine.zero_stage, config.engine.ds_config) == ("fsdp2", None, None)
    assert [r.getMessage() for r in caplog.records] == [
        f"{DEMO}: engine.type=fsdp2 given on the command line; ignoring engine.zero_stage from the file"]
    caplog.clear()
    assert load_config(DEMO, ["engine.zero_stage=3"]).engine.zero_stage == 3 and not caplog.records


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  global_bach: 8\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key 'train.global_bach'; did you mean 'train.global_batch'\?"):
        load_config(path)


@pytest.mark.parametrize("decay", ["constant", "linear", "cosine", "wsd"])
def test_schedule_warms_up_then_decays_to_the_floor(decay):
    factor = lr_factor_fn(ScheduleConfig(warmup_steps=10, decay=decay, min_lr_ratio=0.1, wsd_decay_frac=0.2), 110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert all(factor(s) <= factor(s - 1) + 1e-12 for s in range(11, 110))
    assert factor(110) == pytest.approx(1.0 if decay == "constant" else 0.1)
    if decay == "wsd":
        assert factor(80) == pytest.approx(1.0) and factor(100) < 1.0


def test_ds_config_fills_auto_fields_and_refuses_contradictions(tmp_path):
    config = load_config(DEMO, ["engine.zero_stage=1", "precision=bf16"])
    filled = ds_config(config, world_size=2)
    assert filled["train_batch_size"] == 16 and filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 2 and filled["gradient_clipping"] == 1.0
    assert filled["bf16"]["enabled"] is True and filled["zero_optimization"]["stage"] == 1
    assert filled["zero_optimization"]["overlap_comm"] is False  # no CUDA: DeepSpeed's CPU accelerator has no streams
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": "auto"}}))
    config = load_config(DEMO, [f"engine.ds_config={own}"])
    with pytest.raises(ConfigError, match="'train_batch_size' is 32 but the run config gives 16"):
        ds_config(config, world_size=2)


def _publish(checkpoints: Checkpoints, step: int, keep_last: int = 2, keep_every: int | None = None) -> None:
    (checkpoints.root / checkpoints.staging(step)).mkdir(parents=True)
    state = TrainerState(step, step * 10, "fp", 2, "deepspeed", 2, {"model_type": "llama"})
    checkpoints.publish(state, keep_last, keep_every)


def test_checkpoints_publish_atomically_and_keep_last_and_every(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    assert checkpoints.latest() is None
    for step in (100, 200, 300, 400, 500):
        _publish(checkpoints, step, keep_last=2, keep_every=200)
    assert checkpoints.latest() == tag(500)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [tag(200), tag(400), tag(500)]
    assert checkpoints.read_state(tag(500)).tokens == 5000
    assert all((tmp_path / t / "COMPLETE").exists() for t in (tag(200), tag(400), tag(500)))


@pytest.mark.parametrize(("recorded", "config", "trained"), [
    (True, {"data": {"doc_attention": False}}, True),  # recorded: what the run resolved
    (None, {"data": {"doc_attention": False}}, False),  # an older checkpoint: its explicit setting
    (None, {"data": {"doc_attention": None}}, None),  # unset then: unknown, not checked at resume
    (None, {}, None),
])
def test_checkpoint_says_whether_the_run_trained_with_document_attention(recorded, config, trained):
    state = TrainerState(1, 10, "fp", 1, "fsdp2", None, {}, config=config, doc_attention=recorded)
    assert state.trained_doc_attention() is trained


def test_latest_naming_an_incomplete_checkpoint_is_refused(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    _publish(checkpoints, 100)
    (tmp_path / tag(100) / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match="names step_000100, which is missing or incomplete"):
        checkpoints.latest()


def test_resume_from_previous_goes_back_one_and_rewind_moves_the_newer_aside(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match="--resume-from previous needs a complete checkpoint before `latest` \\(none\\)"):
        checkpoints.resume_tag("previous")
    for step in (100, 200, 300):
        _publish(checkpoints, step, keep_last=3)
    assert checkpoints.resume_tag("latest") == tag(300)
    assert checkpoints.resume_tag("previous") == tag(200)
    assert checkpoints.resume_tag(tag(100)) == tag(100)
    with pytest.raises(CheckpointError,
                       match="step_000150: --resume-from step_000150: not a complete checkpoint here; complete ones: "):
        checkpoints.resume_tag(tag(150))
    checkpoints.rewind(tag(200))
    assert checkpoints.latest() == tag(200) and (tmp_path / "abandoned" / tag(300) / "COMPLETE").exists()
    _publish(checkpoints, 300, keep_last=1)  # the rerun's own step 300; retention never touches abandoned/
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [tag(300)] and (tmp_path / "abandoned" / tag(300)).exists()


def test_a_damaged_trainer_state_is_named_with_the_way_out(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    _publish(checkpoints, 100)
    (tmp_path / tag(100) / "trainer_state.json").write_text('{"step": 1')
    with pytest.raises(CheckpointError, match=r"trainer_state.json: unreadable \(.*\); the checkpoint is truncated or corrupt; "
                                          r"`--resume-from previous` continues from the checkpoint before step_000100"):
        checkpoints.read_state(tag(100))


@pytest.mark.parametrize("given, mode", [(True, "full"), (False, "none"), ("selective", "selective")])
def test_activation_checkpointing_keeps_the_old_true_false_values(given, mode):
    assert load_config(DEMO, [f"engine.activation_checkpointing={given}"]).engine.activation_checkpointing == mode


def test_activation_checkpointing_on_a_model_without_it_is_refused():
    import torch

    from trainer.engines.fsdp2_engine import FSDP2Engine

    config = load_config(DEMO, ["engine.type=fsdp2", "engine.zero_stage=null", "engine.activation_checkpointing=true"])
    with pytest.raises(ConfigError, match="engine.activation_checkpointing: Linear does not support it"):
        FSDP2Engine(torch.nn.Linear(4, 4), config, world_size=1, total_steps=10)


@pytest.mark.parametrize(("environ", "threads"), [
    ({}, None),  # one process: torch's own default, every core
    ({"LOCAL_WORLD_SIZE": "2"}, 1),  # torchrun or SLURM, 2 processes on the node
    ({"LOCAL_SIZE": "2"}, 1),  # the deepspeed launcher, which sets no thread count
    ({"LOCAL_WORLD_SIZE": "4"}, 1),  # more processes than cores: still one thread each
    ({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "2"}, None),  # the user's (or torchrun's) own choice is kept
])
def test_cpu_processes_share_the_cores_instead_of_each_taking_all(environ, threads):
    assert cpu_threads(environ, cores=2) == threads
