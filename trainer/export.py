"""Export a checkpoint as a Hugging Face `save_pretrained` directory with its tokenizer.

Works offline in one process for every engine: ZeRO 1–3 shards are consolidated with DeepSpeed's
`zero_to_fp32`, a ZeRO-0 checkpoint already holds the full module state, and an FSDP2 (DCP)
checkpoint is read whole by DCP without a process group.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from trainer.checkpoint import Checkpoints
from trainer.config import ConfigError


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint, whatever engine and world size wrote it."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if state["engine"] == "fsdp2":
        import torch.distributed.checkpoint as dcp

        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**json.loads((checkpoint / "hf_config.json").read_text())))
        weights = {"model": model.state_dict()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(weights, checkpoint_id=str(checkpoint / "dcp"), no_dist=True)
        return weights["model"]
    if state["zero_stage"] == 0:
        files = sorted(checkpoint.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise ConfigError(f"{checkpoint}: no mp_rank_*_model_states.pt; the checkpoint is incomplete")
        return torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per file it reads
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def export(checkpoint: str | Path, out: str | Path) -> Path:
    checkpoint, out = Path(checkpoint), Path(out)
    if checkpoint.name == "latest" or (checkpoint / "latest").exists():
        root = checkpoint.parent if checkpoint.name == "latest" else checkpoint
        checkpoint = root / Checkpoints(root).latest()
    if not (checkpoint / "COMPLETE").exists():
        raise ConfigError(f"{checkpoint}: not a complete checkpoint (no COMPLETE marker)")
    hf_config = json.loads((checkpoint / "hf_config.json").read_text())
    config = AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = consolidated_state_dict(checkpoint)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ConfigError(f"{checkpoint}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    eos = hf_config.get("eos_token_id")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"))
    if eos is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    tokenizer.save_pretrained(out)
    return out
