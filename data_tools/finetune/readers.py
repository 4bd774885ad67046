"""Finetuning inputs → records: CSV/TSV, CoNLL, JSONL, Parquet, or a `datasets` directory.

Unlike the pretraining readers, which skip what they cannot read, these stop at the first bad
line: a labelled set is small and curated, and the line number is what the user needs to fix it.
Text formats may be gzip- or zstd-compressed. Each record carries its place in the file ("line N"
for text, "row N" counted from 0 for tables) and its task fields under their canonical keys.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from data_tools.errors import DataError
from data_tools.finetune.records import Field, Record, flag
from data_tools.readers import detect_format
from data_tools.readers.jsonl import _open_bytes

FORMATS = "CSV/TSV with a header row, CoNLL (token<TAB>tag), JSONL, Parquet or a datasets save_to_disk directory"
SUFFIXES = {
    ".csv": "csv", ".tsv": "tsv", ".conll": "conll", ".iob": "conll", ".bio": "conll", ".jsonl": "jsonl", ".ndjson": "jsonl",
}
COMPRESSED = (".gz", ".zst")
DOCSTART = "-DOCSTART-"  # CoNLL-2003 document separator, not a sentence


def detect(path: Path) -> str:
    """csv, tsv, conll, jsonl, parquet or hf_dataset: by file name, else by content."""
    name = path.name.lower()
    for ext in COMPRESSED:
        name = name.removesuffix(ext)
    if path.is_file() and Path(name).suffix in SUFFIXES:
        return SUFFIXES[Path(name).suffix]
    try:
        fmt = detect_format(path)
    except DataError:
        fmt = None
    if fmt not in ("jsonl", "parquet", "hf_dataset"):
        raise DataError(f"{path}: not a finetuning input; expected {FORMATS}")
    return fmt


def _open_text(path: Path) -> io.TextIOWrapper:
    return io.TextIOWrapper(_open_bytes(path), encoding="utf-8-sig", newline="")  # -sig: Excel's CSV BOM


def _columns(path: Path, names: list[str], fields: tuple[Field, ...]) -> None:
    for field in fields:
        if field.name not in names:
            raise DataError(f"{path}: no column {field.name!r} (columns: {', '.join(names)}); pass {flag(field.key)}")


def _read_csv(path: Path, fields: tuple[Field, ...], delimiter: str) -> Iterator[Record]:
    with _open_text(path) as f:
        rows = csv.reader(f, delimiter=delimiter)
        try:
            header = next(rows, None)
            if header is None:
                raise DataError(f"{path}: empty file; expected a header row naming the columns")
            _columns(path, header, fields)
            index = {field.key: header.index(field.name) for field in fields}
            line = rows.line_num + 1
            for row in rows:
                if row:  # the csv module returns [] for a blank line
                    if len(row) != len(header):
                        raise DataError(
                            f"{path} line {line}: {len(row)} values, the header has {len(header)}; "
                            f"quote values holding '{delimiter}'"
                        )
                    yield Record(f"{path} line {line}", {key: row[i] for key, i in index.items()})
                line = rows.line_num + 1
        except csv.Error as err:
            raise DataError(f"{path} line {rows.line_num}: {err}") from None


def _read_conll(path: Path) -> Iterator[Record]:
    """One record per sentence (blank-line separated); a token's tag is its line's last column."""
    tokens: list[str] = []
    tags: list[str] = []
    first = 0
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.startswith(DOCSTART):
                if tokens:
                    yield Record(f"{path} line {first}", {"tokens": tokens, "tags": tags})
                tokens, tags = [], []
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) < 2 or not parts[-1].strip():
                raise DataError(f"{path} line {line_no}: {parts[0]!r} has no tag; each line needs token<TAB>tag")
            if not tokens:
                first = line_no
            tokens.append(parts[0])
            tags.append(parts[-1].strip())
    if tokens:
        yield Record(f"{path} line {first}", {"tokens": tokens, "tags": tags})


def _read_jsonl(path: Path, fields: tuple[Field, ...]) -> Iterator[Record]:
    with _open_text(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {line_no}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg}); fix the line") from None
            if not isinstance(item, dict):
                raise DataError(f"{where}: a JSON {type(item).__name__}, expected an object with the record's fields")
            for field in fields:
                if field.name not in item:
                    raise DataError(
                        f"{where}: missing field {field.name!r} (has: {', '.join(item)}); fix the line or pass {flag(field.key)}"
                    )
            yield Record(where, {field.key: item[field.name] for field in fields})


def _read_parquet(path: Path, fields: tuple[Field, ...]) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (OSError, ValueError) as err:  # pyarrow: ArrowInvalid (a ValueError) or an IO error
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    _columns(path, table.schema_arrow.names, fields)
    rows = (item for batch in table.iter_batches(columns=[f.name for f in fields]) for item in batch.to_pylist())
    for row, item in enumerate(rows):
        yield Record(f"{path} row {row}", {field.key: item[field.name] for field in fields})


def _class_names(feature) -> Callable[[object], object]:
    """Map ClassLabel ids (or lists of them) to their names; -1, "no label", becomes None and fails the checks."""
    from datasets import ClassLabel

    labels = feature if isinstance(feature, ClassLabel) else getattr(feature, "feature", None)
    if not isinstance(labels, ClassLabel):
        return lambda value: value

    def name(value: object) -> object:
        return labels.names[value] if isinstance(value, int) and 0 <= value < len(labels.names) else None

    return lambda value: [name(v) for v in value] if isinstance(value, list) else name(value)


def _read_hf_dataset(path: Path, fields: tuple[Field, ...]) -> Iterator[Record]:
    """The `train` split of a DatasetDict (else its first), with ClassLabel ids read as names."""
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    _columns(path, dataset.column_names, fields)
    names = {field.name: _class_names(dataset.features[field.name]) for field in fields}
    batches = dataset.select_columns(list(names)).iter(batch_size=1000)
    rows = (dict(zip(batch, values)) for batch in batches for values in zip(*batch.values()))
    for row, item in enumerate(rows):
        yield Record(f"{path} row {row}", {field.key: names[field.name](item[field.name]) for field in fields})


def read_records(path: Path, task: str, fields: tuple[Field, ...]) -> Iterator[Record]:
    """The records of `path` in file order, with the task's two fields present (values unchecked)."""
    fmt = detect(path)
    if fmt == "conll" and task != "token_classification":
        raise DataError(f"{path}: a CoNLL file holds tagged tokens; use --task token_classification")
    readers = {
        "csv": lambda: _read_csv(path, fields, ","),
        "tsv": lambda: _read_csv(path, fields, "\t"),
        "conll": lambda: _read_conll(path),
        "jsonl": lambda: _read_jsonl(path, fields),
        "parquet": lambda: _read_parquet(path, fields),
        "hf_dataset": lambda: _read_hf_dataset(path, fields),
    }
    try:
        yield from readers[fmt]()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason}); re-encode it as UTF-8") from None
