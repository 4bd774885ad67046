"""Token splits of the shipped sample WARCs, and their rows read independently of the loaders (tests/unit/conftest.py
prepares them once per test run for the lanes and the mixture tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.cli import main as data_tools_main
from data_tools.manifest import iter_blocks, load_manifest
from trainer.data import BatchStream

SEQ_LEN = 64


@dataclass
class Corpus:
    """A token split and its rows per shard, read independently of the loader."""

    directory: Path
    shards: list[np.ndarray]
    doc_starts: list[list[list[int]]] = field(default_factory=list)  # per shard, per row: from the samples' metadata

    def rows(self, shard: int, first: int, stop: int) -> np.ndarray:
        return self.shards[shard][first:stop]

    def positions(self, shard: int, first: int, stop: int) -> np.ndarray:
        """Each token's position in its document, counted one token at a time from the recorded starts."""
        out = np.zeros((stop - first, SEQ_LEN), np.int64)
        for row, starts in enumerate(self.doc_starts[shard][first:stop]):
            for j in range(1, SEQ_LEN):
                out[row, j] = 0 if j in starts else out[row, j - 1] + 1
        return out

    @property
    def all_rows(self) -> np.ndarray:
        return np.concatenate(self.shards)


def read_corpus(directory: Path) -> Corpus:
    manifest = load_manifest(directory)
    blocks = [list(iter_blocks(directory / s.path)) for s in manifest.shards]
    return Corpus(directory, [np.concatenate([rows for rows, _ in shard]) for shard in blocks],
                  [[starts for _, meta in shard for starts in meta["doc_starts"]] for shard in blocks])


def prepare_splits(out: Path, corpora: Path, gpt2_dir: Path) -> tuple[Corpus, Corpus]:
    """(train, valid): train in 6 shards of up to 500 rows (blocks of 64), valid in one shard of 178 rows."""
    config = out / "pack.yaml"
    config.write_text("pack: {rows_per_shard: 500, rows_per_sample: 64}\n")
    argv = ["-q", "prepare", "--input", str(corpora / "*.warc.gz"), "--output", str(out / "job"), "--tokenizer", str(gpt2_dir)]
    argv += ["--seq-len", str(SEQ_LEN), "--valid-fraction", "0.05", "--config", str(config)]
    assert data_tools_main(argv) == 0
    train, valid = (read_corpus(out / "job" / "tokens" / split) for split in ("train", "valid"))
    assert len(train.shards) == 6 and len(valid.shards) == 1  # the layouts the tests rely on
    return train, valid


def take(loader: BatchStream, start: int, steps: int) -> list[np.ndarray]:
    """`steps` batches from `start_step`, closing the loader's stream after."""
    stream = loader.batches(start)
    try:
        return [next(stream) for _ in range(steps)]
    finally:
        loader.close()
