"""Export a checkpoint as a Hugging Face `save_pretrained` directory with its tokenizer.

Works offline in one process for every engine: ZeRO 1–3 shards are consolidated with DeepSpeed's
`zero_to_fp32`, a ZeRO-0 checkpoint already holds the full module state, and an FSDP2 (DCP)
checkpoint is read whole by DCP without a process group.

The model is rebuilt from hf_config.json (its `architectures` name the task's class) and, for a
peft run, wrapped again as the run config in trainer_state.json says, so the checkpoint's names
match. What is written then depends on `peft.method`:

    none, or lora/dora with merge_on_export    out/ is a plain model (the low-rank update folded in)
    lora/dora without merging, prefix          out/ is the base model, out/adapter/ the peft adapter
                                               (`PeftModel.from_pretrained(base, out / "adapter")`)
    adapter                                    out/ is the base model plus bottleneck_adapters.*
                                               (`trainer.adapters.load_adapters(base, out)`); they
                                               cannot merge, a nonlinearity sits between

A multi-task run (trainer.multitask_model) exports one standalone model per task, out/<name>/, each with
the shared encoder, its own head and labels, and the tokenizer.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from transformers import AutoConfig, PreTrainedTokenizerFast

from data_tools.common import CheckpointError, from_dict
from trainer.adapt import apply_peft
from trainer.adapters import is_adapter_parameter, save_adapters
from trainer.checkpoint import Checkpoints
from trainer.config import Config
from trainer.models import base_model, model_class
from trainer.multitask_model import MultiTaskModel, standalone

log = logging.getLogger("trainer")


def consolidated_state_dict(checkpoint: Path, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint, whatever engine and world size wrote it, named as the
    module the engine trained. FSDP2 reads into a template of that module: `model` (weights may
    be on the meta device), else the checkpoint's own rebuilt."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if state["engine"] == "fsdp2":
        import torch.distributed.checkpoint as dcp

        from trainer.engines.fsdp2_engine import verify_dcp

        verify_dcp(checkpoint / "dcp")  # DCP unpickles its metadata and non-tensor items in full
        model = model if model is not None else rebuild(*read_configs(checkpoint))
        weights = {"model": {k: torch.empty(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(weights, checkpoint_id=str(checkpoint / "dcp"), no_dist=True)
        return weights["model"]
    from trainer.engines.deepspeed_engine import verify_torch_files

    verify_torch_files(checkpoint)  # zero_to_fp32 reads with weights_only=False
    if state["zero_stage"] == 0:
        return _module_state(checkpoint)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per file it reads
        weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    if state["zero_stage"] == 1:  # ZeRO-1 shards leave out frozen parameters; its full module state has them
        for key, value in _module_state(checkpoint).items():
            weights.setdefault(key, value.float() if value.is_floating_point() else value)
    return weights


def _module_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The module state a DeepSpeed checkpoint keeps beside the shards (complete below ZeRO-3)."""
    files = sorted(checkpoint.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise CheckpointError(f"{checkpoint}: no mp_rank_*_model_states.pt; the checkpoint is incomplete")
    from trainer.engines.deepspeed_engine import safe_globals

    with safe_globals():
        return torch.load(files[0], map_location="cpu", weights_only=True)["module"]


def read_configs(checkpoint: Path) -> tuple[dict, Config]:
    """(hf_config.json, the run config in trainer_state.json) of a checkpoint."""
    hf_config = json.loads((checkpoint / "hf_config.json").read_text())
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return hf_config, from_dict(Config, state.get("config", {}), where=f"{checkpoint / 'trainer_state.json'} config")


def rebuild(hf_config: dict, config: Config) -> torch.nn.Module:
    """The module tree the run trained, parameters on the meta device: the class `architectures` names
    (checkpoints from before it was recorded: the task's auto class), peft applied again (outside
    the meta context: prefix tuning keeps a plain tensor of token ids that no checkpoint restores).
    Buffers are built for real: a non-persistent one (rotary `inv_freq`) is in no checkpoint, and a
    model that runs (`evaluate --checkpoint`, a distillation teacher) needs it."""
    model_config = AutoConfig.for_model(**hf_config)
    name = (model_config.architectures or [""])[0]
    with init_empty_weights(include_buffers=False):
        if config.task.type == "multitask":
            return MultiTaskModel.from_config(model_config)  # peft is refused for multitask runs
        if hasattr(transformers, name):
            model = getattr(transformers, name)._from_config(model_config)
        else:
            model = model_class(config).from_config(model_config)
    return apply_peft(model, config.peft, config.task.type)


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Put a consolidated state dict into a rebuilt model; tied weights are re-tied, anything
    else left unfilled (or left over) is refused."""
    unexpected = model.load_state_dict(state, strict=False, assign=True).unexpected_keys
    base_model(model).tie_weights()
    missing = [k for k, v in model.state_dict().items() if v.is_meta]
    if missing or unexpected:
        raise CheckpointError(f"{where}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The complete checkpoint directory `checkpoint` names: a step_N directory, or a checkpoints/ directory
    (or its `latest` file) standing for the newest one."""
    checkpoint = Path(checkpoint)
    if checkpoint.name == "latest" or (checkpoint / "latest").exists():
        root = checkpoint.parent if checkpoint.name == "latest" else checkpoint
        checkpoint = root / Checkpoints(root).latest()
    if not (checkpoint / "COMPLETE").exists():
        raise CheckpointError(f"{checkpoint}: not a complete checkpoint (no COMPLETE marker)")
    return checkpoint


def export(checkpoint: str | Path, out: str | Path) -> Path:
    checkpoint, out = resolve_checkpoint(checkpoint), Path(out)
    hf_config, config = read_configs(checkpoint)
    model = rebuild(hf_config, config)
    load_weights(model, consolidated_state_dict(checkpoint, model), checkpoint)
    for target, task_model in task_models(model, out):
        save_model(task_model, config, target)
        save_tokenizer(checkpoint, hf_config, target)
    return out


def task_models(model: torch.nn.Module, out: Path) -> list[tuple[Path, torch.nn.Module]]:
    """(directory, model) to write: out/<name>/ per task of a multi-task model, else the model itself in out/."""
    if isinstance(model, MultiTaskModel):
        return [(out / head.name, standalone(model, head)) for head in model.task_heads]
    return [(out, model)]


def save_model(model: torch.nn.Module, config: Config, out: Path) -> None:
    """Write `model` as the module docstring's table says for `peft.method`."""
    peft = config.peft
    out.mkdir(parents=True, exist_ok=True)
    if peft.method in ("lora", "dora") and peft.merge_on_export:
        model = model.merge_and_unload()
    elif peft.method in ("lora", "dora", "prefix"):
        model.save_pretrained(out / "adapter")
        model = model.unload() if peft.method != "prefix" else model.get_base_model()
        log.info("%s: base model; the %s adapter is in %s (PeftModel.from_pretrained)", out, peft.method, out / "adapter")
    elif peft.method == "adapter":
        save_adapters(model, peft.adapter_size, peft.adapter_placement, out)
        base = {k: v for k, v in model.state_dict().items() if not is_adapter_parameter(k)}
        model.save_pretrained(out, state_dict=base)
        log.info("%s: base model plus bottleneck adapters (trainer.adapters.load_adapters)", out)
        return
    model.save_pretrained(out)


def save_tokenizer(checkpoint: Path, hf_config: dict, out: Path) -> None:
    """The checkpoint's tokenizer.json, with its tokenizer_config.json (chat template) when the
    run had one, and the model's EOS and pad tokens named."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    for role in ("eos", "pad"):
        token_id = hf_config.get(f"{role}_token_id")
        if isinstance(token_id, int) and getattr(tokenizer, f"{role}_token") is None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.save_pretrained(out)
