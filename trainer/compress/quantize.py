"""`python -m trainer compress quantize MODEL --method int8-dynamic|int4-weight --out DIR`.

Library: torchao (PyTorch's own quantization project). `torch.ao.quantization` eager mode is
deprecated in favour of it, and torchao weights are tensor subclasses: the model keeps its
Hugging Face classes and forward, and a plain state dict round-trips through torch.save/torch.load
with `weights_only=True`. optimum-quanto would also work but sits outside PyTorch's release train.

    int8-dynamic   Linear layers: int8 weights per channel, activations quantized per token at run
                   time; embeddings int8 per row (weight-only: they are lookups)
    int4-weight    Linear layers: int4 weights in groups of 32, float activations; embeddings int8.
                   On the CPU torchao 0.18 keeps int4 values one per byte (its packed int4 layouts
                   need CUDA kernels), so this trades accuracy for nothing on disk there

Output: config.json, quantized.pt (the state dict), quantization.json (the method) and the
tokenizer; `trainer.model_files.load_model(DIR)` rebuilds the model from them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from trainer.model_files import QUANTIZED_MARKER, STATE_FILE, copy_tokenizer, is_quantized, load_model
from trainer.config import ConfigError

METHODS = ("int8-dynamic", "int4-weight")
INT4_GROUP = 32  # divides every hidden size of the supported architectures; smaller groups, smaller error


def quantize(source: str | Path, out: str | Path, method: str) -> Path:
    if method not in METHODS:
        raise ConfigError(f"--method {method}: unknown; use one of {', '.join(METHODS)}")
    if is_quantized(source):
        raise ConfigError(f"{source}: already quantized; quantize the float model it was made from")
    model, tokenizer = load_model(source)
    apply(model, method)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    torch.save(model.state_dict(), out / STATE_FILE)
    (out / QUANTIZED_MARKER).write_text(json.dumps({"method": method}) + "\n")
    copy_tokenizer(tokenizer, out)
    return out


def apply(model: torch.nn.Module, method: str) -> None:
    """Quantize `model` in place as METHODS describes."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0)),
              filter_fn=lambda module, _: isinstance(module, torch.nn.Embedding))
    if method == "int8-dynamic":
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
    else:
        quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP)))
