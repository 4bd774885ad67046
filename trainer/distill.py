"""Knowledge distillation: the student's loss is (1 - α)·task loss + α·T²·KL(teacher ‖ student) on
logits softened by temperature T (Hinton et al.), set by `distill.teacher/temperature/alpha`.

The teacher runs in eval mode without gradients under the student's engine (`place_frozen`):
sharded across ranks under ZeRO-3 and FSDP2 (its parameters on the CPU with `engine.offload: cpu`),
replicated on each rank's device under ZeRO 0-2. So a teacher larger than one device fits wherever
the student's engine would fit it. Its tokenizer must be the data's, and its logits the student's
shape (same label set or vocabulary), or the run stops at start.

Where the KL is taken: over the classes for sequence classification, else per token at the
positions that carry a label (next-token positions for causal LM and SFT, as their loss shifts).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.model_files import check_tokenizer, load_model
from trainer.config import Config, ConfigError
from trainer.document_attention import attend_within_documents
from trainer.tasks.base import IGNORE

SHIFTED_TASKS = ("causal_lm", "sft")
log = logging.getLogger("trainer")

Objective = Callable[[dict, object], torch.Tensor]  # (model inputs, model output) -> loss to backpropagate


def task_loss(inputs: dict, output) -> torch.Tensor:
    return output.loss


def objective(config: Config, student: torch.nn.Module, tokenizer_file: Path,
              place: Callable[[torch.nn.Module], torch.nn.Module], doc_attention: bool = False) -> Objective:
    """The training loss: the model's own, or mixed with distillation when `distill.teacher` is set;
    `place` puts the teacher where the engine runs (the engine's `place_frozen`). Under document attention
    the teacher attends per document with the student's kernel (it sees the same position ids)."""
    if not config.distill.teacher:
        return task_loss
    teacher, teacher_tokenizer = load_model(config.distill.teacher)
    check_tokenizer(teacher_tokenizer, tokenizer_file, f"distill.teacher {config.distill.teacher}")
    student_classes = getattr(student.config, "num_labels", None) if config.task.type == "classification" else None
    if student_classes is not None and teacher.config.num_labels != student_classes:
        raise ConfigError(f"distill.teacher {config.distill.teacher}: {teacher.config.num_labels} labels, "
                          f"the data has {student_classes}")
    if doc_attention:
        attend_within_documents(teacher)
    parameters = teacher.num_parameters()
    teacher = place(teacher)
    log.info("distillation from %s: %s parameters, %s; temperature %g, alpha %g", config.distill.teacher, f"{parameters:,}",
             placement(teacher), config.distill.temperature, config.distill.alpha)
    return Distillation(teacher, config.distill.temperature, config.distill.alpha, config.task.type in SHIFTED_TASKS)


def placement(module: torch.nn.Module) -> str:
    """Where a placed teacher's weights are, read from the parameters themselves."""
    from torch.distributed.tensor import DTensor

    weight = next(module.parameters())
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if hasattr(weight, "ds_tensor"):  # DeepSpeed ZeRO-3: this rank holds the slice ds_tensor
        return f"sharded across {world} ranks by ZeRO-3 (slices on {weight.ds_tensor.device.type})"
    if isinstance(weight, DTensor):
        return f"sharded across {world} ranks by FSDP2 (shards on {weight.device.type})"
    return f"replicated on {weight.device}"


class Distillation:
    def __init__(self, teacher: torch.nn.Module, temperature: float, alpha: float, shift: bool) -> None:
        self.teacher, self.temperature, self.alpha, self.shift = teacher, temperature, alpha, shift

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
