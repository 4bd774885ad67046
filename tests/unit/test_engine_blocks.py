"""How blocks compute under both engines (trainer.engines.blocks) and AdamW's kernels (optim.impl), in one process."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.config import ConfigError, load_config
from trainer.engines import adamw_with_schedule
from trainer.engines.blocks import checkpoint_activations, compile_blocks
from trainer.models import build_model, transformer_blocks

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"
TINY = ["model.arch=llama", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2"]


def tiny_llama(*overrides: str):
    config = load_config(DEMO, [*TINY, *overrides])
    return config, build_model(config, vocab_size=64, seq_len=16, eos_id=0, labels=[], seed=0).train()


class CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.mm.default
        return func(*args, **(kwargs or {}))


def backward_matmuls_and_grads(mode: str) -> tuple[int, dict[str, torch.Tensor]]:
    """aten.mm calls in backward (the gradients' own plus any recomputed forward's) and the gradients, under `mode`."""
    _, model = tiny_llama()
    checkpoint_activations(model, mode)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    with CountMatmuls() as counter:
        loss.backward()
    return counter.count, {name: p.grad for name, p in model.named_parameters()}


def test_full_recomputes_every_matmul_selective_none_and_all_give_the_same_gradients():
    plain, grads = backward_matmuls_and_grads("none")
    full, full_grads = backward_matmuls_and_grads("full")
    selective, selective_grads = backward_matmuls_and_grads("selective")
    # a full recompute runs each block's matmuls again up to the last one backward needs: q k v o gate up, not down
    block_matmuls = 6 * 2
    assert (full, selective) == (plain + block_matmuls, plain)
    for name, grad in grads.items():
        torch.testing.assert_close(full_grads[name], grad, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(selective_grads[name], grad, rtol=0, atol=0, msg=name)


def test_checkpointing_a_model_without_support_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^engine.activation_checkpointing: Linear does not support it; set it to none$"):
        checkpoint_activations(torch.nn.Linear(2, 2), "selective")


def test_compile_wraps_each_block_not_the_whole_model():
    _, model = tiny_llama()
    blocks = compile_blocks(model)
    assert blocks == transformer_blocks(model) and len(blocks) == 2
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert model._compiled_call_impl is None and model.model._compiled_call_impl is None
    with pytest.raises(ConfigError, match="^engine.compile: cannot find the transformer blocks of Linear; set it to false$"):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_foreach_and_fused_adamw_make_the_same_updates_as_the_loop(impl):
    config, model = tiny_llama()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    trained = {}
    for name in ("for_loop", impl):
        config.optim.impl = name
        replica = copy.deepcopy(model)
        optimizer, scheduler = adamw_with_schedule(replica, config, total_steps=10)
        assert optimizer.defaults["foreach" if name != "fused" else "fused"] is (name != "for_loop")
        for _ in range(3):
            replica(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        trained[name] = dict(replica.named_parameters())
    for name, param in trained["for_loop"].items():
        torch.testing.assert_close(trained[impl][name], param, rtol=1e-5, atol=1e-6, msg=name)


def fsdp2_step(reshard: list[str]) -> tuple[list[bool], dict[str, torch.Tensor]]:
    """One optimizer step of 2 accumulated micro-batches: whether the blocks were gathered after micro-batch 0's
    backward and after the step, and the updated parameters."""
    from torch.distributed.tensor import DTensor

    from trainer.engines.fsdp2_engine import FSDP2Engine

    config, model = tiny_llama("engine.type=fsdp2", "train.global_batch=4", "train.micro_batch=2", *reshard)
    engine = FSDP2Engine(model, config, world_size=1, total_steps=10)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    gathered = []
    for micro in range(2):
        rows = ids[2 * micro : 2 * micro + 2]
        engine.backward(engine.forward(input_ids=rows, labels=rows).loss)
        engine.step()
        gathered.append(not any(isinstance(p, DTensor) for p in transformer_blocks(model)[0].parameters()))
    return gathered, {name: p.full_tensor().clone() for name, p in model.named_parameters()}


@pytest.mark.usefixtures("one_process_group")
def test_fsdp2_without_resharding_keeps_blocks_gathered_over_the_step_and_updates_the_same():
    gathered, updated = fsdp2_step([])
    kept, kept_updated = fsdp2_step(["engine.reshard_after_forward=false"])
    assert gathered == [False, False] and kept == [True, False]  # resharded at the step's end either way
    for name, value in updated.items():
        torch.testing.assert_close(kept_updated[name], value, rtol=0, atol=0, msg=name)
