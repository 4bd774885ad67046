"""Zero-shot downstream tasks scored by log-likelihood, as lm-evaluation-harness scores them.

A task is a local JSONL file, one example per line, of one of two kinds (README, "Downstream evaluation"):

    {"context": "The capital of France is", "choices": [" Paris.", " Rome."], "label": 0}    multiple choice
    {"context": "He handed the keys to his", "target": " brother"}                          cloze / last word

Each (context, continuation) pair is tokenized as lm-eval's `_encode_pair` does (trailing spaces of the
context move to the continuation; the pair is encoded whole and split at the context's length) and
scored by the summed log-probability of the continuation tokens. Multiple choice: `acc` (the most likely
choice is the label) and `acc_norm` (log-likelihood divided by the choice's length in characters, lm-eval's
`len(choice)`). Cloze: `acc` (every target token is the greedy argmax) and `perplexity`
(exp of minus the mean per-example log-likelihood, lm-eval's `perplexity` aggregation).

Why the batches are fixed: examples are grouped into batches in file order, the same groups at any world
size, and batch b runs on data rank b mod W. An example's scores come from a forward of the same shape
whatever the world size, and the per-example results are gathered and summed in file order on every rank,
so a score does not depend on the number of ranks (and `python -m trainer evaluate` gives the in-loop one).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data_tools.common import DataError
from trainer import distributed
from trainer.tasks.base import gather

DEFAULT_POSITIONS = 2048  # lm-eval's max_length when the model config names none


@dataclass
class Example:
    context: str
    continuations: list[str]  # the choices, or the one cloze target
    label: int  # the right choice; 0 for cloze


@dataclass
class DownstreamTask:
    name: str  # the file's stem: eval/<name>/acc
    kind: str  # "choice" or "cloze"
    examples: list[Example]


def load_task(path: str | Path, max_examples: int | None = None) -> DownstreamTask:
    """The examples of a task file (the first `max_examples` of them), checked line by line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"eval.tasks {path}: no such file; give a JSONL task file (README, Training: Evaluation)")
    examples, kinds = [], set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if max_examples is not None and len(examples) == max_examples:
                break
            kind, example = _parse(line, f"{path}:{number}")
            kinds.add(kind)
            examples.append(example)
    if not examples:
        raise DataError(f"{path}: no examples; each line is a JSON object with context and choices/label or target")
    if len(kinds) > 1:
        raise DataError(f"{path}: mixes multiple-choice (choices/label) and cloze (target) lines; one kind per file")
    return DownstreamTask(path.stem, kinds.pop(), examples)


def _parse(line: str, where: str) -> tuple[str, Example]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("context"), str) or not record["context"].strip():
        raise DataError(f"{where}: needs a non-empty string 'context'")
    if "target" in record:
        if not isinstance(record["target"], str) or not record["target"].strip():
            raise DataError(f"{where}: 'target' must be a non-empty string")
        return "cloze", Example(record["context"], [record["target"]], 0)
    choices, label = record.get("choices"), record.get("label")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
        raise DataError(f"{where}: needs 'target' (cloze) or 'choices', a list of two or more non-empty strings")
    if not (isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(choices)):
        raise DataError(f"{where}: 'label' must be the index of the right choice, 0..{len(choices) - 1}, got {label!r}")
    return "choice", Example(record["context"], choices, label)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for causal models: (context ids, continuation ids)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
    context_ids = tokenizer.encode(context, add_special_tokens=False).ids
    return context_ids, whole[len(context_ids):]


