"""`python -m trainer plan`: the analytic parameter count against real models, the memory model
against DeepSpeed's own estimators and the Korthikanti activation formula, every example config
planned on its intended cluster, and the up-front refusal of a config that cannot fit."""

from __future__ import annotations

import os
import shlex
from dataclasses import replace
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
    check_memory,
    count_params,
    make_plan,
    model_states,
)
from trainer.plan import flops_per_token as planned_flops
from trainer.plan import layer_activation_bytes
from trainer.plan_mesh import Mesh, _rank_memory, bubble_fraction, in_flight, plan_mesh, rank_params

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


def test_the_loops_memory_check_refuses_only_a_known_memory_size_it_exceeds():
    """On CPU no GPU memory is known: nothing is refused unless train.gpu_memory_gb gives one; 0 turns it off."""
    assert not torch.cuda.is_available()  # on a GPU the device's own memory is the default (that case is not run here)
    config = load_config(example("llama-8b-fsdp2"))
    check_memory(config, 8, 128256, 2048)
    for overrides in (["train.gpu_memory_gb=0"], ["train.gpu_memory_gb=24", "peft.method=lora"]):  # lora: plan counts full
        check_memory(load_config(example("llama-8b-fsdp2"), overrides), 8, 128256, 2048)  # training; it would refuse
    check_memory(load_config(example("llama-8b-fsdp2"), ["train.gpu_memory_gb=80"]), 32, 128256, 2048)
    tight = load_config(example("llama-8b-fsdp2"), ["train.gpu_memory_gb=24"])
    with pytest.raises(ConfigError, match=r"^memory check: FSDP2 on 8 GPUs needs ~\d+\.\d GiB per GPU, more than the 24 GiB "
                                          r"available.*; or give train.gpu_memory_gb \(0: no check\) if the estimate is wrong"):
        check_memory(tight, 8, 128256, 2048)
    with pytest.raises(ConfigError, match=r"'train.gpu_memory_gb' must be positive \(or 0: no memory check\), got -1"):
        load_config(example("llama-8b-fsdp2"), ["train.gpu_memory_gb=-1"])


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


# ---- device-mesh layouts (tp, pp, cp, HSDP) and the search ----

MESH_MODEL = ModelConfig(arch="llama", hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=2, tie_embeddings=False)


def tiny_llama(model_config: ModelConfig = MESH_MODEL, vocab: int = 96, seq_len: int = 32) -> torch.nn.Module:
    return build_model(Config(model=model_config), vocab, seq_len, eos_id=0, labels=[], seed=0)


def measured_rank_params(model: torch.nn.Module, tp: int, pp: int, rank: int) -> int:
    """Parameters pipeline rank `rank` of `pp` holds after a `tp`-way split, from the built model's own tensors:
    a stage takes its share of `model.layers.N`, the first the embedding, the last the final norm and head;
    every weight matrix divides by tp, the 1-D norms stay whole."""
    layers = len(transformer_blocks(model))
    mine = range(rank * layers // pp, (rank + 1) * layers // pp)
    total = 0
    for name, param in model.named_parameters():
        parts = name.split(".")
        if parts[1] == "layers":
            owner = int(parts[2]) in mine
        else:  # the embedding on the first stage, the final norm and lm_head on the last
            owner = rank == 0 if "embed" in name else rank == pp - 1
        if owner:
            total += param.numel() // tp if param.dim() == 2 else param.numel()
    return total


def test_rank_memory_matches_the_measured_parameter_and_adamw_bytes_of_a_real_model():
    """tp 1, pp 1: the plan's sharded params (4 B) and optimizer states (8 B) per parameter are the built model's
    fp32 parameter bytes and the bytes of AdamW's state after one real step (exp_avg, exp_avg_sq)."""
    model = tiny_llama()
    shape = Shape.of(MESH_MODEL, 96, 32)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.randint(0, 96, (2, 32)), labels=torch.randint(0, 96, (2, 32))).loss.backward()
    optimizer.step()
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    count = rank_params(shape, Mesh(), 0)
    layout = Layout(3, fsdp=True)
    params, _, states = model_states(layout, count, "fp32", 1)
    assert params - 4 * (count.root + count.block) == param_bytes  # less the gathered working set a plain model has not
    assert states == state_bytes
    for world in (2, 4):
        assert model_states(layout, count, "fp32", world)[2] == state_bytes / world


@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 1), (2, 2), (4, 4)])
def test_tensor_and_pipeline_splits_divide_the_real_models_parameters(tp, pp):
    model = tiny_llama()
    shape = Shape.of(MESH_MODEL, 96, 32)
    mesh = Mesh(tp=tp, pp=pp, microbatches=pp)
    for rank in range(pp):
        assert rank_params(shape, mesh, rank).total == measured_rank_params(model, tp, pp, rank)
    assert sum(rank_params(shape, Mesh(pp=pp, microbatches=pp), r).total for r in range(pp)) == count_params(shape).total


