"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020), which peft does not provide.

Each adapter is down-projection → GELU → up-projection plus a residual, applied to the output of
a sublayer's output projection (attention `o_proj`/`attention.output.dense`, FFN
`down_proj`/`output.dense`, …) before the block's own residual and norm. Houlsby places one after
attention and one after the FFN, Pfeiffer only after the FFN. The up-projection starts at zero,
so an adapted model computes exactly what the base model did until it trains.

An adapter is a child module `bottleneck` of the layer it follows, run by a forward hook: the
base weights keep their names (a pretrained checkpoint loads unchanged) and every engine sees an
ordinary module tree. Adapters cannot be folded into the base weights (the GELU is in between),
so an export is the base model plus `bottleneck_adapters.safetensors`/`.json`; `load_adapters`
puts them back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from trainer.config import ConfigError
from trainer.models import transformer_blocks

Placement = Literal["houlsby", "pfeiffer"]
NAME = "bottleneck"
FILES = ("bottleneck_adapters.json", "bottleneck_adapters.safetensors")
# The output projection of each sublayer, by its name inside a transformer block.
ATTENTION_OUT = ("attention.output.dense", "self_attn.o_proj", "attn.c_proj", "layer.0.SelfAttention.o", "self_attn.out_proj")
FFN_OUT = ("output.dense", "mlp.down_proj", "mlp.c_proj", "layer.1.DenseReluDense.wo", "layer.2.DenseReluDense.wo", "fc2")


class Bottleneck(torch.nn.Module):
    def __init__(self, width: int, size: int) -> None:
        super().__init__()
        self.down = torch.nn.Linear(width, size)
        self.up = torch.nn.Linear(size, width)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(torch.nn.functional.gelu(self.down(hidden)))


def _run_adapter(layer: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return getattr(layer, NAME)(output)


def add_adapters(model: torch.nn.Module, size: int, placement: Placement) -> None:
    """Attach an adapter after each chosen sublayer of every block."""
    sites = FFN_OUT if placement == "pfeiffer" else ATTENTION_OUT + FFN_OUT
    for block in transformer_blocks(model):
        layers = dict(block.named_modules())
        chosen = [layers[site] for site in sites if site in layers]
        if not chosen:
            raise ConfigError(f"peft.method adapter: no known attention/FFN output layer in {type(block).__name__}; "
                              "use peft.method lora")
        for layer in chosen:
            weight = layer.weight  # Linear: [out, in]; GPT-2's Conv1D: [in, out]
            width = weight.shape[1] if isinstance(layer, Conv1D) else weight.shape[0]
            layer.add_module(NAME, Bottleneck(width, size).to(weight.device, weight.dtype))
            layer.register_forward_hook(_run_adapter)


def adapted_layers(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(getattr(module, NAME, None), Bottleneck)]


def is_adapter_parameter(name: str) -> bool:
    return f".{NAME}." in name


def save_adapters(model: torch.nn.Module, size: int, placement: Placement, out: Path) -> None:
    """The adapter weights and where they go, beside a base model saved with `save_pretrained`."""
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if is_adapter_parameter(k)}
    save_file(weights, str(out / FILES[1]))
    meta = {"size": size, "placement": placement, "layers": adapted_layers(model)}
    (out / FILES[0]).write_text(json.dumps(meta, indent=1) + "\n")


def load_adapters(model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    """Re-attach exported adapters to the base model loaded from the same export directory."""
    directory = Path(directory)
    meta = json.loads((directory / FILES[0]).read_text())
    add_adapters(model, meta["size"], meta["placement"])
    if adapted_layers(model) != meta["layers"]:
        raise ConfigError(f"{directory}: the adapters were made for other layers than this model has")
    unexpected = model.load_state_dict(load_file(str(directory / FILES[1])), strict=False).unexpected_keys
    if unexpected:
        raise ConfigError(f"{directory}: adapter weights {unexpected[:3]} have no place in this model")
    return model
