"""Fixtures for the data_tools unit tests: the shipped corpora's documents, read and extracted once
per session (every test gets fresh copies: steps edit documents in place). `corpora` and
`gpt2_dir` come from tests/conftest.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch.distributed as dist

from data_tools.config import ExtractConfig
from data_tools.doc import Doc
from data_tools.stats import StageStats
from token_splits import Corpus, prepare_splits

def _extracted(path: Path) -> list[Doc]:
    from data_tools.extract import ExtractText
    from data_tools.readers import detect_format, get_reader

    warnings: list[str] = []
    docs = list(ExtractText(ExtractConfig())(get_reader(detect_format(path))(path, StageStats(), warnings.append)))
    assert not warnings, warnings
    return docs


@pytest.fixture(scope="session")
def _handbook_docs(corpora):
    return _extracted(corpora / "handbook-multilingual.warc.gz")


@pytest.fixture(scope="session")
def _enwiki_docs(corpora):
    return _extracted(corpora / "enwiki-sample.xml.bz2")


@pytest.fixture
def handbook_docs(_handbook_docs):
    """The 122 HTML pages of the multilingual WARC as extracted text documents, in file order."""
    return copy.deepcopy(_handbook_docs)


@pytest.fixture
def enwiki_docs(_enwiki_docs):
    """The 106 articles of the Wikipedia sample as extracted text documents, in file order."""
    return copy.deepcopy(_enwiki_docs)


@pytest.fixture(scope="session")
def article(_enwiki_docs):
    """Plain text of one article by title (a string: nothing to copy)."""
    texts = {doc.meta["title"]: doc.text for doc in _enwiki_docs}
    return texts.__getitem__


@pytest.fixture
def run_step():
    """Run a pipeline step over texts; return (kept documents, the step's stats)."""

    def run(step, texts, lang="en"):
        docs = [Doc(id=f"doc-{i}", source="test", text=text, lang=lang) for i, text in enumerate(texts)]
        kept = list(step(docs))
        return kept, step.stats

    return run


@pytest.fixture(scope="session")
def one_process_group(tmp_path_factory):
    """A world of one for code that asks for its rank (tasks, evaluators, engines); a file store needs no
    port, which test runs in parallel would fight over."""
    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("group") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


@pytest.fixture(scope="session")
def splits(tmp_path_factory, corpora, gpt2_dir) -> tuple[Corpus, Corpus]:
    """(train, valid) token splits of the sample WARCs (token_splits.prepare_splits), prepared once."""
    return prepare_splits(tmp_path_factory.mktemp("lanes-data"), corpora, gpt2_dir)


@pytest.fixture(scope="session")
def train(splits) -> Corpus:
    return splits[0]


@pytest.fixture(scope="session")
def valid(splits) -> Corpus:
    return splits[1]
