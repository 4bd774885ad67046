"""`python -m trainer compress prune MODEL --sparsity 0.5 [--structured ffn|layers|heads] --out DIR`.

    (unstructured)  magnitude: the smallest |w| of every weight matrix inside the transformer blocks
                    set to zero (torch.nn.utils.prune, made permanent). Embeddings and the task head
                    are left whole: they are lookups or tiny. The file stays dense: the zeros pay off
                    with a sparse kernel or compression, not on disk
    ffn             the FFN channels with the smallest L1 norm (input rows plus output columns)
                    removed in every block: intermediate_size shrinks, weights and disk with it
    layers          every other block kept, evenly spaced (DistilBERT's student initialisation):
                    num_hidden_layers shrinks
    heads           the attention heads with the smallest L1 norm (their q/k/v rows plus o columns)
                    removed, whole key/value groups at a time under grouped-query attention, the same
                    count in every block: num_attention_heads and num_key_value_heads shrink, head_dim
                    stays. Llama-family models only: a BERT config derives the head size from
                    hidden_size / num_attention_heads, so it cannot describe fewer heads

The result is a `save_pretrained` directory with the tokenizer. `--recover CONFIG --recover-steps N`
then finetunes it briefly with a run config of the task (one process, the run in OUT.recovery/, its
export replacing OUT); after unstructured pruning the finetune lets zeros regrow, so the recovered
weights are pruned to the same sparsity again (prune, recover, re-prune: the usual gradual scheme
in one round).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn.utils import prune as torch_prune
from transformers.pytorch_utils import Conv1D

from trainer.model_files import copy_tokenizer, is_quantized, load_model
from trainer.config import ConfigError
from trainer.models import BLOCK_LISTS, transformer_blocks

STRUCTURES = ("ffn", "layers", "heads")
FFN_LAYOUTS = (  # (input projections, output projection) attribute paths inside a block
    (("intermediate.dense",), "output.dense"),  # BERT family
    (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),  # Llama family
)


def prune(source: str | Path, out: str | Path, sparsity: float, structured: str | None = None,
          recover: str | Path | None = None, recover_steps: int = 100) -> Path:
    if not 0 < sparsity < 1:
        raise ConfigError(f"--sparsity {sparsity}: must lie strictly between 0 and 1")
    if is_quantized(source):
        raise ConfigError(f"{source}: a quantized model cannot be pruned; prune the float model, then quantize")
    model, tokenizer = load_model(source)
    if structured is None:
        magnitude(model, sparsity)
    elif structured == "ffn":
        prune_ffn(model, sparsity)
    elif structured == "layers":
        drop_layers(model, sparsity)
    elif structured == "heads":
        prune_heads(model, sparsity)
    else:
        raise ConfigError(f"--structured {structured}: unknown; use one of {', '.join(STRUCTURES)}")
    out = Path(out)
    model.save_pretrained(out)
    copy_tokenizer(tokenizer, out)
    if recover:
        recovered = recovery_finetune(out, Path(recover), recover_steps)
        shutil.rmtree(out)
        if structured is None:
            return prune(recovered, out, sparsity)
        shutil.copytree(recovered, out)
    return out


def recovery_finetune(pruned: Path, config: Path, steps: int) -> Path:
    """Train the pruned model `steps` steps with run config `config` in one process; its export."""
    if steps < 1:
        raise ConfigError(f"--recover-steps {steps}: must be at least 1")
    run_dir = pruned.with_name(pruned.name + ".recovery")
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "trainer", "--config", str(config), f"model.pretrained={pruned.resolve()}",
               f"run.out_dir={run_dir.parent.resolve()}", f"run.name={run_dir.name}", f"train.max_steps={steps}",
               f"train.eval_every={steps}", f"train.ckpt_every={steps}"]
    if subprocess.run(command).returncode:  # the trainer picks the accelerator (CPU without CUDA)
        raise ConfigError(f"--recover {config}: the recovery finetune failed (its log is above; the run is in {run_dir})")
    return run_dir / "export"


def magnitude(model: torch.nn.Module, sparsity: float) -> None:
    for block in transformer_blocks(model):
        for module in block.modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)):
                torch_prune.l1_unstructured(module, "weight", amount=sparsity)
                torch_prune.remove(module, "weight")


def prune_ffn(model: torch.nn.Module, sparsity: float) -> None:
    """Keep the (1 - sparsity) share of FFN channels with the largest L1 norm, the same count in every
    block so one `intermediate_size` describes the result."""
    blocks = transformer_blocks(model)
    kept = 0
    for block in blocks:
        inputs, output = ffn_parts(block)
        norms = sum(layer.weight.abs().sum(1) for layer in inputs) + output.weight.abs().sum(0)
        kept = max(1, round((1 - sparsity) * len(norms)))
        keep = norms.topk(kept).indices.sort().values
        for layer in inputs:
            layer.weight = torch.nn.Parameter(layer.weight[keep].clone())
            if layer.bias is not None:
                layer.bias = torch.nn.Parameter(layer.bias[keep].clone())
            layer.out_features = kept
        output.weight = torch.nn.Parameter(output.weight[:, keep].clone())
        output.in_features = kept
    model.config.intermediate_size = kept


def ffn_parts(block: torch.nn.Module) -> tuple[list[torch.nn.Linear], torch.nn.Linear]:
    for inputs, output in FFN_LAYOUTS:
        try:
            return [block.get_submodule(name) for name in inputs], block.get_submodule(output)
        except AttributeError:
            continue
    raise ConfigError(f"--structured ffn: no FFN of a known layout in {type(block).__name__} "
                      "(BERT and Llama families are supported)")


def prune_heads(model: torch.nn.Module, sparsity: float) -> None:
    """Keep the (1 - sparsity) share of key/value groups (a KV head and the query heads reading it)
    with the largest L1 norm, the same count in every block."""
    config = model.config
    if not hasattr(config, "num_key_value_heads") or not all(hasattr(b, "self_attn") for b in transformer_blocks(model)):
        raise ConfigError(f"--structured heads: {config.model_type} configs derive the head size from hidden_size / heads, "
                          "so they cannot describe fewer heads; use a Llama-family model, or --structured ffn|layers")
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_group = heads // groups
    kept = max(1, round((1 - sparsity) * groups))
    for block in transformer_blocks(model):
        attention = block.self_attn
        q, k, v, o = attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj
        norms = (q.weight.abs().view(groups, -1).sum(1) + k.weight.abs().view(groups, -1).sum(1)
                 + v.weight.abs().view(groups, -1).sum(1) + o.weight.abs().view(-1, groups, per_group * head_dim).sum((0, 2)))
        keep = norms.topk(kept).indices.sort().values
        kv_rows = (keep[:, None] * head_dim + torch.arange(head_dim)).flatten()
        q_rows = (keep[:, None] * per_group * head_dim + torch.arange(per_group * head_dim)).flatten()
        for layer, rows in ((q, q_rows), (k, kv_rows), (v, kv_rows)):
            layer.weight = torch.nn.Parameter(layer.weight[rows].clone())
            if layer.bias is not None:
                layer.bias = torch.nn.Parameter(layer.bias[rows].clone())
            layer.out_features = len(rows)
        o.weight = torch.nn.Parameter(o.weight[:, q_rows].clone())
        o.in_features = len(q_rows)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = kept * per_group, kept, head_dim


def drop_layers(model: torch.nn.Module, sparsity: float) -> None:
    """Keep blocks 0, k, 2k, … so the kept ones span the depth; per-layer config lists follow."""
    holder, attribute = next((module, name) for module in model.modules() for name in BLOCK_LISTS
                             if isinstance(getattr(module, name, None), torch.nn.ModuleList))
    blocks = getattr(holder, attribute)
    count = max(1, round((1 - sparsity) * len(blocks)))
    keep = [i * len(blocks) // count for i in range(count)]
    setattr(holder, attribute, torch.nn.ModuleList(blocks[i] for i in keep))
    for new, block in enumerate(getattr(holder, attribute)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):  # the KV cache is indexed by it
                module.layer_idx = new
    config = model.config
    config.num_hidden_layers = count
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
