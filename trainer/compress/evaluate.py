"""`python -m trainer evaluate MODEL --data VALID_DIR`: task metrics, size on disk, parameters, CPU latency.

Metrics come from the task code the trainer evaluates with (classification: accuracy and macro-F1
from ClassificationMeter; other data: mean token loss), computed in this one process. Packed rows
are scored as training read them: per document (positions restart, no attention across a document
start, a document's first token no target) when the shards record document starts, unless the
checkpoint's run set data.doc_attention false (an export keeps no run config: the default, on). Size counts
the weight files only (the tokenizer is the same for every variant of a model). Latency is the
median wall time of single-example forwards on the CPU, as a request-at-a-time server sees it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_tools.manifest import Manifest, iter_blocks, load_manifest
from trainer.config import Config
from trainer.data import LanesLoader, Source
from trainer.document_attention import attend_within_documents
from trainer.export import read_configs
from trainer.model_files import check_tokenizer, load_model, model_dir
from trainer.tasks import doc_attention
from trainer.tasks.base import LossMeter, encoder_inputs
from trainer.tasks.causal_lm import document_inputs
from trainer.tasks.classification import ClassificationMeter, scores

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
CAUSAL_TASKS = (None, "sft")  # packed LM tokens and SFT rows train decoder-only models: predict the next token


@dataclass
class Report:
    metrics: dict[str, float]
    size_bytes: int
    parameters: int
    latency_ms: float | None  # None without data to time

    def row(self) -> dict[str, str]:
        latency = "-" if self.latency_ms is None else f"{self.latency_ms:.2f}"
        metrics = {name: f"{value:.4f}" for name, value in self.metrics.items()}
        sizes = {"size_MB": f"{self.size_bytes / 1e6:.1f}", "params_M": f"{self.parameters / 1e6:.2f}"}
        return {**metrics, **sizes, "latency_ms": latency}


def evaluate(path: str | Path, data: str | Path | None, batch_size: int = 32, latency_samples: int = 32) -> Report:
    """Score the model at `path` on the split at `data` (size and parameters only without data)."""
    model, tokenizer = load_model(path)
    size, parameters = size_on_disk(model_dir(path)), parameter_count(model)
    if data is None:
        return Report({}, size, parameters, None)
    manifest = load_manifest(Path(data))
    check_tokenizer(tokenizer, Path(data) / manifest.tokenizer.path, f"evaluate {path}")
    per_document = manifest.task is None and doc_attention(run_config(path), [manifest])
    if per_document:
        attend_within_documents(model)
    rows = read_rows(manifest, per_document)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else manifest.tokenizer.eos_id
    metrics = task_metrics(model, manifest, rows, pad_id, batch_size)
    return Report(metrics, size, parameters, latency_ms(model, manifest, rows[:latency_samples], pad_id))


def run_config(path: str | Path) -> Config:
    """The run config of a checkpoint; the defaults for a model saved without one."""
    directory = model_dir(path)
    return read_configs(directory)[1] if (directory / "COMPLETE").exists() else Config()


def read_rows(manifest: Manifest, per_document: bool) -> np.ndarray:
    """Every row of the split: [rows, seq_len] (finetuning rows [rows, channels, seq_len]), or with `per_document`
    [rows, 2, seq_len] tokens and document positions, read by the trainer's loader (one lane, so each row once)."""
    if not per_document:
        blocks = [rows for shard in manifest.shards for rows, _ in iter_blocks(manifest.shard_path(shard))]
        return np.concatenate(blocks).astype(np.int64)
    with LanesLoader([Source(manifest)], global_batch=1, lanes=1, seed=0, rank=0, world_size=1, doc_positions=True) as loader:
        batches = loader.batches(0)
        return np.concatenate([next(batches) for _ in range(sum(shard.rows for shard in manifest.shards))]).astype(np.int64)


def model_inputs(manifest: Manifest, rows: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """The inputs the trainer's tasks build from these rows, labels included."""
    if manifest.task is None:  # packed LM rows: every token is a target, or every token but a document's first
        return document_inputs(rows) if rows.dim() == 3 else {"input_ids": rows, "labels": rows}
    inputs = encoder_inputs(rows[:, 0], pad_id)
    if manifest.task == "classification":
        return {**inputs, "labels": rows[:, 1, 0]}
    return {**inputs, "labels": rows[:, 1, : inputs["input_ids"].shape[1]]}


@torch.no_grad()
def task_metrics(model: torch.nn.Module, manifest: Manifest, rows: np.ndarray, pad_id: int, batch_size: int) -> dict[str, float]:
    classification = manifest.task == "classification"
    meter = ClassificationMeter(manifest.labels) if classification else LossMeter(shift=manifest.task in CAUSAL_TASKS)
    for first in range(0, len(rows), batch_size):
        inputs = model_inputs(manifest, torch.from_numpy(rows[first : first + batch_size]), pad_id)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        real = np.ones(len(labels), dtype=bool)
        meter.add(logits, labels, real)
    if classification:  # scores() of the meter's own confusion matrix: one process, nothing to all-reduce
        return {"loss": meter.loss.total / max(meter.loss.count, 1), **scores(meter.confusion)}
    loss = meter.total / max(meter.count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def latency_ms(model: torch.nn.Module, manifest: Manifest, rows: np.ndarray, pad_id: int) -> float:
    """Median milliseconds per single-example forward, after one warm-up forward."""
    times = []
    for i in range(-1, len(rows)):
        inputs = model_inputs(manifest, torch.from_numpy(rows[max(i, 0) : max(i, 0) + 1]), pad_id)
        inputs.pop("labels")
        started = time.perf_counter()
        model(**inputs)
        if i >= 0:
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def size_on_disk(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.suffix in WEIGHT_SUFFIXES and f.is_file())


def parameter_count(model: torch.nn.Module) -> int:
    """Weight elements (a quantized weight counts its elements, not its bytes: size_on_disk tells those)."""
    return sum(p.numel() for p in model.parameters())


def table(reports: dict[str, Report]) -> str:
    """A plain-text table, one row per named report, columns the union of their fields."""
    rows = {name: report.row() for name, report in reports.items()}
    columns = list(dict.fromkeys(key for row in rows.values() for key in row))
    widths = {c: max(len(c), *(len(row.get(c, "-")) for row in rows.values())) for c in columns}
    name_width = max(len("model"), *(len(n) for n in rows))
    lines = ["  ".join(["model".ljust(name_width), *(c.rjust(widths[c]) for c in columns)])]
    for name, row in rows.items():
        lines.append("  ".join([name.ljust(name_width), *(row.get(c, "-").rjust(widths[c]) for c in columns)]))
    return "\n".join(lines)
