"""`python -m trainer plan`: the analytic parameter count against real models, the memory model
against DeepSpeed's own estimators and the Korthikanti activation formula, every example config
planned on its intended cluster, and the up-front refusal of a config that cannot fit."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: its estimators need no GPU

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from trainer.cli import main
from trainer.config import Config, ConfigError, ModelConfig, load_config
from trainer.engines.fsdp2_engine import transformer_blocks
from trainer.models import build_model, flops_per_token
from trainer.plan import (
    TABLE,
    Layout,
    Shape,
    activation_bytes,
    check_fits,
    count_params,
    make_plan,
    model_states,
)
from trainer.plan import flops_per_token as planned_flops

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_NAMES = [f"{size}-{engine}" for size in ("gpt2-124m", "llama-1b", "llama-8b") for engine in ("deepspeed", "fsdp2")]
VOCAB = {"gpt2": 50257, "llama": 128256}


def example(name: str) -> Path:
    return EXAMPLES / f"{name}.yaml"


def documented_command(name: str) -> list[str]:
    """The `# plan: python -m trainer plan …` line each example starts with, as argv for trainer.cli.main."""
    first = example(name).read_text().splitlines()[0]
    prefix = "# plan: python -m trainer "
    assert first.startswith(prefix), f"{name}.yaml must start with its plan command"
    return shlex.split(first[len(prefix):])


TINY = [
    ModelConfig(arch="llama", hidden_size=64, num_layers=3, num_heads=8, num_kv_heads=2),
    ModelConfig(arch="llama", hidden_size=48, num_layers=2, num_heads=4, intermediate_size=100, tie_embeddings=False),
    ModelConfig(arch="gpt2", hidden_size=64, num_layers=3, num_heads=4),
    ModelConfig(arch="gpt2", hidden_size=48, num_layers=2, num_heads=4, intermediate_size=100, tie_embeddings=False),
]


@pytest.mark.parametrize("model_config", TINY, ids=lambda m: f"{m.arch}-h{m.hidden_size}-tied{m.tie_embeddings}")
def test_param_count_matches_a_real_model(model_config):
    """Total, one block, largest layer (as DeepSpeed counts it) and FLOPs per token equal the built model's."""
    vocab, seq_len = 97, 32
    model = build_model(Config(model=model_config), vocab, seq_len, eos_id=0, labels=[], seed=0)
    shape = Shape.of(model_config, vocab, seq_len)
    count = count_params(shape)
    assert count.total == sum(p.numel() for p in model.parameters())
    assert (count.total, count.largest_layer) == model_to_params(model)
    assert count.block == sum(p.numel() for p in transformer_blocks(model)[0].parameters())
    assert planned_flops(shape, count, seq_len) == flops_per_token(model, seq_len)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_param_count_matches_the_example_model_on_the_meta_device(name):
    """The full-size example models, built without memory: 1B and 8B are counted exactly too."""
    config = load_config(example(name))
    vocab = VOCAB[config.model.arch]
    with torch.device("meta"):
        model = build_model(config, vocab, 2048, eos_id=0, labels=[], seed=0)
    assert count_params(Shape.of(config.model, vocab, 2048)).total == sum(p.numel() for p in model.parameters())


def example_count(name: str):
    model = load_config(example(name)).model
    return count_params(Shape.of(model, VOCAB[model.arch], 2048))


def test_example_sizes_are_the_published_ones():
    # GPT-2 small is 124,439,808 at 1024 positions; the examples' 2048 add 1024 × 768
    assert example_count("gpt2-124m-deepspeed").total == 124_439_808 + 1024 * 768
    assert example_count("llama-1b-deepspeed").total == 1_235_814_400  # Llama 3.2 1B
    assert example_count("llama-8b-deepspeed").total == 8_030_261_248  # Llama 3 8B


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_each_example_plans_on_its_intended_cluster(name, capsys):
    argv = documented_command(name)
    config = load_config(example(name))
    world = int(argv[argv.index("--nodes") + 1]) * int(argv[argv.index("--gpus-per-node") + 1])
    assert config.data.lanes % world == 0 and config.train.global_batch % config.data.lanes == 0  # the data loader's layout rule
    assert main(argv) == 0
    out = capsys.readouterr().out
    for layout in TABLE:
        assert f" {layout.name} " in out
    selected = [line for line in out.splitlines() if line.endswith("<- selected")]
    expected = "FSDP2" if name.endswith("fsdp2") else f"ZeRO-{config.engine.zero_stage}"
    assert len(selected) == 1 and selected[0].split()[:2] == ["*", expected]
    assert selected[0].split()[-3] == "yes"
    rows = config.train.global_batch
    assert config.precision == "bf16" and f"{rows * 2048:,} = {rows} rows × 2048" in out


