"""Every mistake a user can make in a training run stops it at start with one line saying what."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer_runs import ENV, train_cmd

pytestmark = pytest.mark.slow


def run_trainer(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def other_tokenizer_data(tmp_path_factory, corpora) -> Path:
    """The same text tokenized with GPT-2: another tokenizer, another vocabulary."""
    out = tmp_path_factory.mktemp("gpt2") / "data"
    subprocess.run([sys.executable, "-m", "data_tools", "-q", "prepare", "--output", str(out), "--tokenizer",
                    str(corpora / "tokenizers/gpt2"), "--seq-len", "64", "--valid-fraction", "0.1",
                    "--input", str(corpora / "iana.warc.gz")], check=True, capture_output=True)
    return out


def corrupted_copy(token_data: Path, tmp: Path) -> Path:
    copy = tmp / "corrupt"
    shutil.copytree(token_data, copy)
    shard = next((copy / "tokens/train").glob("shard-*.tar"))
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    return copy / "tokens/train"


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown_key", "unknown key 'optim.lrr'; did you mean 'optim.lr'?"),
        ("wrong_type", "'train.max_steps' must be int or NoneType, got 'many'"),
        ("batch_not_divisible", "train.global_batch 10 must be a multiple of train.micro_batch × world size = 4 × 1"),
        ("missing_manifest", "no manifest here; run `python -m data_tools prepare` first"),
        ("corrupt_shard", "the shard is corrupt"),
        ("tokenizer_mismatch", "data.valid"),
        ("memory_check", "more than the 0.0001 GiB available"),
        ("model_shape", "checkpoint of model"),
        ("model_shape_fsdp2", "checkpoint of model"),
        ("latest_missing", "names step_000099, which is missing or incomplete"),
        ("doc_attention_differs", "trained with data.doc_attention false, this run resolves it to true; "
                                  "set data.doc_attention=false or use a new run.name"),
    ],
)
def test_bad_run_fails_with_one_line(tmp_path, config_file, token_data, other_tokenizer_data, case, message):
    run_dir = tmp_path / "run"
    overrides = {
        "unknown_key": ["optim.lrr=1"],
        "wrong_type": ["train.max_steps=many"],
        "batch_not_divisible": ["train.global_batch=10", "train.micro_batch=4"],
        "missing_manifest": [f"data.train={tmp_path / 'nowhere'}"],
        "corrupt_shard": [f"data.train={corrupted_copy(token_data, tmp_path)}"],
        "tokenizer_mismatch": [f"data.valid={other_tokenizer_data / 'tokens/valid'}"],
        "memory_check": ["train.gpu_memory_gb=0.0001"],  # as a GPU too small for the model would be refused
        "model_shape": ["model.hidden_size=64"],
        "model_shape_fsdp2": ["engine.type=fsdp2", "model.hidden_size=64"],
        "latest_missing": [],
        "doc_attention_differs": [],  # unset: on, the data records document starts
    }[case]
    if case in ("model_shape", "model_shape_fsdp2", "latest_missing", "doc_attention_differs"):
        first = {"model_shape_fsdp2": overrides[:1], "doc_attention_differs": ["data.doc_attention=false"]}.get(case, [])
        ok = run_trainer(train_cmd(config_file, 1, run_dir, *first, "train.max_steps=1"))
        assert ok.returncode == 0, ok.stderr[-2000:]
        if case == "latest_missing":
            (run_dir / "checkpoints" / "latest").write_text("step_000099\n")
    result = run_trainer(train_cmd(config_file, 1, run_dir, *overrides))
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]


def test_lanes_must_divide_by_world_size(tmp_path, config_file):
    overrides = ["data.lanes=3", "train.global_batch=12", "train.micro_batch=2"]
    result = run_trainer(train_cmd(config_file, 2, tmp_path / "run", *overrides))
    assert result.returncode != 0
    assert "lanes" in result.stderr and "3" in result.stderr and "world" in result.stderr


@pytest.fixture(scope="module")
def sentiment_data(tmp_path_factory, corpora) -> Path:
    out = tmp_path_factory.mktemp("ft") / "sentiment"
    subprocess.run([sys.executable, "-m", "data_tools", "prepare-finetune", "--task", "classification", "--input",
                    str(corpora / "finetune/sentiment-movie-reviews.csv"), "--tokenizer", str(corpora / "tokenizers/gpt2"),
                    "--seq-len", "32", "--valid-fraction", "0.05", "--output", str(out)], check=True, capture_output=True)
    return out


def relabelled_valid(data: Path, tmp: Path) -> Path:
    """The valid split as if it had been prepared with a label the training split never had."""
    copy = tmp / "valid"
    shutil.copytree(data / "valid", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["labels"] = ["negative", "neutral", "positive"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize(
    "case, message",
    [
        ("pretraining_data", "made by data_tools prepare (packed tokens), but task.type classification reads data from "
                             "prepare-finetune --task classification"),
        ("label_not_in_vocabulary", "label 'neutral' is not in the training label vocabulary ['negative', 'positive']"),
        ("lora_target_matches_nothing", "peft.target_modules"),
    ],
)
def test_bad_finetuning_run_fails_with_one_line(tmp_path, config_file, token_data, sentiment_data, case, message):
    overrides = ["task.type=classification", f"data.train={sentiment_data / 'train'}", f"data.valid={sentiment_data / 'valid'}"]
    overrides += {
        "pretraining_data": [f"data.train={token_data / 'tokens/train'}", "data.valid=null"],
        "label_not_in_vocabulary": [f"data.valid={relabelled_valid(sentiment_data, tmp_path)}"],
        "lora_target_matches_nothing": ["model.arch=gpt2", "peft.method=lora", "peft.target_modules=[query_proj]"],
    }[case]
    result = run_trainer(train_cmd(config_file, 1, tmp_path / "run", *overrides))
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
