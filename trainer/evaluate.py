"""One evaluation of a model: the task's own valid split, each named validation source, the downstream tasks.

The loop calls `Evaluator.evaluate(engine)` at every `train.eval_every`; `python -m trainer evaluate
--checkpoint DIR | --export DIR` runs the same code on a saved model in one process, so its numbers are
the in-loop ones of that step. Scalars are named as logged, without the `eval/` prefix:

    loss, perplexity, …            the task's metrics on a single data.valid (or a multitask run's splits)
    <source>/loss, …               each source of data.valid given as a mapping name → manifest
    <task>/acc, <task>/acc_norm    downstream tasks (trainer.downstream), from eval.tasks
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer

from data_tools.common import ConfigError
from data_tools.manifest import Manifest
from trainer import distributed
from trainer.config import Config
from trainer.document_attention import attend_within_documents
from trainer.downstream import Scorer, load_task, positions, score
from trainer.export import read_configs, resolve_checkpoint
from trainer.model_files import load_model
from trainer.tasks import Evaluation, Task, TaskContext, build_task

DOWNSTREAM_TASKS = ("causal_lm", "sft")  # decoder-only models: a continuation's log-likelihood is defined


class Evaluator:
    """`parts` are (prefix, task) pairs whose `evaluate` is called; the downstream scorers come from `config.eval`."""

    def __init__(self, config, tokenizer, eos_id: int, max_length: int, parts: list[tuple[str, Task]]) -> None:
        self.parts = parts
        tasks = [load_task(path, config.eval.max_examples) for path in config.eval.tasks]
        if tasks and config.task.type not in DOWNSTREAM_TASKS:
            raise ConfigError(f"eval.tasks: downstream tasks score a causal LM; task.type is {config.task.type}")
        names = [task.name for task in tasks]
        if clash := next((name for name in names if names.count(name) > 1 or name in {p.rstrip("/") for p, _ in parts}), None):
            raise ConfigError(f"eval.tasks: two tasks (or a task and a data.valid source) are named {clash!r}; rename a file")
        self.scorers = [Scorer(task, tokenizer, eos_id, max_length, config.eval.batch_size) for task in tasks]

    @property
    def active(self) -> bool:
        return bool(self.parts or self.scorers)

    def evaluate(self, engine) -> Evaluation:
        """Collective: every rank calls it; the scalars are the same on every rank."""
        scalars, texts = {}, {}
        for prefix, task in self.parts:
            evaluation = task.evaluate(engine)
            scalars.update({prefix + name: value for name, value in evaluation.scalars.items()})
            texts.update({prefix + name: text for name, text in evaluation.texts.items()})
        if self.scorers:
            scalars.update(score(self.scorers, engine.forward, engine.data_rank, engine.data_world, engine.data_leader))
        return Evaluation(scalars, texts)

    def close(self) -> None:
        """Close the per-source tasks built here (the run's own task is closed by the loop)."""
        for prefix, task in self.parts:
            if prefix:
                task.close()


def validation_parts(task: Task, ctx: TaskContext, named_valid: dict[str, Manifest]) -> list[tuple[str, Task]]:
    """The run's task on its own valid split (when it has one), and a task of the same kind per named source."""
    own = [("", task)] if ctx.valid is not None or any(ctx.source_valid) else []
    return own + [(f"{name}/", build_task(dataclasses.replace(ctx, valid=manifest))) for name, manifest in named_valid.items()]


class LoadedModel:
    """A model read from disk behind the part of the engine interface evaluation uses: one process, no sharding."""

    data_rank, data_world, data_leader = 0, 1, True

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = model

    def forward(self, **inputs: torch.Tensor):
        return self.module(**inputs)


def evaluate_saved(path: str | Path, checkpoint: bool, tasks: list[str] | None, max_examples: int | None) -> dict[str, float]:
    """The scalars of the evaluation a run logs (`eval/…`), for a checkpoint (its run's valid sources and
    eval.tasks, unless `tasks` replaces them) or an export (downstream `tasks` only)."""
    path = resolve_checkpoint(path) if checkpoint else Path(path)
    model, tokenizer_file = load_model(path)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    config = read_configs(path)[1] if checkpoint else Config()
    if tasks is not None:
        config.eval.tasks = tasks
    if max_examples is not None:
        config.eval.max_examples = max_examples
    parts: list[tuple[str, Task]] = []
    if checkpoint and config.data.has_valid():
        parts = _run_parts(config, tokenizer, model)
    evaluator = Evaluator(config, tokenizer, model.config.eos_token_id, positions(model.config), parts)
    if not evaluator.active:
        raise ConfigError(f"evaluate {path}: nothing to score; give --tasks FILE (and, for a checkpoint, a run with data.valid)")
    try:
        with torch.no_grad():
            return {f"eval/{name}": value for name, value in evaluator.evaluate(LoadedModel(model)).scalars.items()}
    finally:
        evaluator.close()
        for prefix, task in parts:
            if not prefix:
                task.close()


def _run_parts(config, tokenizer, model) -> list[tuple[str, Task]]:
    """The validation parts of the run that wrote a checkpoint, read from its data paths, in a one-process group."""
    from trainer.loop import read_manifests, task_context  # the loop imports this module

    distributed.init(config.train.collective_timeout_s)
    manifests = read_manifests(config)
    ctx = task_context(config, manifests, tokenizer, model)
    if ctx.doc_attention:
        attend_within_documents(model)
    return validation_parts(build_task(ctx), ctx, manifests.named_valid)


def main(args) -> int:
    scalars = evaluate_saved(args.checkpoint or args.export, bool(args.checkpoint), args.tasks, args.max_examples)
    print(json.dumps({k: v if math.isfinite(v) else None for k, v in scalars.items()}, indent=1))
    return 0
