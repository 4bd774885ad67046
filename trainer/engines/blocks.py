"""How each transformer block computes, the same under both engines: compiled, and which activations it keeps for backward.

`engine.compile` compiles each block on its own (regional compilation, as torchtitan does): the blocks share one
code path, so the first block's graph serves every other block after a guard check, compile time stays that of one
block whatever the depth, and the engines' per-block hooks (FSDP2's gathers, ZeRO-3's partitioning) stay outside
the compiled code.

`engine.activation_checkpointing`:
- `full`: each block keeps only its input and recomputes everything else in backward (least memory, one extra
  forward);
- `selective`: op-level selective checkpointing (torch.utils.checkpoint's `create_selective_checkpoint_contexts`):
  each block keeps the outputs of its matrix multiplications and attention, the expensive ops, and recomputes the
  cheap ones (norms, activations, residual adds, casts), so backward repeats almost no FLOPs while the many
  element-wise intermediates are not stored. Chosen over "every other block" because it does not depend on the
  depth and saves memory in every block, not in half of them.
Both go through Hugging Face's `activation_checkpointing_enable`, which wraps each block in non-reentrant
`torch.utils.checkpoint`; the selective policy rides along as its `context_fn`.
"""

from __future__ import annotations

import functools

import torch
import torch._dynamo
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from trainer import models
from trainer.config import ConfigError

# the ops whose outputs a selectively checkpointed block keeps: the FLOPs of a transformer block
_SAVED_OPS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default,
    torch.ops.aten.linear.default, torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_activations(model: torch.nn.Module, mode: str) -> None:
    """Turn on `engine.activation_checkpointing` (none, full, selective) on every block of `model`."""
    if mode == "none":
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"engine.activation_checkpointing: {type(model).__name__} does not support it; set it to none")
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)


def compile_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """`engine.compile`: torch.compile each transformer block in place (before an engine wraps it); the blocks."""
    blocks = models.transformer_blocks(model)
    if not blocks:
        raise ConfigError(f"engine.compile: cannot find the transformer blocks of {type(model).__name__}; set it to false")
    # Hugging Face's hub-kernel layers set a context variable in forward; inside a checkpointed block dynamo refuses
    # that side effect (the recompute would not replay it) and leaves the whole block eager. The variable only picks
    # kernels, so not replaying it changes nothing; checked: compiled + full/selective gradients match eager to 3e-8.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    for block in blocks:
        block.compile()
    return blocks
