"""Hugging Face models for each task, built from the run config or loaded from local weights.

The model class follows `task.type` (causal LM, masked LM, sequence or token classification,
encoder-decoder; multitask: a shared encoder with a head per data source, trainer.multitask_model).
Weights come from the config's sizes, a `save_pretrained` directory, a `.gguf` file or
`package:<module>/<path>` inside an installed package; nothing is fetched from a hub, and
`trust_remote_code` stays off unless the config turns it on. Models are built under the run seed
so every rank starts from the same weights (a fresh task head included).

Pad ids: a model built from sizes pads with `eos_id`, since every tokenizer of the data contract
has an EOS while id 0 may be a real token, and Hugging Face keeps the pad row of an encoder's
embedding at zero without gradient. A pretrained model keeps its own pad id (`eos_id` if it has
none). Padding is masked out, so the choice changes no loss.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BartConfig,
    BertConfig,
    GgufConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    T5Config,
)
from transformers.utils import logging as hf_logging

from data_tools.common import first_line, resolve
from data_tools.manifest import Manifest
from trainer.config import Config, ConfigError, ModelConfig

log = logging.getLogger("trainer")

TASK_CLASSES = {
    "causal_lm": AutoModelForCausalLM,
    "sft": AutoModelForCausalLM,
    "mlm": AutoModelForMaskedLM,
    "classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
    "multitask": AutoModel,  # the shared encoder; trainer.multitask_model adds the heads
}
ARCHS = {  # model.arch values a model built from sizes may take, per task
    "causal_lm": ("llama", "gpt2"),
    "sft": ("llama", "gpt2"),
    "mlm": ("bert",),
    "classification": ("bert", "llama", "gpt2"),
    "token_classification": ("bert", "llama", "gpt2"),
    "seq2seq": ("t5", "bart"),
    "multitask": ("bert",),
}
LABELLED = ("classification", "token_classification")
HEADS = ("classifier", "score", "classification_head", "qa_outputs")  # attribute names of task heads
BLOCK_LISTS = ("layers", "layer", "h", "block", "blocks")  # attribute names of the ModuleList of transformer blocks
LEARNED_POSITIONS = ("bert", "distilbert", "electra", "gpt2", "bart")  # a fixed table of positions: seq_len must fit


def build_model(config: Config, vocab_size: int, seq_len: int, eos_id: int, labels: list[str], seed: int,
                sources: Sequence[Manifest] = ()) -> PreTrainedModel:
    """The model `task.type` trains, with `architectures` naming its class so a checkpoint's
    hf_config.json says what to rebuild, and a pad id set (decoder-only classifiers pool the last
    non-pad token). `sources`: data.train's manifests, which give a multi-task model its heads."""
    task = config.task.type
    if task in LABELLED and not labels:
        raise ConfigError(f"task.type {task}: the data has no label vocabulary; prepare labelled data (a manifest with labels)")
    torch.manual_seed(seed)
    label_maps = {}
    if task in LABELLED:
        label_maps = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                      "label2id": {label: i for i, label in enumerate(labels)}}
    attention = attention_kernel(config)
    if config.model.pretrained:
        model = _load_pretrained(config.model, task, model_class(config), label_maps, attention)
        _check_fits(model, config.model.pretrained, vocab_size, seq_len)
    else:
        hf_config = _hf_config(config.model, task, vocab_size, seq_len, eos_id, label_maps)
        model = model_class(config).from_config(hf_config, **attention)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = eos_id
    if task == "multitask":
        from trainer.multitask_model import MultiTaskModel, heads

        model = MultiTaskModel(model, heads(config, sources))
    model.config.architectures = [type(model).__name__]
    return model.float()


def model_class(config: Config):
    """The Auto class for `task.type`; masked LM with a sentence task gets BERT's pretraining heads (MLM + NSP/SOP)."""
    if config.task.type == "mlm" and config.task.sentence_task != "none":
        return AutoModelForPreTraining
    return TASK_CLASSES[config.task.type]