def test_data_parallel_mesh_is_the_fsdp2_row_of_the_table():
    config = load_config(example("llama-8b-fsdp2"))
    shape = Shape.of(config.model, 128256, 2048)
    mesh = Mesh.of(config, 32)
    assert (mesh.dp_shard, mesh.microbatches, mesh.rows) == (32, 4, 8)
    assert plan_mesh(shape, mesh, 2048, "bf16", 8).memory == make_plan(config, 32, 128256, 2048).rows[Layout(3, fsdp=True)]


def test_gradient_accumulation_keeps_fp32_unsharded_grads_under_fsdp2():
    count = example_count("llama-8b-fsdp2")
    one = model_states(Layout(3, fsdp=True), count, "bf16", 32, accumulation=1)
    four = model_states(Layout(3, fsdp=True), count, "bf16", 32, accumulation=4)
    assert four[1] - one[1] == 4 * count.total + 4 * count.total / 32 - (4 * count.total / 32 + 2 * max(count.root, count.block))


def test_fsdp2_without_resharding_plans_every_parameter_gathered():
    """engine.reshard_after_forward=false keeps each block gathered from its forward through the step's end."""
    config = load_config(example("llama-8b-fsdp2"))
    count = example_count("llama-8b-fsdp2")
    resharded = make_plan(config, 32, 128256, 2048).rows[Layout(3, fsdp=True)]
    config.engine.reshard_after_forward = False
    kept = make_plan(config, 32, 128256, 2048).rows[Layout(3, fsdp=True)]
    assert kept.params - resharded.params == 2 * (count.total - count.root - count.block)  # bf16 copies
    assert (kept.grads, kept.optimizer, kept.activations) == (resharded.grads, resharded.optimizer, resharded.activations)


def test_in_flight_micro_batches_and_bubble_follow_each_schedule():
    assert [in_flight(Mesh(pp=4, microbatches=8), r) for r in range(4)] == [4, 3, 2, 1]  # 1F1B
    assert [in_flight(Mesh(pp=4, microbatches=2), r) for r in range(4)] == [2, 2, 2, 1]
    assert in_flight(Mesh(pp=4, microbatches=8, schedule="gpipe"), 3) == 8
    interleaved = Mesh(pp=4, microbatches=8, schedule="interleaved_1f1b", stages_per_rank=2)
    # Korthikanti et al. §4.2.3: rank 0 holds L·(1 + (p − 1)/(p·v)) layers' activations, chunks of L/(p·v) layers
    assert in_flight(interleaved, 0) * 1 / 8 == pytest.approx(1 + 3 / 8)
    assert bubble_fraction(Mesh(pp=4, microbatches=8)) == pytest.approx(3 / 11)
    assert bubble_fraction(interleaved) == pytest.approx(3 / 19)
    assert bubble_fraction(Mesh()) == 0


def test_activations_divide_by_tp_and_cp_and_multiply_by_the_micro_batches_in_flight():
    shape = Shape.of(MESH_MODEL, 96, 32)
    base = plan_mesh(shape, Mesh(rows=4), 32, "bf16", 8).memory.activations
    split = plan_mesh(shape, Mesh(tp=2, cp=2, rows=4), 32, "bf16", 8).memory.activations
    assert split == pytest.approx(base / 4)
    first = plan_mesh(shape, Mesh(pp=2, microbatches=4, rows=4), 32, "bf16", 8)
    layer = layer_activation_bytes(shape, 4, 32, eager=False)
    assert _rank_memory(shape, first.mesh, 0, 32, "bf16", False, False).activations == pytest.approx(2 * 2 * layer)
    gpipe = replace(first.mesh, schedule="gpipe")
    assert _rank_memory(shape, gpipe, 0, 32, "bf16", False, False).activations == pytest.approx(4 * 2 * layer)


def test_communication_per_dimension_is_the_ring_volume_on_the_right_links():
    shape = Shape.of(MESH_MODEL, 96, 32)
    mesh = Mesh(dp_replicate=2, dp_shard=2, tp=2, pp=2, microbatches=4, rows=1)
    traffic = {item.dimension: item for item in plan_mesh(shape, mesh, 32, "bf16", gpus_per_node=4).traffic}
    assert set(traffic) == {"dp_shard", "dp_replicate", "tp", "pp"}
    assert [traffic[d].intra_node for d in ("tp", "dp_shard", "dp_replicate", "pp")] == [True, True, False, False]
    x = 32 * 64 * 2  # one micro-batch's hidden states in bf16
    layers_tp = 2 * 4 + 2  # two layers on each rank, 4 collectives each, + the embedding's or the head's 2
    assert traffic["tp"].bytes == pytest.approx(4 * layers_tp * 2 * (1 / 2) * x)
    assert traffic["pp"].bytes == pytest.approx(4 * 2 * x / 2)
    # HSDP all-reduces each rank's fp32 gradient shard (a half, dp_shard 2): 2·(2 − 1)/2 × 4 B × params / 2
    assert traffic["dp_replicate"].bytes == pytest.approx(max(rank_params(shape, mesh, r).total for r in (0, 1)) * 4 / 2)


