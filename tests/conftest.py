"""Fixtures shared by unit and integration tests: the sample corpora shipped in the repo."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "examples" / "corpora"


@pytest.fixture(scope="session")
def corpora() -> Path:
    return CORPORA


@pytest.fixture(scope="session")
def gpt2_dir() -> Path:
    return CORPORA / "tokenizers" / "gpt2"
