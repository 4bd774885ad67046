"""Knowledge distillation: the student's loss is (1 - α)·task loss + α·T²·KL(teacher ‖ student) on
logits softened by temperature T (Hinton et al.), set by `distill.teacher/temperature/alpha`.

The teacher is loaded whole on every rank, in eval mode and without gradients, on the student's
device: a plain replicated module. That suits teachers that fit one device beside the student; a
teacher sharded with the engine is not supported. Its tokenizer must be the data's, and its logits
the student's shape (same label set or vocabulary), or the run stops at start.

Where the KL is taken: over the classes for sequence classification, else per token at the
positions that carry a label (next-token positions for causal LM and SFT, as their loss shifts).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.compress.models import check_tokenizer, load_model
from trainer.config import Config, ConfigError
from trainer.tasks.base import IGNORE

SHIFTED_TASKS = ("causal_lm", "sft")

Objective = Callable[[dict, object], torch.Tensor]  # (model inputs, model output) -> loss to backpropagate


def task_loss(inputs: dict, output) -> torch.Tensor:
    return output.loss


def objective(config: Config, student: torch.nn.Module, tokenizer_file: Path, device: torch.device) -> Objective:
    """The training loss: the model's own, or mixed with distillation when `distill.teacher` is set."""
    if not config.distill.teacher:
        return task_loss
    teacher, teacher_tokenizer = load_model(config.distill.teacher)
    check_tokenizer(teacher_tokenizer, tokenizer_file, f"distill.teacher {config.distill.teacher}")
    student_classes = getattr(student.config, "num_labels", None) if config.task.type == "classification" else None
    if student_classes is not None and teacher.config.num_labels != student_classes:
        raise ConfigError(f"distill.teacher {config.distill.teacher}: {teacher.config.num_labels} labels, the data has {student_classes}")
    return Distillation(teacher.to(device).requires_grad_(False), config.distill.temperature, config.distill.alpha,
                        config.task.type in SHIFTED_TASKS)


class Distillation:
    def __init__(self, teacher: torch.nn.Module, temperature: float, alpha: float, shift: bool) -> None:
        self.teacher, self.temperature, self.alpha, self.shift = teacher.eval(), temperature, alpha, shift

    def __call__(self, inputs: dict, output) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        kl = kl_loss(output.logits, teacher_logits, inputs["labels"], self.temperature, self.shift)
        return (1 - self.alpha) * output.loss + self.alpha * kl


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, shift: bool) -> torch.Tensor:
    """T²·KL(teacher ‖ student) averaged over examples (class logits [B, C]) or labelled positions ([B, L, V])."""
    if student.shape != teacher.shape:
        raise ConfigError(f"distill.teacher: logits of shape {tuple(teacher.shape)}, the student's are {tuple(student.shape)}")
    if student.dim() == 3:
        if shift:
            student, teacher, labels = student[:, :-1], teacher[:, :-1], labels[:, 1:]
        keep = labels != IGNORE
        student, teacher = student[keep], teacher[keep]
        if not len(student):  # no labelled position in this micro-batch
            return student.sum() * 0.0
    kl = F.kl_div(F.log_softmax(student.float() / temperature, -1), F.log_softmax(teacher.float() / temperature, -1),
                  log_target=True, reduction="batchmean")
    return kl * temperature**2