def positions(model_config) -> int:
    """The longest input the model takes, as lm-eval reads it from the config."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(model_config, key, None), int):
            return getattr(model_config, key)
    return DEFAULT_POSITIONS


class Scorer:
    """One task's examples, tokenized once and grouped into the fixed batches the module docstring explains."""

    def __init__(self, task: DownstreamTask, tokenizer, eos_id: int, max_length: int, batch_size: int) -> None:
        self.task, self.eos_id = task, eos_id
        # per example, per continuation: (context + continuation ids, the last max_length + 1 of them; continuation length)
        self.requests = [[_request(tokenizer, ex.context, c, max_length) for c in ex.continuations] for ex in task.examples]
        self.batches: list[list[int]] = [[]]  # example indices; an example's continuations never split
        for index, requests in enumerate(self.requests):
            if self.batches[-1] and sum(len(self.requests[i]) for i in self.batches[-1]) + len(requests) > batch_size:
                self.batches.append([])
            self.batches[-1].append(index)

    @torch.no_grad()
    def local_results(self, forward, rank: int, world: int, leader: bool = True) -> list[tuple[int, list[float], bool]]:
        """(example index, log-likelihood per continuation, all tokens greedy) for this data rank's batches.

        Every rank runs the same number of forwards (a sharded model's forward is collective): the last
        round is padded with batch 0, whose results are dropped. `leader` false (a tensor-parallel peer that
        computes the same rows) returns nothing, so each example is counted once."""
        results = []
        for b in range(rank, math.ceil(len(self.batches) / world) * world, world):
            examples = self.batches[b] if b < len(self.batches) else self.batches[0]
            scored = self._score_batch(forward, [r for i in examples for r in self.requests[i]])
            if b >= len(self.batches) or not leader:
                continue
            for i in examples:
                mine, scored = scored[: len(self.requests[i])], scored[len(self.requests[i]) :]
                results.append((i, [ll for ll, _ in mine], all(greedy for _, greedy in mine)))
        return results

    def _score_batch(self, forward, requests: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each request, in one right-padded forward (causal: padding after a
        sequence does not change its logits)."""
        width = max(len(ids) - 1 for ids, _ in requests)
        inputs = [ids[:-1] + [self.eos_id] * (width - len(ids) + 1) for ids, _ in requests]
        logits = forward(input_ids=torch.tensor(inputs, device=distributed.device())).logits
        logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits  # vocab-parallel under tp
        out = []
        for row, (ids, n) in enumerate(requests):
            # position p predicts token p + 1: the n continuation tokens from the n positions before the input's end
            length = len(ids) - 1
            log_probs = torch.log_softmax(logits[row, length - n : length].float(), dim=-1)
            target = torch.tensor(ids[-n:], device=log_probs.device)
            out.append((float(log_probs.gather(1, target[:, None]).double().sum()),
                        bool((log_probs.argmax(-1) == target).all())))
        return out

    def metrics(self, results: list[tuple[int, list[float], bool]]) -> dict[str, float]:
        """The task's scalars from every example's results, summed in file order."""
        results = sorted(results)
        if self.task.kind == "cloze":
            mean_ll = sum(lls[0] for _, lls, _ in results) / len(results)
            return {"acc": sum(greedy for *_, greedy in results) / len(results), "perplexity": math.exp(min(-mean_ll, 50))}
        hits = hits_norm = 0
        for i, lls, _ in results:
            example = self.task.examples[i]
            lengths = np.array([float(len(c)) for c in example.continuations])
            hits += int(np.argmax(lls)) == example.label
            hits_norm += int(np.argmax(np.array(lls) / lengths)) == example.label
        return {"acc": hits / len(results), "acc_norm": hits_norm / len(results)}


def _request(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """(the scored sequence, its continuation length): lm-eval keeps the last max_length + 1 tokens of the pair."""
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    if not continuation_ids:
        raise DataError(f"continuation {continuation!r} after {context[-40:]!r} encodes to no tokens")
    ids = (context_ids + continuation_ids)[-(max_length + 1) :]
    return ids, min(len(continuation_ids), len(ids) - 1)  # a continuation longer than the model's input is cut too


def score(scorers: list[Scorer], forward, rank: int, world: int, leader: bool = True) -> dict[str, float]:
    """Every task's scalars (`<task>/acc`, …), identical on every rank: each rank scores its batches, the
    per-example results of all ranks are gathered and each task's metrics computed from all of them."""
    local = [scorer.local_results(forward, rank, world, leader) for scorer in scorers]
    every = gather([local]) if distributed.dist.is_initialized() else [local]
    scalars = {}
    for t, scorer in enumerate(scorers):
        results = [result for part in every for result in part[t]]
        scalars.update({f"{scorer.task.name}/{k}": v for k, v in scorer.metrics(results).items()})
    return scalars
