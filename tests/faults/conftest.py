"""Fixtures of the fault-injection tests: the integration tests' tiny token shards and run config
(tests/integration/conftest.py), and uninterrupted 2-process runs (one per engine) to compare against."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

INTEGRATION = Path(__file__).resolve().parents[1] / "integration"
sys.path.insert(0, str(INTEGRATION))  # trainer_runs

_spec = importlib.util.spec_from_file_location("integration_fixtures", INTEGRATION / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
token_data, config_file = _fixtures.token_data, _fixtures.config_file

from faults import ENGINES
from trainer_runs import train


@pytest.fixture(scope="session")
def references(tmp_path_factory, config_file) -> Callable[[str], Path]:
    """An uninterrupted 2-process run of 8 steps per engine (checkpoints at 4 and 8), made when first asked for."""
    made: dict[str, Path] = {}

    def reference(engine: str) -> Path:
        if engine not in made:
            made[engine] = tmp_path_factory.mktemp(f"fault-ref-{engine}") / "ref"
            train(config_file, 2, made[engine], *ENGINES[engine])
        return made[engine]

    return reference


@pytest.fixture(scope="session")
def reference(references) -> Path:
    return references("deepspeed")
