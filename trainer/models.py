"""Hugging Face causal LMs built from the run config, or loaded from a local directory.

Models are built under the run seed so every rank starts from the same weights; nothing is
fetched from a hub, and `trust_remote_code` stays off unless the config turns it on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from trainer.config import ConfigError, ModelConfig


def build_model(config: ModelConfig, vocab_size: int, seq_len: int, eos_id: int, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    if config.pretrained:
        path = Path(config.pretrained)
        if not (path / "config.json").exists():
            raise ConfigError(f"model.pretrained {path}: no config.json; give a save_pretrained directory")
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=config.trust_remote_code, local_files_only=True)
        if model.config.vocab_size < vocab_size:
            raise ConfigError(
                f"model.pretrained {path}: vocabulary {model.config.vocab_size} is smaller than the data's {vocab_size}; "
                "prepare the data with this model's tokenizer"
            )
        return model.float()
    if config.hidden_size % config.num_heads:
        raise ConfigError(f"model.hidden_size {config.hidden_size} is not divisible by model.num_heads {config.num_heads}")
    if config.arch == "llama":
        hf_config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size or _llama_ffn(config.hidden_size),
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads or config.num_heads,
            max_position_embeddings=seq_len,
            tie_word_embeddings=config.tie_embeddings,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
        )
        return LlamaForCausalLM(hf_config)
    hf_config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=config.hidden_size,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        n_inner=config.intermediate_size,
        n_positions=seq_len,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    return GPT2LMHeadModel(hf_config)


def _llama_ffn(hidden: int) -> int:
    """SwiGLU width as Llama sizes it: 8/3 of hidden, rounded up to a multiple of 64."""
    return -(-int(8 * hidden / 3) // 64) * 64


def flops_per_token(model: PreTrainedModel, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (dense) + 12·L·H·Q·T (attention), as in the PaLM MFU formula."""
    config = model.config
    n_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    head_dim = (getattr(config, "hidden_size", None) or config.n_embd) // heads
    return 6 * n_params + 12 * layers * heads * head_dim * seq_len
