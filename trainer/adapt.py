"""Make a built model trainable the way `peft` and `freeze` say, before an engine wraps it.

`peft.method`: LoRA / DoRA and prefix tuning through `peft` (the model becomes a PeftModel),
bottleneck adapters through trainer.adapters (attached in place). A classification or NER head
is new, so under LoRA it trains in full (`modules_to_save`). `freeze` then turns off gradients by
parameter name or depth for the whole run; frozen parameters stay out of the optimizer.
Gradual unfreezing is not done here but by the LR schedule (trainer.engines), because DeepSpeed
fixes the optimizer's parameter set at initialize.
"""

from __future__ import annotations

import logging
import re

import torch
from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model
from transformers.pytorch_utils import Conv1D

from trainer.adapters import add_adapters, is_adapter_parameter
from trainer.config import Config, ConfigError, FreezeConfig, PeftConfig
from trainer.models import layer_indices, task_head

log = logging.getLogger("trainer")

PEFT_TASKS = {  # peft's wrapper per task; masked LM has none of its own (plain PeftModel)
    "causal_lm": TaskType.CAUSAL_LM,
    "sft": TaskType.CAUSAL_LM,
    "classification": TaskType.SEQ_CLS,
    "token_classification": TaskType.TOKEN_CLS,
    "seq2seq": TaskType.SEQ_2_SEQ_LM,
}
LORA_LAYERS = (torch.nn.Linear, Conv1D, torch.nn.Embedding)  # what a LoRA target may name


def adapt(model: torch.nn.Module, config: Config) -> torch.nn.Module:
    """The model to hand to the engine: peft-wrapped or adapted, with frozen parameters marked."""
    model = apply_peft(model, config.peft, config.task.type)
    freeze(model, config.freeze)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("trainable parameters: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model


def apply_peft(model: torch.nn.Module, peft: PeftConfig, task: str) -> torch.nn.Module:
    """The module tree `peft.method` trains; export calls it again to rebuild that tree."""
    if peft.method == "none":
        return model
    if peft.method == "adapter":
        add_adapters(model, peft.adapter_size, peft.adapter_placement)
        _train_adapters_only(model)
        return model
    if peft.method == "prefix":
        if PEFT_TASKS.get(task) != TaskType.CAUSAL_LM:
            raise ConfigError(f"peft.method prefix: for task.type causal_lm and sft only, not {task}; use peft.method lora")
        return get_peft_model(model, PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=peft.num_virtual_tokens))
    return get_peft_model(model, _lora_config(model, peft, task))


def _lora_config(model: torch.nn.Module, peft: PeftConfig, task: str) -> LoraConfig:
    targets = peft.target_modules
    if targets != "all-linear":  # peft would read a single string as a regex: make it a name
        targets = [targets] if isinstance(targets, str) else list(targets)
        _check_targets(model, targets)
    head = task_head(model)
    return LoraConfig(
        r=peft.r, lora_alpha=peft.alpha, lora_dropout=peft.dropout, target_modules=targets, use_dora=peft.method == "dora",
        modules_to_save=[head[0]] if head else None, task_type=PEFT_TASKS.get(task),
    )


def _check_targets(model: torch.nn.Module, targets: list[str]) -> None:
    """A target that matches nothing would otherwise surface as peft's multi-line error (or not at all)."""
    layers = [name for name, module in model.named_modules() if isinstance(module, LORA_LAYERS)]
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in layers):
            leaves = sorted({name.rsplit(".", 1)[-1] for name in layers})
            raise ConfigError(
                f"peft.target_modules: '{target}' matches no linear layer of {type(model).__name__}; "
                f"its layers are named {', '.join(leaves[:12])} (or use all-linear)"
            )


def _train_adapters_only(model: torch.nn.Module) -> None:
    """Adapters, layer norms and the task head train; everything else is frozen (Houlsby et al.)."""
    head = task_head(model)
    keep = {id(p) for p in head[1].parameters()} if head else set()
    for module in model.modules():
        if "Norm" in type(module).__name__:  # LayerNorm, LlamaRMSNorm, T5LayerNorm, …
            keep |= {id(p) for p in module.parameters(recurse=False)}
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name) or id(param) in keep)


def freeze(model: torch.nn.Module, config: FreezeConfig) -> None:
    """requires_grad off for parameters matching `freeze.patterns` and for the embeddings and
    first `freeze.first_layers` blocks."""
    params = dict(model.named_parameters())
    for pattern in config.patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"freeze.patterns: '{pattern}' is not a regular expression ({err})") from None
        hits = [name for name in params if regex.search(name)]
        if not hits:
            names = list(params)
            examples = ", ".join(names[i] for i in sorted({0, len(names) // 2, len(names) - 1}))
            raise ConfigError(f"freeze.patterns: '{pattern}' matches no parameter; names look like {examples}")
        for name in hits:
            params[name].requires_grad_(False)
    if config.first_layers:
        index, layers = layer_indices(model)
        if config.first_layers > layers:
            raise ConfigError(f"freeze.first_layers {config.first_layers}: the model has {layers} layers; give at most {layers}")
        for name, layer in index.items():
            if layer <= config.first_layers:
                params[name].requires_grad_(False)
