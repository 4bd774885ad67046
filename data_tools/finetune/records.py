"""What each finetuning task reads from a record, the checks on it, and the label vocabulary.

A task reads two fields, each known by a canonical key (text/label, tokens/tags, prompt/response,
source/target) and named in the input by a `--<key>-field` option. Values are checked here, once
for every input format, and a bad one stops the run with the file and line (or row) to fix: an
example dropped without a word would silently change what the model learns.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from data_tools.errors import DataError

TASK_KEYS = {
    "classification": ("text", "label"),
    "token_classification": ("tokens", "tags"),
    "sft": ("prompt", "response"),
    "seq2seq": ("source", "target"),
}
FIELD_KEYS = tuple(key for keys in TASK_KEYS.values() for key in keys)
TOO_LONG = ("drop", "truncate")  # sft: what becomes of an example whose prompt fills the row
OUTSIDE = "O"
BIO_TAG = re.compile(r"[BI]-(.+)")


def flag(key: str) -> str:
    """The option that names `key`'s field in the input, e.g. --label-field."""
    return f"--{key}-field"


@dataclass(frozen=True)
class Field:
    key: str  # canonical: what the encoder reads and the shard records hold
    name: str  # the column or JSON field in the input


@dataclass
class Record:
    where: str  # "file line N" or "file row N", for messages
    values: dict  # canonical key → value as read


def _text(where: str, field: Field, value: object) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field.name!r} is {type(value).__name__}, expected text")
    if not value.strip():
        raise DataError(f"{where}: empty {field.name!r}; fill it in or remove the row")
    return value


def _label(where: str, field: Field, value: object) -> str:
    """Labels are strings in the vocabulary; integer or boolean labels are kept as their text."""
    if isinstance(value, (bool, int)):
        return str(value)
    return _text(where, field, value).strip()


def _words(where: str, field: Field, value: object) -> list[str]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field.name!r} must be a non-empty list of strings, got {value!r:.60}")
    for index, word in enumerate(value):
        if not isinstance(word, str) or not word.strip():
            raise DataError(f"{where}: {field.name!r} item {index} is {word!r:.40}, expected a non-empty string")
    return value


def _tagged(where: str, fields: tuple[Field, Field], tokens: object, tags: object) -> tuple[list[str], list[str]]:
    tokens, tags = _words(where, fields[0], tokens), _words(where, fields[1], tags)
    if len(tokens) != len(tags):
        raise DataError(f"{where}: {len(tokens)} {fields[0].name!r} but {len(tags)} {fields[1].name!r}; each word needs one tag")
    for index, tag in enumerate(tags):
        if tag != OUTSIDE and not BIO_TAG.fullmatch(tag):
            raise DataError(f"{where}: word {index} {tokens[index]!r} has tag {tag!r}; BIO tags are O, B-<type> or I-<type>")
    return tokens, tags


def check(task: str, fields: tuple[Field, Field], record: Record) -> dict:
    """The record's two values, checked and keyed canonically (what the shards' records hold)."""
    first, second = (record.values[f.key] for f in fields)
    if task == "token_classification":
        first, second = _tagged(record.where, fields, first, second)
    elif task == "classification":
        first, second = _text(record.where, fields[0], first), _label(record.where, fields[1], second)
    else:
        first, second = _text(record.where, fields[0], first), _text(record.where, fields[1], second)
    return {fields[0].key: first, fields[1].key: second}


def label_vocabulary(task: str, values: Iterable[dict]) -> list[str]:
    """Sorted labels (numerically when all are integers); for NER `O` first, then B- and I- of every type seen."""
    if task == "classification":
        labels = {v["label"] for v in values}
        numeric = all(re.fullmatch(r"-?\d+", label) for label in labels)
        return sorted(labels, key=int if numeric else None)
    if task == "token_classification":
        types = {BIO_TAG.fullmatch(tag).group(1) for v in values for tag in v["tags"] if tag != OUTSIDE}
        return [OUTSIDE, *sorted(f"{prefix}-{kind}" for kind in types for prefix in "BI")]
    return []
