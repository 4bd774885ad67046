"""Fixtures of the fault-injection tests: the integration tests' tiny token shards and run config
(tests/integration/conftest.py), and one uninterrupted 2-process run to compare against."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

INTEGRATION = Path(__file__).resolve().parents[1] / "integration"
sys.path.insert(0, str(INTEGRATION))  # trainer_runs

_spec = importlib.util.spec_from_file_location("integration_fixtures", INTEGRATION / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
token_data, config_file = _fixtures.token_data, _fixtures.config_file

from trainer_runs import train


@pytest.fixture(scope="session")
def reference(tmp_path_factory, config_file) -> Path:
    """An uninterrupted 2-process run of 8 steps (DeepSpeed ZeRO by default), checkpoints at 4 and 8."""
    run_dir = tmp_path_factory.mktemp("fault-ref") / "ref"
    train(config_file, 2, run_dir)
    return run_dir