def attention_kernel(config: Config) -> dict[str, str]:
    """`attn_implementation` for model.attention, empty for the model's default (SDPA where it has it).

    `auto` takes flash-attn's varlen kernel where it runs (CUDA, bf16, the package installed): with
    document attention it gets each row's documents as `cu_seqlens` from the position ids. That path
    needs a GPU and is not exercised on CPU. Elsewhere SDPA, which a run with document attention then
    switches to trainer.document_attention's per-document spans. Kernels that cannot train here are
    refused at start."""
    choice, cuda = config.model.attention, torch.cuda.is_available()
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if choice == "auto":
        return {"attn_implementation": "flash_attention_2"} if cuda and has_flash and config.precision == "bf16" else {}
    if choice == "flash_attention_2" and not (cuda and has_flash and config.precision == "bf16"):
        raise ConfigError("model.attention flash_attention_2: needs CUDA, precision bf16 and the flash-attn package; "
                          "use sdpa or auto")
    if choice == "flex_attention" and not cuda:
        raise ConfigError(f"model.attention flex_attention: torch {torch.__version__} has no flex attention backward on CPU; "
                          "use sdpa or auto")
    return {"attn_implementation": choice}


def _load_pretrained(config: ModelConfig, task: str, auto, label_maps: dict, attention: dict[str, str]) -> PreTrainedModel:
    path = resolve(config.pretrained)  # package:<module>/<path> points inside an installed package
    where = f"model.pretrained {config.pretrained}"
    if path.suffix == ".gguf":
        model_type = _gguf_model_type(path, where)
        # dequantized to a plain dense model: training needs float weights, not GGUF blocks
        source = path.parent
        extra = {"gguf_file": path.name, "quantization_config": GgufConfig(gguf_file=path.name, dequantize=True)}
    elif (path / "config.json").exists():
        model_type = PretrainedConfig.get_config_dict(path)[0].get("model_type")
        source, extra = path, {}
    else:
        raise ConfigError(f"{where}: neither a .gguf file nor a directory with config.json; give a save_pretrained directory")
    if model_type not in auto._model_mapping._model_mapping and not config.trust_remote_code:
        raise ConfigError(f"{where}: a {model_type} model has no {task} head in transformers; choose another model or task.type")
    with _quiet_transformers():  # a head for another label set (mismatched size) is replaced like a missing one
        model, info = auto.from_pretrained(
            source, trust_remote_code=config.trust_remote_code, local_files_only=True, output_loading_info=True,
            ignore_mismatched_sizes=bool(label_maps), **extra, **label_maps, **attention,
        )
    new = sorted({key.rsplit(".", 1)[0] for key in [*info["missing_keys"], *(m[0] for m in info["mismatched_keys"])]})
    if new:
        log.info("%s: newly initialised %s (not in the checkpoint; trained from scratch)", where, ", ".join(new))
    return model


