"""A trained model from disk, whatever form it was saved in: what distillation (a teacher), `evaluate` and the
compress commands read. Training builds its models in `trainer.models`; this module reads finished ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer

from trainer.adapters import FILES as ADAPTER_FILES
from trainer.adapters import load_adapters
from trainer.config import ConfigError

QUANTIZED_MARKER = "quantization.json"  # written by `compress quantize` beside its state dict
STATE_FILE = "quantized.pt"  # the quantized state dict
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def model_dir(path: str | Path) -> Path:
    """The directory holding the model: a run directory stands for its export/."""
    path = Path(path)
    return path / "export" if (path / "export" / "config.json").exists() else path


def load_model(path: str | Path) -> tuple[torch.nn.Module, Path]:
    """(model in eval mode on the CPU, its tokenizer.json) from a run directory, a complete checkpoint,
    a `save_pretrained` directory or a quantized directory."""
    directory = model_dir(path)
    if (directory / QUANTIZED_MARKER).exists():
        model = load_quantized(directory)
    elif (directory / "COMPLETE").exists():
        from trainer.export import consolidated_state_dict, load_weights, read_configs, rebuild

        model = rebuild(*read_configs(directory))
        load_weights(model, consolidated_state_dict(directory, model), directory)
    elif (directory / "config.json").exists():
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
        name = (config.architectures or [""])[0]
        if not hasattr(transformers, name):
            raise ConfigError(f"{directory}: config.json names no transformers class ({name!r}); "
                              "export it with `python -m trainer export`")
        model = getattr(transformers, name).from_pretrained(directory, local_files_only=True)
        if (directory / ADAPTER_FILES[0]).exists():  # an export of a run with bottleneck adapters
            model = load_adapters(model, directory)
    else:
        raise ConfigError(f"{path}: not a run directory, checkpoint or save_pretrained directory (no config.json)")
    tokenizer = directory / "tokenizer.json"
    if not tokenizer.exists():
        raise ConfigError(f"{directory}: no tokenizer.json beside the model; export it with `python -m trainer export`")
    return model.float().eval(), tokenizer


def is_quantized(path: str | Path) -> bool:
    return (model_dir(path) / QUANTIZED_MARKER).exists()


def check_tokenizer(model_tokenizer: Path, data_tokenizer: Path, what: str) -> None:
    """Refuse a model whose tokenizer maps text to other ids than the data's (the file bytes may
    differ after a re-save; the vocabulary and special tokens are what matter)."""
    def identity(path: Path) -> tuple:
        tokenizer = Tokenizer.from_file(str(path))
        return tokenizer.get_vocab(with_added_tokens=True), json.loads(tokenizer.to_str())["model"]["type"]

    if identity(model_tokenizer) != identity(data_tokenizer):
        raise ConfigError(f"{what}: tokenizer {model_tokenizer} differs from the data's {data_tokenizer}; "
                          "use a model trained with the same tokenizer")


def copy_tokenizer(source: Path, out: Path) -> None:
    """The tokenizer files that sit beside `source` (tokenizer.json), into `out`."""
    for name in TOKENIZER_FILES:
        if (source.parent / name).exists():
            shutil.copyfile(source.parent / name, out / name)


def load_quantized(directory: str | Path) -> torch.nn.Module:
    """The model `quantize` wrote to `directory`, in eval mode: rebuilt from config.json, its weights
    replaced by the saved quantized tensors."""
    directory = Path(directory)
    import torchao  # noqa: F401  registers its tensor classes as safe for weights_only loading

    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    model = getattr(transformers, config.architectures[0])._from_config(config)
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state, assign=True)
    return model.eval()
