"""Tensor parallel with sequence-parallel norms (Megatron-style) for Llama-family Hugging Face decoders.

Per decoder layer (torchtitan's plan, on Hugging Face module names):

    input_layernorm, post_attention_layernorm   SequenceParallel: each rank normalises its S/tp positions
    self_attn, mlp inputs                       all-gathered along the sequence (Shard(1) → Replicate)
    q/k/v_proj, gate/up_proj                    column-wise: each rank holds heads / tp heads, ffn / tp columns
    o_proj, down_proj                           row-wise, reduce-scattered back to Shard(1)

so the residual stream between the blocks holds S/tp positions per rank. The embedding is
vocab-parallel (row-wise) and leaves the decoder full-length activations: the decoder's own code,
which derives position ids, rotary embeddings and the causal / padding mask from the input length,
runs unchanged, and layer 0 takes its rank's slice of the sequence. The final norm is sequence
parallel and the LM head column-wise with its logits left sharded over the vocabulary (a DTensor,
Shard(-1)): the cross-entropy runs under `loss_parallel()`, so no rank ever holds the full logits.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from trainer.config import Config, ConfigError

# Hugging Face model types whose decoder layers use Llama's module names (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj)
LLAMA_FAMILY = ("llama", "mistral", "qwen2")  # Qwen3 adds per-head q/k norms, not covered by the plan
TP_TASKS = ("causal_lm",)  # sft evaluates by generating, which needs whole logits


def check(model: torch.nn.Module, config: Config, tp: int) -> None:
    """One line naming what keeps `model` from running at `parallel.tp` = tp."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in LLAMA_FAMILY or not hasattr(model, "lm_head"):
        raise ConfigError(f"parallel.tp {tp}: tensor parallel covers Llama-family decoders ({', '.join(LLAMA_FAMILY)}), "
                          f"not {model_type}; use model.arch llama or set parallel.tp=1")
    if config.task.type not in TP_TASKS:
        raise ConfigError(f"parallel.tp {tp}: tensor parallel runs task.type {', '.join(TP_TASKS)}, not {config.task.type}; "
                          "set parallel.tp=1")
    if config.peft.method != "none" or config.distill.teacher:
        raise ConfigError(f"parallel.tp {tp}: adapters (peft.method) and distillation (distill.teacher) are not tensor parallel; "
                          "set parallel.tp=1")
    cfg = model.config
    kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
    sizes = {"model.num_kv_heads": kv_heads, "model.num_heads": cfg.num_attention_heads,
             "model.intermediate_size": cfg.intermediate_size, "the vocabulary size": cfg.vocab_size}
    for what, size in sizes.items():
        if size % tp:
            raise ConfigError(f"parallel.tp {tp}: {what} {size} is not divisible by it; choose a tp that divides {size}")


def parallelize(model: torch.nn.Module, tp_mesh) -> None:
    """Shard `model` over `tp_mesh` in place as the module docstring says (before FSDP wraps it)."""
    tp = tp_mesh.size()
    decoder = model.model
    tied = model.lm_head.weight is decoder.embed_tokens.weight  # a pipeline's last stage holds a copy (pipeline.untie)
    parallelize_module(model, tp_mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "model.norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    })
    if tied:  # both are sharded by vocabulary rows (Shard(0)): one parameter again
        model.lm_head.weight = decoder.embed_tokens.weight
    for index, layer in enumerate(decoder.layers):
        parallelize_module(layer, tp_mesh, {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                            desired_input_kwarg_layouts={"hidden_states": Replicate()}),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
        if index == 0:  # the decoder hands over full-length activations: keep this rank's positions
            parallelize_module(layer, tp_mesh, PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                                                                  use_local_output=True))
        _local_heads(layer.self_attn, tp)


def _local_heads(attention: torch.nn.Module, tp: int) -> None:
    """Head counts a Hugging Face attention module keeps as attributes (older versions reshape by them), made local.
    The grouping ratio (heads per KV head) is unchanged: each rank holds whole KV groups."""
    for name in ("num_heads", "num_key_value_heads", "num_attention_heads"):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, getattr(attention, name) // tp)


def loss_context(tp: int) -> contextlib.AbstractContextManager:
    """Vocab-parallel cross-entropy on Shard(-1) logits; needed around the forward that computes the loss and its backward."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()
