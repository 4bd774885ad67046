"""Fixtures of the training tests: tiny token shards from the sample WARCs and a tiny run config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 8


@pytest.fixture(scope="session")
def token_data(tmp_path_factory, corpora) -> Path:
    """Tiny token shards (BPE-512, 64-token rows) from the two sample WARCs."""
    out = tmp_path_factory.mktemp("tokens") / "data"
    cmd = [sys.executable, "-m", "data_tools", "-q", "prepare", "--output", str(out), "--train-tokenizer", "512",
           "--seq-len", "64", "--valid-fraction", "0.1"]
    for name in ("handbook-multilingual.warc.gz", "iana.warc.gz"):
        cmd += ["--input", str(corpora / name)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def config_file(tmp_path_factory, token_data) -> Path:
    config = {
        "run": {"name": "t", "out_dir": str(tmp_path_factory.mktemp("runs")), "seed": 3},
        "model": {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2},
        "data": {"train": str(token_data / "tokens/train"), "valid": str(token_data / "tokens/valid"), "lanes": 4},
        "train": {"global_batch": 8, "micro_batch": 2, "max_steps": STEPS, "log_every": 1, "eval_every": 4, "eval_batches": 1,
                  "ckpt_every": 4, "keep_last": 3},
        "optim": {"lr": 3e-3},
        "schedule": {"warmup_steps": 2},
    }
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(json.dumps(config))
    return path
