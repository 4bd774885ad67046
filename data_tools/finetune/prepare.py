"""The `prepare-finetune` run: read and check every record, encode, split, write both splits.

Every record is checked before the tokenizer loads (a GGUF one takes seconds), so a bad line
stops the run at once. The label vocabulary comes from all records, before the split, so train
and valid manifests carry the same labels with the same ids. With `--pack` (sft) the train split's
rows hold several whole examples each, which attend to each other (see `rows`); valid stays one
example per row.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_tools.errors import DataError
from data_tools.finetune import tokenizer
from data_tools.finetune.encode import CHANNELS, Encoder, Example
from data_tools.finetune.readers import read_records
from data_tools.finetune.records import TASK_KEYS, TOO_LONG, Field, Record, check, flag, label_vocabulary
from data_tools.finetune.rows import one_per_row, pack, packing_stats
from data_tools.finetune.write import ROWS_PER_SAMPLE, clear, split, write_shards
from data_tools.manifest import Manifest

CHUNK = 1024  # records per encode batch (and progress step)


@dataclass
class Options:
    task: str
    input: str
    output: str
    tokenizer: str
    seq_len: int
    valid_fraction: float = 0.1
    seed: int = 0
    fields: dict[str, str] = field(default_factory=dict)  # canonical key → its name in the input, where not the key
    too_long: str | None = None  # sft: an example whose prompt fills seq_len; default drop
    pack: bool = False  # sft: several whole examples per train row

    def pipeline(self) -> dict:
        """The arguments that determine the output (not where it went), recorded in both manifests."""
        return {"command": "prepare-finetune", **{k: v for k, v in asdict(self).items() if k != "output"}}


def _check_options(options: Options) -> tuple[Field, ...]:
    """The task's fields, after refusing options that are out of range or meant for another task."""
    if options.task not in TASK_KEYS:
        raise DataError(f"--task {options.task}: unknown; choose one of {', '.join(TASK_KEYS)}")
    keys = TASK_KEYS[options.task]
    for key in options.fields:
        if key not in keys:
            raise DataError(f"{flag(key)} does not apply to --task {options.task}; it reads {flag(keys[0])} and {flag(keys[1])}")
    if options.seq_len < 2:
        raise DataError(f"--seq-len {options.seq_len}: must be at least 2")
    if not 0 <= options.valid_fraction < 1:
        raise DataError(f"--valid-fraction {options.valid_fraction}: must be in [0, 1)")
    if options.too_long is not None and (options.task != "sft" or options.too_long not in TOO_LONG):
        raise DataError(f"--too-long {options.too_long}: applies to --task sft only, as one of {', '.join(TOO_LONG)}")
    if options.pack and options.task != "sft":
        raise DataError(f"--pack: applies to --task sft only; --task {options.task} keeps one example per row")
    return tuple(Field(key, options.fields.get(key, key)) for key in keys)


def _label_counts(task: str, examples: list[Example], labels: list[str]) -> dict[str, int]:
    if task == "classification":
        counts = Counter(e.record["label"] for e in examples)
    elif task == "token_classification":
        counts = Counter(tag for e in examples for tag in e.record["tags"])
    else:
        return {}
    return {label: counts[label] for label in labels}


def _encode(encoder: Encoder, records: list[Record]) -> list[Example]:
    examples: list[Example] = []
    with tqdm(total=len(records), desc="encode", unit=" examples", disable=None, delay=2, dynamic_ncols=True) as bar:
        for first in range(0, len(records), CHUNK):
            chunk = records[first : first + CHUNK]
            examples += encoder(chunk)
            bar.update(len(chunk))
    return examples


def prepare(options: Options) -> dict:
    """Write OUTPUT/train and OUTPUT/valid (when valid_fraction > 0); return the run's stats."""
    fields = _check_options(options)
    path = Path(options.input)
    if not path.exists():
        raise DataError(f"--input {path}: no such file or directory")
    tokenizer.locate(options.tokenizer)
    records = [Record(r.where, check(options.task, fields, r)) for r in read_records(path, options.task, fields)]
    if not records:
        raise DataError(f"{path}: no records")
    labels = label_vocabulary(options.task, (r.values for r in records))
    if options.task == "classification" and len(labels) < 2:
        raise DataError(f"{path}: every record has label {labels[0]!r}; a classifier needs at least two labels")
    tok = tokenizer.load(options.tokenizer)
    encoder = Encoder(options.task, tok, options.seq_len, labels, options.too_long or "drop")
    examples = _encode(encoder, records)
    if not examples:
        reasons = _counts(encoder.stats()["dropped"])
        raise DataError(f"{path}: all {len(records)} examples dropped{reasons}; raise --seq-len or pass --too-long truncate")
    splits = split(examples, options.valid_fraction, options.seed)
    stats = {
        "read": len(records), "kept": len(examples), **encoder.stats(),
        "splits": {name: len(part) for name, part in splits.items()},
        "label_counts": _label_counts(options.task, examples, labels),
    }
    packed = {"train": pack(splits["train"], options.seq_len)} if options.pack else {}
    if packed:
        stats["packed"] = packing_stats(packed["train"], options.seq_len)
    out = Path(options.output)
    for name in ("train", "valid"):
        clear(out / name)
    for name, part in splits.items():
        directory = out / name
        directory.mkdir(parents=True)
        info = tok.save(directory)
        rows = packed[name] if name in packed else one_per_row(part)
        shards = write_shards(directory, rows, options.seq_len, name in packed)
        Manifest(
            options.seq_len, "int32", info, shards, name, ROWS_PER_SAMPLE, stats, options.pipeline(),
            task=options.task, labels=labels, channels=CHANNELS,
        ).save(directory)
    return stats


def _counts(counts: dict[str, int]) -> str:
    """' (reason n, …)', or nothing when there are none."""
    return f" ({', '.join(f'{k} {v}' for k, v in counts.items())})" if counts else ""


def summary(options: Options, stats: dict) -> str:
    """One line: what was read, kept (per split), dropped, truncated and why, and what packing made of train."""
    splits = ", ".join(f"{name} {n}" for name, n in stats["splits"].items())
    packed = stats.get("packed")
    packing = f", packed train {packed['examples']} into {packed['rows']} rows (fill {packed['fill']})" if packed else ""
    return (
        f"{options.task}: read {stats['read']}, kept {stats['kept']} ({splits}), dropped {sum(stats['dropped'].values())}"
        f"{_counts(stats['dropped'])}, truncated {stats['truncated']}{_counts(stats['truncated_parts'])}{packing}"
        f" → {options.output}"
    )