def _gguf_model_type(path: Path, where: str) -> str:
    """The transformers model type of a GGUF file, refused unless it is a causal LM: GGUF is
    llama.cpp's format for decoder-only LMs, and transformers reads little else from it."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint, read_field

    try:
        architecture = read_field(GGUFReader(path), "general.architecture")[0]
    except (OSError, ValueError, KeyError, IndexError) as err:  # not a GGUF file, a truncated one, one without an architecture
        raise ConfigError(f"{where}: not a readable GGUF file ({type(err).__name__}: {first_line(err, 120)})") from None
    try:
        model_type = load_gguf_checkpoint(str(path), return_tensors=False)["config"].get("model_type")
    except ValueError:  # an architecture transformers does not read from GGUF
        model_type = None
    if model_type not in AutoModelForCausalLM._model_mapping._model_mapping:
        raise ConfigError(f"{where}: a {architecture} GGUF is not a causal LM transformers can load "
                          "(GGUF loads causal LMs only); give a save_pretrained directory")
    return model_type


@contextlib.contextmanager
def _quiet_transformers():
    """Loading logs a progress bar and a per-key report (and GGUF conversion draws its own tqdm bar
    on stderr); build_model logs the one line that matters."""
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _check_fits(model: PreTrainedModel, where: str, vocab_size: int, seq_len: int) -> None:
    config = model.config
    if config.vocab_size < vocab_size:
        raise ConfigError(
            f"model.pretrained {where}: vocabulary {config.vocab_size} is smaller than the data's {vocab_size}; "
            "prepare the data with this model's tokenizer"
        )
    if config.model_type in LEARNED_POSITIONS and seq_len > config.max_position_embeddings:
        raise ConfigError(
            f"model.pretrained {where}: {config.max_position_embeddings} positions, the data's rows are {seq_len} tokens; "
            "prepare the data with a seq_len that fits"
        )


def _hf_config(config: ModelConfig, task: str, vocab_size: int, seq_len: int, eos_id: int, label_maps: dict) -> PretrainedConfig:
    """A Hugging Face config of `model.arch` with the run's sizes and labels; special ids all `eos_id` (see the module doc)."""
    if config.arch not in ARCHS[task]:
        choices = ", ".join(ARCHS[task])
        raise ConfigError(f"model.arch {config.arch} cannot train task.type {task}; use one of {choices} or model.pretrained")
    if config.hidden_size % config.num_heads:
        raise ConfigError(f"model.hidden_size {config.hidden_size} is not divisible by model.num_heads {config.num_heads}")
    hidden, layers, heads, ffn = config.hidden_size, config.num_layers, config.num_heads, config.intermediate_size
    common = {"vocab_size": vocab_size, "tie_word_embeddings": config.tie_embeddings,
              "bos_token_id": eos_id, "eos_token_id": eos_id, **label_maps}
    if config.arch == "llama":
        return LlamaConfig(
            hidden_size=hidden, intermediate_size=ffn or _llama_ffn(hidden), num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=config.num_kv_heads or heads, max_position_embeddings=seq_len, **common,
        )
    if config.arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=seq_len, **common)
    if config.arch == "bert":
        return BertConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn or 4 * hidden,
            max_position_embeddings=seq_len, pad_token_id=eos_id, **common,
        )
    if config.arch == "t5":
        return T5Config(
            d_model=hidden, d_kv=hidden // heads, d_ff=ffn or 4 * hidden, num_layers=layers, num_heads=heads,
            pad_token_id=eos_id, decoder_start_token_id=eos_id, **common,
        )
    return BartConfig(
        d_model=hidden, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn or 4 * hidden, decoder_ffn_dim=ffn or 4 * hidden, max_position_embeddings=seq_len,
        pad_token_id=eos_id, decoder_start_token_id=eos_id, forced_eos_token_id=eos_id, **common,
    )


def _llama_ffn(hidden: int) -> int:
    """SwiGLU width as Llama sizes it: 8/3 of hidden, rounded up to a multiple of 64."""
    return -(-int(8 * hidden / 3) // 64) * 64


def base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside a peft wrapper (or the model itself): its config is what a
    checkpoint stores as hf_config.json."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks in depth order (encoder before decoder): every outermost ModuleList
    named like Hugging Face's block lists (`model.layers`, `transformer.h`, `bert.encoder.layer`,
    T5 `encoder.block`/`decoder.block`), found by walking the modules so peft wrappers are seen through."""
    blocks: list[torch.nn.Module] = []
    found: list[str] = []
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS
                and not any(name.startswith(f"{outer}.") for outer in found)):
            found.append(name)
            blocks.extend(module)
    return blocks


def task_head(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """(attribute name, module) of the classification / NER / QA head; None for language-model heads."""
    base = base_model(model)
    return next(((name, head) for name in HEADS if isinstance(head := getattr(base, name, None), torch.nn.Module)), None)


def layer_indices(model: torch.nn.Module) -> tuple[dict[str, int], int]:
    """({parameter name: layer index}, L) for layer-wise LR decay, gradual unfreezing and
    `freeze.first_layers`: embeddings 0, block i (of L) i + 1, everything above the blocks (final
    norm, pooler, head, a peft prompt encoder) L + 1. A parameter outside the blocks counts as an
    embedding if it is registered before the first block or its name says so (BART's
    `layernorm_embedding`, the decoder's position embeddings)."""
    blocks = transformer_blocks(model)
    index = {id(p): i + 1 for i, block in enumerate(blocks) for p in block.parameters()}
    top = len(blocks) + 1
    below_blocks = True
    for name, param in base_model(model).named_parameters():
        below_blocks = below_blocks and id(param) not in index
        index.setdefault(id(param), 0 if below_blocks or "embed" in name else top)
    return {name: index.get(id(param), top) for name, param in model.named_parameters()}, len(blocks)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (dense) + 12·L·d·T (attention), as in the PaLM MFU formula;
    an encoder-decoder counts its encoder and decoder layers."""
    config = model.config
    n_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    layers = config.num_hidden_layers
    if config.is_encoder_decoder:
        layers += getattr(config, "num_decoder_layers", None) or config.decoder_layers
    return 6 * n_params + 12 * layers * config.hidden_size * seq_len