def test_an_8b_model_on_one_gpu_without_sharding_is_refused_in_one_line(capsys):
    path = str(example("llama-8b-deepspeed"))
    argv = ["plan", "--config", path, "--nodes", "1", "--gpus-per-node", "1", "--vocab-size", "128256", "engine.zero_stage=0"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {path}: ZeRO-0 on 1 GPU needs ~143.1 GiB per GPU, more than the 80 GiB available")
    assert "a higher engine.zero_stage" in lines[0] and "more GPUs" not in lines[0]  # ZeRO-0 replicates: GPUs do not help


def test_check_fits_refuses_what_the_loop_cannot_run():
    config = load_config(example("llama-8b-fsdp2"))
    check_fits(config, 32, 80, vocab_size=128256, seq_len=2048)
    with pytest.raises(ConfigError, match=r"FSDP2 on 8 GPUs needs ~\d+\.\d GiB per GPU.*use more GPUs, engine.offload: cpu"):
        check_fits(config, 8, 24, vocab_size=128256, seq_len=2048)
    with pytest.raises(ConfigError, match="no manifest here.*pass --vocab-size"):
        check_fits(config, 32, 80)


@pytest.mark.parametrize("nodes, gpus_per_node", [(1, 1), (1, 8), (4, 8)])
def test_model_states_agree_with_deepspeeds_estimators(nodes, gpus_per_node):
    """DeepSpeed charges 18 bytes per parameter over N for sharded states. ZeRO-2: we count 2 (grads) + 12
    (fp32 master, m, v); the other 4 are its fp32 copy of the gradient partition at the optimizer step.
    ZeRO-3: we count 16, the ZeRO paper's; DeepSpeed's 18 is 2 more. Offloaded, both leave on the GPU only
    ZeRO-2's 16-bit params, or ZeRO-3's gathered largest layer (16-bit params + grads): exactly equal."""
    count, world = example_count("llama-8b-deepspeed"), nodes * gpus_per_node
    common = dict(num_gpus_per_node=gpus_per_node, num_nodes=nodes)

    def ours(layout: Layout) -> float:
        return sum(model_states(layout, count, "bf16", world))

    _, zero2 = estimate_zero2_model_states_mem_needs(count.total, cpu_offload=False, **common)
    _, zero2_offload = estimate_zero2_model_states_mem_needs(count.total, cpu_offload=True, **common)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(count.total, count.largest_layer, cpu_offload=False, **common)
    _, zero3_offload, _ = estimate_zero3_model_states_mem_needs(count.total, count.largest_layer, **common)
    assert zero2 - ours(Layout(2)) == pytest.approx(4 * count.total / world, abs=1)  # DeepSpeed truncates to int
    assert zero3 - ours(Layout(3)) == pytest.approx(2 * count.total / world, abs=1)
    assert ours(Layout(2, offload=True)) == zero2_offload
    assert ours(Layout(3, offload=True)) == zero3_offload


def test_activations_are_korthikantis_formula_for_gpt2():
    """GPT-2 is the paper's block: s·b·h·(34 + 5·a·s/h) per layer with eager attention, without the
    5·a·s/h term under flash attention, 2·s·b·h per layer plus one layer when recomputed; plus 4·s·b·V logits."""
    shape = Shape.of(ModelConfig(arch="gpt2", hidden_size=768, num_layers=12, num_heads=12), 50257, 2048)
    s, b, h, a, layers = 2048, 4, 768, 12, 12
    logits = 4 * s * b * 50257
    eager = activation_bytes(shape, b, s, "bf16", checkpointing=False, eager=True)
    assert eager == pytest.approx(layers * s * b * h * (34 + 5 * a * s / h) + logits)
    assert activation_bytes(shape, b, s, "bf16", False, eager=False) == pytest.approx(layers * s * b * h * 34 + logits)
    recomputed = activation_bytes(shape, b, s, "bf16", checkpointing=True, eager=False)
    assert recomputed == pytest.approx(layers * 2 * s * b * h + s * b * h * 34 + logits)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
@pytest.mark.parametrize("world", [1, 2, 8, 32])
def test_a_higher_zero_stage_never_needs_more_memory(name, world):
    """Each stage moves one state from replicated to sharded, so ZeRO-0 ≥ 1 ≥ 2 and ZeRO-3 ≥ ZeRO-3+offload
    always. ZeRO-3 adds the gathered largest layer (4 bytes × its params), which on 1 GPU costs more than
    sharding saves: there, and only by that much, it exceeds ZeRO-2; from 8 GPUs on it never does."""
    config = load_config(example(name), ["train.micro_batch=1"])  # divides the global batch at every world size
    plan = make_plan(config, world, VOCAB[config.model.arch], 2048)
    totals = [plan.rows[Layout(stage)].total for stage in range(4)]
    assert totals[0] >= totals[1] >= totals[2]
    assert totals[3] >= plan.rows[Layout(3, offload=True)].total
    if world >= 8:
        assert totals[2] >= totals[3]
    if world == 1:
        assert totals[3] - totals[2] == 4 * plan.count.largest_layer