def test_a_layout_that_does_not_make_the_world_is_refused_in_one_line():
    config = load_config(example("llama-8b-fsdp2"), ["parallel.tp=3"])
    match = r"^parallel: dp_replicate 1 × dp_shard -1 × cp 1 × tp 3 × pp 1 does not make the 32 GPUs"
    with pytest.raises(ConfigError, match=match):
        Mesh.of(config, 32)


def test_deepspeed_refuses_mesh_dimensions_in_one_line_pointing_to_fsdp2():
    with pytest.raises(ConfigError) as err:
        load_config(example("llama-8b-deepspeed"), ["parallel.tp=2", "parallel.dp_replicate=2"])
    assert str(err.value).endswith("parallel.dp_replicate=2, parallel.tp=2 needs the device-mesh engine; set engine.type=fsdp2")
    load_config(example("llama-8b-fsdp2"), ["parallel.tp=2", "parallel.pp=2"])


def test_plan_flags_set_the_mesh_and_print_its_memory_communication_and_bubble(capsys):
    argv = ["plan", "--config", str(example("llama-8b-fsdp2")), "--nodes", "4", "--vocab-size", "128256",
            "--tp", "4", "--pp", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "pp 2 × dp_shard 4 × tp 4 = 32 GPUs" in out and "pipeline 1f1b, 32 micro-batches, 1 in flight on rank 1" in out
    assert "bubble 3.0% of the step" in out  # 1 / (32 + 1)
    assert all(f"  {dim} " in out for dim in ("dp_shard", "tp", "pp"))
    assert main([*argv, "parallel.pp_schedule=gpipe"]) == 2  # all 32 micro-batches in flight
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "pp 2 × dp_shard 4 × tp 4 needs ~" in err[0] and "more than the 80 GiB available" in err[0]
    assert "activation_checkpointing" not in err[0]  # already on


def test_search_ranks_the_70b_layouts_that_fit_and_the_example_runs_the_best(capsys):
    argv = documented_command("llama-70b-fsdp2")
    assert "--search" in argv
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.split()[:2] == ["rep", "shard"])
    rows = [line.lstrip("* ").split() for line in out[header + 1:] if not line.startswith("best: ")][:10]
    assert out[header + 1].startswith("*") and len(rows) == 10
    for row in rows:
        assert int(row[3]) <= 8 and float(row[9]) <= 80  # tp inside a node; every layout shown fits
    times = [float(row[10]) for row in rows]
    assert all(later >= 0.98 * earlier for earlier, later in zip(times, times[1:]))  # fastest first, ties within 1%
    best = next(line for line in out if line.startswith("best: "))
    config = load_config(example("llama-70b-fsdp2"), best.split(" run it with ")[1].split())
    assert Mesh.of(config, 64) == Mesh.of(load_config(example("llama-70b-fsdp2")), 64)  # the example is the best layout
    assert any("vs the runner-up" in line for line in out)


def test_search_with_nothing_that_fits_is_refused_in_one_line(capsys):
    argv = [*documented_command("llama-70b-fsdp2"), "--gpu-mem-gb", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "layouts of 64 GPUs fits in 4 GiB per GPU" in err[0]


def test_fsdp2_on_two_processes_holds_the_planned_shard_optimizer_and_accumulated_grad_bytes():
    """Two gloo processes shard a real model with the FSDP2 engine and take two steps of two micro-batches
    (bench/plan_bench.py's worker): each rank's parameter shard, AdamW state and the unsharded gradients kept
    between micro-batches are, to the byte, the planned 4/2, 8/2 and 4 bytes per parameter."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_bench", EXAMPLES.parent / "bench" / "plan_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    small = ["model.hidden_size=64", "model.intermediate_size=192", "train.micro_batch=2"]
    ranks = bench.measure(2, small)
    config = load_config(None, bench.overrides(small))
    count = count_params(Shape.of(config.model, bench.VOCAB, bench.SEQ))
    assert len(ranks) == 2
    for rank in ranks:
        assert (rank["params"], rank["optimizer"], rank["accumulated_grads"]) == (4 * count.total / 2, 8 * count.total / 2,
                                                                                   4 * count.total)
