"""Columnar inputs: Parquet files and `datasets` directories saved with `save_to_disk`.

Both are read in record batches of the `text` column only, so memory stays flat. A Parquet task
may read a range of row groups: there `start`/`end` count row groups, not bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from data_tools.doc import Doc
from data_tools.errors import DataError
from data_tools.readers import Warn
from data_tools.stats import StageStats


def _docs(path: Path, texts: Iterable, stats: StageStats, warn: Warn, first_row: int = 0) -> Iterator[Doc]:
    for row, text in enumerate(texts, first_row):
        stats.docs_in += 1
        if not isinstance(text, str):
            stats.dropped["missing_text"] += 1
            warn(f"{path}: row {row} has no string 'text'; skipped")
            continue
        stats.docs_out += 1
        yield Doc(id=f"{path.name}:{row}", source=path.name, text=text)


def open_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a bad footer
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    if "text" not in table.schema_arrow.names:
        raise DataError(f"{path}: no 'text' column (columns: {', '.join(table.schema_arrow.names)})")
    return table


def read_parquet(path: Path, stats: StageStats, warn: Warn, start: int = 0, end: int | None = None) -> Iterator[Doc]:
    table = open_parquet(path)
    groups = list(range(start, table.num_row_groups if end is None else min(end, table.num_row_groups)))
    if not groups:
        return
    first_row = sum(table.metadata.row_group(g).num_rows for g in range(start))
    texts = (t for batch in table.iter_batches(columns=["text"], row_groups=groups) for t in batch.column(0).to_pylist())
    yield from _docs(path, texts, stats, warn, first_row)


def read_hf_dataset(path: Path, stats: StageStats, warn: Warn, start: int = 0, end: int | None = None) -> Iterator[Doc]:
    """The whole dataset (the planner never splits it, so `start`/`end` are always 0/None)."""
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    if "text" not in dataset.column_names:
        raise DataError(f"{path}: dataset has no 'text' column (columns: {', '.join(dataset.column_names)})")
    texts = (t for batch in dataset.iter(batch_size=1000) for t in batch["text"])
    yield from _docs(path, texts, stats, warn)
