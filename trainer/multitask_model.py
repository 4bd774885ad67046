"""Multi-task finetuning: one shared BERT encoder, one head per `data.train` source.

Each source is a prepare-finetune split of task classification or token_classification with its own
labels; the lanes mixture decides how many of a batch's rows each source gives (trainer.data), and
`source_ids` tell the model which head a row belongs to. Every head runs on every row (heads are
one linear layer each) and only a row's own head counts in the loss: each parameter then gets a
gradient in every micro-batch on every rank, which FSDP2's reduce-scatter and ZeRO's gradient
partitions need to stay in step across ranks.

The heads are laid out as BERT's own task models lay them out (dropout, then a linear `classifier`
on the pooled [CLS] output or on every token), so each task exports as a standalone
BertForSequenceClassification / BertForTokenClassification with the shared encoder's weights.
The head list lives in the encoder config (`multitask_heads`), so a checkpoint's hf_config.json
is enough to rebuild the model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    PretrainedConfig,
    PreTrainedModel,
)

from data_tools.manifest import Manifest
from trainer.config import Config, ConfigError
from trainer.tasks.base import IGNORE

HEAD_TASKS = {"classification": AutoModelForSequenceClassification, "token_classification": AutoModelForTokenClassification}
ENCODERS = ("bert",)  # model types whose task models put a plain `classifier` on the pooled output / the tokens


@dataclass(frozen=True)
class Head:
    name: str  # the source's name: metrics are eval/<name>/…, the export <run>/export/<name>/
    task: str  # classification or token_classification, from the source's manifest
    labels: list[str]


def heads(config: Config, sources: Sequence[Manifest]) -> list[Head]:
    """One head per data.train source, in source order (a row's source index is its head's index)."""
    return [Head(source.name, manifest.task, list(manifest.labels))
            for source, manifest in zip(config.data.train_sources(), sources, strict=True)]


def head_targets(task: str, labels: torch.Tensor) -> torch.Tensor:
    """The targets a head scores from the targets channel: classification's label sits at position 0."""
    return labels[:, 0] if task == "classification" else labels


@dataclass
class MultiTaskOutput:
    """`heads`: each head's logits for every row. `logits`: all of them flattened into one tensor that
    depends on every parameter (what the loop's zero-gradient path for a non-finite loss sums)."""

    loss: torch.Tensor | None
    logits: torch.Tensor
    heads: dict[str, torch.Tensor]


class MultiTaskModel(torch.nn.Module):
    """A shared encoder and a `classifier` ModuleDict of per-task linear heads; `config` is the encoder's."""

    def __init__(self, encoder: PreTrainedModel, task_heads: list[Head]) -> None:
        super().__init__()
        config = encoder.config
        if config.model_type not in ENCODERS:
            raise ConfigError(f"model: task.type multitask needs a BERT encoder (model.arch bert or a BERT model.pretrained), "
                              f"got {config.model_type}")
        self.encoder, self.task_heads, self.config = encoder, task_heads, config
        config.multitask_heads = [asdict(head) for head in task_heads]
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.ModuleDict(
            {head.name: torch.nn.Linear(config.hidden_size, len(head.labels)) for head in task_heads})
        for layer in self.classifier.values():  # as BERT initialises its task heads
            torch.nn.init.normal_(layer.weight, std=config.initializer_range)
            torch.nn.init.zeros_(layer.bias)

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> MultiTaskModel:
        """The model a checkpoint's hf_config.json describes, freshly initialised (export builds it on the meta device)."""
        return cls(AutoModel.from_config(config), [Head(**head) for head in config.multitask_heads])

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.encoder.get_input_embeddings()

    def tie_weights(self) -> None:
        """Export re-ties weights after loading; BERT's encoder ties none, but its config decides."""
        self.encoder.tie_weights()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                source_ids: torch.Tensor | None = None) -> MultiTaskOutput:
        """`labels`: the targets channel [rows, tokens]; `source_ids`: each row's head index (needed with labels)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        features = {"classification": hidden.pooler_output, "token_classification": hidden.last_hidden_state}
        logits = {head.name: self.classifier[head.name](self.dropout(features[head.task])) for head in self.task_heads}
        loss = None if labels is None else self.loss(logits, labels, source_ids)
        return MultiTaskOutput(loss, torch.cat([value.flatten() for value in logits.values()]), logits)

    def loss(self, logits: dict[str, torch.Tensor], labels: torch.Tensor, source_ids: torch.Tensor) -> torch.Tensor:
        """Each task's mean cross-entropy over its own rows, weighted by its share of the micro-batch's rows:
        the gradient of a batch then follows the lane weights. A head without rows adds an exact zero."""
        total = torch.zeros((), device=labels.device)
        for index, head in enumerate(self.task_heads):
            rows = source_ids == index
            targets = head_targets(head.task, labels[rows])
            summed = torch.nn.functional.cross_entropy(logits[head.name][rows].flatten(0, -2).float(), targets.flatten(),
                                                       ignore_index=IGNORE, reduction="sum")
            total = total + summed / (targets != IGNORE).sum().clamp(min=1) * rows.sum() / len(rows)
        return total


def standalone(model: MultiTaskModel, head: Head) -> PreTrainedModel:
    """One task as a plain Hugging Face model: the shared encoder's weights and this head's, its labels named.
    A token-classification model has no pooler, so the encoder's is left out of it."""
    config = copy.deepcopy(model.config)
    del config.multitask_heads
    config.architectures = None
    config.num_labels, config.id2label = len(head.labels), dict(enumerate(head.labels))
    config.label2id = {label: i for i, label in enumerate(head.labels)}
    task_model = HEAD_TASKS[head.task].from_config(config)  # not on meta: its non-persistent buffers must be real
    prefix = task_model.base_model_prefix
    wanted = task_model.state_dict().keys()
    state = {f"{prefix}.{key}": value for key, value in model.encoder.state_dict().items() if f"{prefix}.{key}" in wanted}
    state.update({f"classifier.{key}": value for key, value in model.classifier[head.name].state_dict().items()})
    task_model.load_state_dict(state, strict=True)
    return task_model
