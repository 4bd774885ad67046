"""What tensor parallel refuses, before any process group exists (trainer.parallel.tensor.check)."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from trainer.config import ConfigError, load_config
from trainer.parallel.tensor import check

CONFIG = load_config(None, ["data.train=x", "engine.type=fsdp2"])


def llama(**sizes) -> LlamaForCausalLM:
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 64, **sizes}
    return LlamaForCausalLM(LlamaConfig(**sizes))


def test_llama_with_divisible_sizes_passes():
    check(llama(num_key_value_heads=2), CONFIG, 2)


def test_kv_heads_not_divisible_by_tp_is_one_line():
    message = r"^parallel.tp 4: model.num_kv_heads 2 is not divisible by it; choose a tp that divides 2$"
    with pytest.raises(ConfigError, match=message):
        check(llama(num_key_value_heads=2), CONFIG, 4)


def test_other_archs_and_tasks_are_refused_in_one_line():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64))
    with pytest.raises(ConfigError, match=r"parallel.tp 2: tensor parallel covers Llama-family decoders .*, not gpt2;"):
        check(gpt2, CONFIG, 2)
    mlm = load_config(None, ["data.train=x", "engine.type=fsdp2", "task.type=mlm"])
    with pytest.raises(ConfigError, match=r"parallel.tp 2: tensor parallel runs task.type causal_lm, not mlm"):
        check(llama(), mlm, 2)
