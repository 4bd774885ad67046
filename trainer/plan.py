"""`python -m trainer plan`: what a run costs before it starts, and `check_fits`, which refuses a
config whose selected engine cannot fit on the GPUs it will get (the loop runs it through `check_memory`).

    python -m trainer plan --config examples/llama-8b-deepspeed.yaml --nodes 4 --gpus-per-node 8

prints the parameter count, training FLOPs per token, tokens per step, gradient accumulation, a
throughput or MFU line, and the memory per GPU of every sharding layout; for FSDP2 also the device
mesh of `parallel.*` (trainer.plan_mesh: memory per pipeline rank, traffic per mesh dimension,
bubble, step time; `--search` ranks every layout that fits). Why analytic: an 8B model
cannot be instantiated on a login node, and the answer should come in seconds. Parameters are
counted module by module from the shape `trainer.models.build_model` builds; the unit tests hold the
count to real, meta-device and DeepSpeed-counted models.

Model states, bytes per parameter (Rajbhandari et al. 2020, "ZeRO", §3.1): mixed-precision Adam
keeps 16-bit params (2) and grads (2) and fp32 optimizer states (12: master weights, momentum,
variance); fp32 training keeps 4 + 4 + 8. N = nodes × gpus-per-node.

    ZeRO-0   nothing sharded                      ZeRO-2   + grads / N
    ZeRO-1   optimizer states / N                 ZeRO-3   + params / N, plus the largest layer's
                                                           16-bit params and grads while gathered
    +offload every sharded state lives on the CPU: ZeRO-1 the optimizer, ZeRO-2 also the grads,
             ZeRO-3 and FSDP2 also the params (as ds_configs/zero3_offload.json and FSDP2's
             CPUOffloadPolicy place them)
    FSDP2    sharded like ZeRO-3, but the sharded params are the fp32 master weights (params 4,
             grads 4, optimizer 8 bytes under bf16). Gathered in the compute dtype: the root unit
             (embeddings, final norm, head), which FSDP2 keeps unsharded from forward to backward,
             plus one block; and the unsharded grads of the larger of the two, or, with gradient
             accumulation, the fp32 unsharded grads of every parameter (see `model_states`).

The ZeRO-3 working set (4 bytes × the largest layer's parameters in bf16) is what DeepSpeed's own
`estimate_zero3_model_states_mem_needs` counts. Its estimators charge 18 bytes per parameter over N
where this counts 14 (ZeRO-2: 2 grads + 12 optimizer) and 16 (ZeRO-3): their ZeRO-2 comment itemises
a 4-byte fp32 copy of each rank's gradient partition, made at the optimizer step when activations
are already freed, so it is not added here; the tests pin both differences to the byte. Their
1.5 `additional_buffer_factor` applies to CPU memory only, which is not planned here.

Activations of one micro-batch (b rows of s tokens; h hidden, a heads, k kv heads, i MLP width, L
layers, V vocabulary), from Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", §4.1: a GPT block without recomputation stores s·b·h·(34 + 5·a·s/h) bytes in
16 bit — attention 11·sbh + 5·a·s²·b, MLP 19·sbh, two norms 4·sbh. Three adjustments, after which
GPT-2 with eager attention gets exactly the paper's formula back:
  - flash attention (the default assumption; `--attention eager` restores the term) never stores
    the a·s² scores, so 5·a·s/h goes. Hugging Face models run PyTorch SDPA, which takes a flash or
    memory-efficient kernel on A100/H100-class GPUs in bf16;
  - grouped-query attention stores K and V at k/a of Q's width: attention is 7 + 4·k/a;
  - the MLP stores its input (2) and a dropout mask (1) plus 4·i/h for GeLU's input and output,
    8·i/h for SwiGLU's gate, up, silu(gate) and their product (Llama keeps no dropout masks;
    counting them errs by 3·sbh per layer, on the safe side).
So per layer s·b·h·(14 + 4·k/a + m·i/h), m = 4 (GPT-2) or 8 (Llama). With activation
checkpointing (engine.activation_checkpointing: full; selective is counted as none) a layer keeps
only its 16-bit input, 2·sbh, and one layer's full set is live again while it is recomputed. On top:
the fp32 logits the loss reads, 4·s·b·V, often the largest single tensor. fp32 training doubles the
block terms. Not counted: the CUDA context, NCCL and allocator buffers, fragmentation — leave a few
GiB of --gpu-memory-gb for them.

FLOPs per token are `trainer.models.flops_per_token`'s, 6·N + 12·L·H·Q·T (PaLM, Chowdhery et al.
2022, appendix B; N without the input embedding), so plan's MFU is the training loop's:
FLOPs/token × tokens/s ÷ (peak FLOP/s × GPUs).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from data_tools.manifest import ManifestError, load_manifest
from trainer.config import Config, ConfigError, EngineConfig, FreezeConfig, ModelConfig, load_config
from trainer.models import _llama_ffn

GIB = 2**30
DEFAULT_SEQ_LEN = 2048
SHARDED_FROM_STAGE = (3, 2, 1)  # params, grads, optimizer states: the ZeRO stage that shards each


@dataclass(frozen=True)
class Shape:
    """The sizes `build_model` uses for a config, with the arch defaults filled in."""

    arch: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    positions: int  # GPT-2's learned position table, sized to seq_len by build_model
    tied: bool

    @classmethod
    def of(cls, model: ModelConfig, vocab: int, seq_len: int) -> Shape:
        if model.pretrained:
            raise ConfigError(f"model.pretrained {model.pretrained}: plan counts parameters from model.arch and its sizes only")
        if model.hidden_size % model.num_heads:
            raise ConfigError(f"model.hidden_size {model.hidden_size} is not divisible by model.num_heads {model.num_heads}")
        llama = model.arch == "llama"
        return cls(
            arch=model.arch,
            vocab=vocab,
            hidden=model.hidden_size,
            layers=model.num_layers,
            heads=model.num_heads,
            kv_heads=(model.num_kv_heads or model.num_heads) if llama else model.num_heads,  # GPT-2 has no GQA
            intermediate=model.intermediate_size or (_llama_ffn(model.hidden_size) if llama else 4 * model.hidden_size),
            positions=seq_len,
            tied=model.tie_embeddings,
        )


@dataclass(frozen=True)
class ParamCount:
    total: int  # a tied head counted once, as model.parameters() does
    embedding: int  # the input token embedding, which flops_per_token leaves out of N
    block: int  # one transformer block: FSDP2's unit of gathering
    root: int  # everything outside the blocks: FSDP2's root unit
    largest_layer: int  # the largest module owning parameters: what DeepSpeed's ZeRO-3 estimate gathers at once


def _block_modules(shape: Shape) -> list[int]:
    """Parameters of each module of one block that owns any, as Hugging Face builds it."""
    h, i = shape.hidden, shape.intermediate
    if shape.arch == "llama":
        kv = h // shape.heads * shape.kv_heads  # no biases: attention_bias and mlp_bias default off
        return [h * h, h * kv, h * kv, h * h, h * i, h * i, i * h, h, h]  # q k v o, gate up down, 2 RMSNorms
    return [2 * h, h * 3 * h + 3 * h, h * h + h, 2 * h, h * i + i, i * h + h]  # ln_1, c_attn, c_proj, ln_2, c_fc, c_proj


def _root_modules(shape: Shape) -> list[int]:
    """Token (and GPT-2 position) embeddings, the final norm, and the head unless it is the embedding."""
    h, embed = shape.hidden, shape.vocab * shape.hidden
    modules = [embed, h] if shape.arch == "llama" else [embed, shape.positions * h, 2 * h]
    return modules if shape.tied else [*modules, embed]


def count_params(shape: Shape) -> ParamCount:
    block, root = _block_modules(shape), _root_modules(shape)
    return ParamCount(
        total=shape.layers * sum(block) + sum(root),
        embedding=shape.vocab * shape.hidden,
        block=sum(block),
        root=sum(root),
        largest_layer=max(block + root),
    )


def flops_per_token(shape: Shape, count: ParamCount, seq_len: int) -> float:
    """`trainer.models.flops_per_token` without a model: heads × head_dim is the hidden size."""
    return 6 * (count.total - count.embedding) + 12 * shape.layers * shape.hidden * seq_len


@dataclass(frozen=True)
class Layout:
    """Where model states live. `stage` is the ZeRO stage: how many of optimizer states, grads and
    params (in that order) are sharded; FSDP2 shards all three."""

    stage: int
    offload: bool = False
    fsdp: bool = False

    @property
    def name(self) -> str:
        return ("FSDP2" if self.fsdp else f"ZeRO-{self.stage}") + ("+offload" if self.offload else "")

    @classmethod
    def of(cls, engine: EngineConfig) -> Layout:
        """The layout a config's engine section selects."""
        offload = engine.offload == "cpu"
        return cls(3, offload, fsdp=True) if engine.type == "fsdp2" else cls(engine.zero_stage, offload)


TABLE = (*(Layout(stage) for stage in range(4)), Layout(3, offload=True), Layout(3, fsdp=True))


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU at the peak of a micro-batch's backward."""

    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def _state_bytes(layout: Layout, precision: str) -> tuple[int, int, int]:
    """Bytes per parameter of (params, grads, optimizer states) where they are kept between steps."""
    if precision == "fp32" or layout.fsdp:
        return 4, 4, 8  # FSDP2 under bf16: fp32 sharded params are the master weights, grads reduce to fp32
    return 2, 2, 12


def model_states(layout: Layout, count: ParamCount, precision: str, world: int, accumulation: int = 1,
                 kept_gathered: bool = False) -> tuple[float, float, float]:
    """(params, grads, optimizer) bytes on each GPU: replicated, sharded over `world`, or on the CPU.

    FSDP2 skips the reduce-scatter on all but the last of `accumulation` > 1 micro-batches
    (`set_requires_gradient_sync(False)`, the FSDP2 engine's and torch.distributed.pipelining's
    gradient accumulation) and keeps the unsharded gradients meanwhile, in fp32 (its reduce dtype):
    4 bytes × every parameter of the rank. `kept_gathered`: the parameters are not resharded between the
    step's first forward and its last backward, so all of them are gathered at once: a pipeline stage (not
    resharded after backward until its last micro-batch) or `engine.reshard_after_forward: false`."""
    states = []
    for sharded_from, per_param in zip(SHARDED_FROM_STAGE, _state_bytes(layout, precision)):
        sharded = layout.stage >= sharded_from
        states.append(0.0 if sharded and layout.offload else per_param * count.total / (world if sharded else 1))
    params, grads, optimizer = states
    if layout.stage == 3:
        compute = 2 if precision == "bf16" else 4
        if not layout.fsdp:
            params, grads = params + compute * count.largest_layer, grads + compute * count.largest_layer
        else:
            params += compute * (count.total if kept_gathered else count.root + count.block)
            grads += 4 * count.total if accumulation > 1 else compute * max(count.root, count.block)
    return params, grads, optimizer


def layer_activation_bytes(shape: Shape, micro_batch: int, seq_len: int, eager: bool, tp: int = 1) -> float:
    """What one layer stores for backward, in 16 bit (Korthikanti et al., generalised as the module docstring
    says); tensor parallelism with sequence-parallel norms divides every term by `tp` (their Table 2)."""
    sbh = seq_len * micro_batch * shape.hidden
    mlp = 8 if shape.arch == "llama" else 4
    layer = sbh * (14 + 4 * shape.kv_heads / shape.heads + mlp * shape.intermediate / shape.hidden)
    if eager:
        layer += 5 * shape.heads * seq_len**2 * micro_batch
    return layer / tp


def activation_bytes(shape: Shape, micro_batch: int, seq_len: int, precision: str, checkpointing: bool, eager: bool) -> float:
    """One micro-batch's activations at the peak of backward."""
    sbh = seq_len * micro_batch * shape.hidden
    layer = layer_activation_bytes(shape, micro_batch, seq_len, eager)
    blocks = shape.layers * 2 * sbh + layer if checkpointing else shape.layers * layer
    logits = 4 * seq_len * micro_batch * shape.vocab
    return blocks * (2 if precision == "fp32" else 1) + logits


@dataclass(frozen=True)
class Plan:
    shape: Shape
    count: ParamCount
    flops_per_token: float
    seq_len: int
    world: int
    accumulation: int
    selected: Layout
    rows: dict[Layout, Memory]  # TABLE's layouts, then the selected one if it is not among them


def make_plan(config: Config, world: int, vocab: int, seq_len: int, eager_attention: bool = False) -> Plan:
    accumulation = config.train.accumulation(world)
    shape = Shape.of(config.model, vocab, seq_len)
    count = count_params(shape)
    selected = Layout.of(config.engine)
    rows = {}
    for layout in dict.fromkeys((*TABLE, selected)):
        checkpointing = config.engine.activation_checkpointing == "full"
        activations = activation_bytes(shape, config.train.micro_batch, seq_len, config.precision, checkpointing, eager_attention)
        kept_gathered = layout == selected and layout.fsdp and config.engine.reshard_after_forward is False
        rows[layout] = Memory(*model_states(layout, count, config.precision, world, accumulation, kept_gathered), activations)
    return Plan(shape, count, flops_per_token(shape, count, seq_len), seq_len, world, accumulation, selected, rows)


def data_shape(config: Config, vocab_size: int | None = None, seq_len: int | None = None) -> tuple[int, int, str | None]:
    """(vocabulary, seq_len, note): given values win, then the first data.train manifest. Without a
    manifest the vocabulary must be given (nothing in the model section knows it) and seq_len
    defaults to DEFAULT_SEQ_LEN; the note says so."""
    if vocab_size and seq_len:
        return vocab_size, seq_len, None
    path = config.data.train_sources()[0].path
    try:
        manifest = load_manifest(path)
    except ManifestError as err:
        if vocab_size is None:
            raise ConfigError(
                f"data.train: {err}; to plan without it, pass --vocab-size (and --seq-len, default {DEFAULT_SEQ_LEN})"
            ) from None
        seq_len = seq_len or DEFAULT_SEQ_LEN
        return vocab_size, seq_len, f"note: no manifest at {path}; planning for vocabulary {vocab_size}, seq_len {seq_len}"
    return vocab_size or manifest.tokenizer.vocab_size, seq_len or manifest.seq_len, None


def _remedies(config: Config, layout: Layout) -> str:
    """The changes that lower the selected layout's memory, as config keys."""
    options = ["more GPUs"] if layout.stage else []
    if not layout.fsdp and layout.stage < 3:
        options.append("a higher engine.zero_stage")
    if config.engine.activation_checkpointing != "full":
        options.append("engine.activation_checkpointing: full")
    if layout.stage and not layout.offload:
        options.append("engine.offload: cpu")
    if config.train.micro_batch > 1:
        options.append("a smaller train.micro_batch")
    return ", ".join(options[:-1]) + f" or {options[-1]}" if len(options) > 1 else options[0]


def _refuse_if_too_big(plan: Plan, config: Config, gpu_memory_gb: float, where: str) -> None:
    need = plan.rows[plan.selected].total / GIB
    if need <= gpu_memory_gb:
        return
    fitting = [layout for layout, memory in plan.rows.items() if memory.total / GIB <= gpu_memory_gb]
    best = min(fitting, key=lambda layout: plan.rows[layout].total, default=None)
    alternative = f" ({best.name} would need {plan.rows[best].total / GIB:.1f})" if best else ""
    gpus = f"{plan.world} GPU{'s' if plan.world > 1 else ''}"
    raise ConfigError(
        f"{where}: {plan.selected.name} on {gpus} needs ~{need:.1f} GiB per GPU, more than the {gpu_memory_gb:g} GiB "
        f"available{alternative}; use {_remedies(config, plan.selected)}"
    )


def check_fits(config: Config, world_size: int, gpu_memory_gb: float, *, vocab_size: int | None = None,
               seq_len: int | None = None, where: str = "config") -> None:
    """Raise ConfigError (one line: the estimate, the memory available, what to change) when the
    config's engine would not fit; the vocabulary and seq_len come from the data manifest unless given."""
    vocab, seq, _ = data_shape(config, vocab_size, seq_len)
    _refuse_if_too_big(make_plan(config, world_size, vocab, seq), config, gpu_memory_gb, where)


PLANNED_ARCHS = ("llama", "gpt2")  # the decoders `Shape` counts module by module
MEMORY_KEY = "train.gpu_memory_gb"


def check_memory(config: Config, world_size: int, vocab_size: int, seq_len: int) -> None:
    """`check_fits` as the loop runs it before building the model: against `train.gpu_memory_gb`, else
    the CUDA device's total memory. Why here too: a run that cannot fit should stop in one line at
    start, not in an out-of-memory error after the model, the engine and the first batch are built.

    On CPU no memory size is known, so nothing is refused unless the key is set; 0 turns the check
    off. Only what plan estimates is checked: llama and gpt2 built from sizes, every parameter
    trained (PEFT and freezing need less), data-parallel layouts (a tp/pp/cp/HSDP mesh is `plan`'s
    own table, `trainer.plan_mesh`).
    """
    memory = config.train.gpu_memory_gb
    if memory is None and torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    parallel = config.parallel
    planned = (not config.model.pretrained and config.model.arch in PLANNED_ARCHS and config.peft.method == "none"
               and config.freeze == FreezeConfig() and parallel.dp_replicate * parallel.cp * parallel.tp * parallel.pp == 1)
    if not memory or not planned:
        return
    try:
        check_fits(config, world_size, memory, vocab_size=vocab_size, seq_len=seq_len, where="memory check")
    except ConfigError as err:
        raise ConfigError(f"{err}; or give {MEMORY_KEY} (0: no check) if the estimate is wrong for this device") from None


def _gib(value: float) -> str:
    return f"{value / GIB:9.2f}"


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f} B)" if n >= 1e9 else f"{n:,} ({n / 1e6:.1f} M)"


def render(plan: Plan, config: Config, gpu_memory_gb: float, throughput: str, eager_attention: bool) -> str:
    count, train = plan.count, config.train
    tokens = train.global_batch * plan.seq_len
    lines = [
        f"parameters       {_count(count.total)}; one block {_count(count.block)}, largest layer {_count(count.largest_layer)}",
        f"FLOPs per token  {plan.flops_per_token:.4g}  (6·N + 12·L·H·Q·T, N without the input embedding)",
        f"tokens per step  {tokens:,} = {train.global_batch} rows × {plan.seq_len}; micro_batch {train.micro_batch} "
        f"× {plan.world} GPUs × {plan.accumulation} accumulation steps",
        f"throughput       {throughput}",
        f"memory per GPU in GiB ({config.precision} {'mixed-precision ' if config.precision == 'bf16' else ''}Adam, "
        f"{'eager' if eager_attention else 'flash'} attention, activations of one micro-batch"
        f"{', recomputed' if config.engine.activation_checkpointing == 'full' else ''}; "
        f"fits: total <= {gpu_memory_gb:g} GiB)",
        f"  {'layout':<15}{'params':>9}{'grads':>9}{'optimizer':>10}{'activations':>12}{'total':>9}  fits",
    ]
    for layout, memory in plan.rows.items():
        mark, tail = ("*", "   <- selected") if layout == plan.selected else (" ", "")
        fits = "yes" if memory.total / GIB <= gpu_memory_gb else "no"
        lines.append(
            f"{mark} {layout.name:<15}{_gib(memory.params)}{_gib(memory.grads)}{_gib(memory.optimizer):>10}"
            f"{_gib(memory.activations):>12}{_gib(memory.total)}  {fits:<4}{tail}".rstrip()
        )
    return "\n".join(lines)


def _throughput(plan: Plan, config: Config, peak_tflops: float, device: str, tokens_per_s: float | None, mfu: float) -> str:
    """MFU at a measured tokens/s, or tokens/s and step time at an assumed MFU."""
    peak = peak_tflops * 1e12 * plan.world
    where = f"{device}, {peak_tflops:g} TFLOP/s per GPU"
    if tokens_per_s is not None:
        return f"MFU {plan.flops_per_token * tokens_per_s / peak:.1%} at {tokens_per_s:,.0f} tokens/s ({where})"
    rate = mfu * peak / plan.flops_per_token
    tokens = config.train.global_batch * plan.seq_len
    return f"~{rate:,.0f} tokens/s, {tokens / rate:.1f} s per step at an assumed {mfu:.0%} MFU ({where})"


def _parser(peak_tflops: dict[str, float]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer plan", description="FLOPs, tokens and memory per GPU of a run")
    parser.add_argument("--config", required=True, help="run config YAML (see examples/)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, help="default: the data.train manifest's tokenizer")
    parser.add_argument("--seq-len", type=int, help=f"default: the data.train manifest's, else {DEFAULT_SEQ_LEN}")
    parser.add_argument("--gpu-memory-gb", "--gpu-mem-gb", type=float, default=80.0,
                        help="per GPU, in GiB (an '80 GB' H100 has 80 GiB)")
    parser.add_argument("--gpu", choices=sorted(peak_tflops), default="H100",
                        help="its bf16 dense peak is the MFU denominator, unless metrics.peak_tflops is set")
    parser.add_argument("--attention", choices=("flash", "eager"), default="flash", help="eager also stores the a·s² scores")
    speed = parser.add_mutually_exclusive_group()
    speed.add_argument("--tokens-per-s", type=float, help="measured throughput, all GPUs together: print its MFU")
    speed.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the throughput line and step times (default 0.4)")
    mesh = parser.add_argument_group("device-mesh layout (engine.type fsdp2): the same as parallel.<key>=N overrides")
    for flag in MESH_FLAGS:
        mesh.add_argument(f"--{flag.replace('_', '-')}", type=int, metavar="N")
    mesh.add_argument("--search", action="store_true", help="rank every layout of the GPUs that fits by estimated step time")
    mesh.add_argument("--top", type=int, default=10, help="--search: layouts shown (default 10)")
    mesh.add_argument("--intra-node-gbps", type=float, default=450.0, help="GB/s per GPU one way inside a node (NVLink)")
    mesh.add_argument("--inter-node-gbps", type=float, default=50.0, help="GB/s per GPU across nodes (400 Gb/s InfiniBand)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, as for training")
    return parser


MESH_FLAGS = ("tp", "pp", "cp", "dp_replicate", "dp_shard")


def main(argv: list[str]) -> int:
    from trainer.metrics import PEAK_TFLOPS
    from trainer import plan_mesh  # builds on this module's counts
    from trainer.seq_len_schedule import KEY as WARMUP_KEY, seq_len_schedule

    parser = _parser(PEAK_TFLOPS)
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        parser.error("--nodes and --gpus-per-node must be at least 1")

    flags = [f"parallel.{key}={getattr(args, key)}" for key in MESH_FLAGS if getattr(args, key) is not None]
    config = load_config(args.config, [*args.overrides, *flags])
    vocab, seq_len, note = data_shape(config, args.vocab_size, args.seq_len)
    eager = args.attention == "eager"
    world = args.nodes * args.gpus_per_node
    configured = config.metrics.peak_tflops
    peak, device = (configured, "metrics.peak_tflops") if configured else (PEAK_TFLOPS[args.gpu], args.gpu)
    hardware = plan_mesh.Hardware(peak, args.mfu, args.intra_node_gbps, args.inter_node_gbps, args.gpus_per_node)
    shape = Shape.of(config.model, vocab, seq_len)
    header = (f"plan for {args.config}: {shape.arch}, vocabulary {vocab}, seq_len {seq_len}, "
              f"{args.nodes} × {args.gpus_per_node} = {world} GPUs")
    warmup = seq_len_schedule(config, seq_len)  # refused here as at the start of the run
    if config.data.seq_len_schedule:  # shorter rows need less memory (trainer.seq_len_schedule): planned at the longest
        header += (f"\n{WARMUP_KEY}: {warmup.describe()}; memory and FLOPs per token below are at the longest rows, "
                   f"{seq_len} tokens")
    if args.search:
        ranked, considered = plan_mesh.search(shape, config, world, seq_len, hardware, args.gpu_memory_gb, eager)
        if not ranked:
            raise ConfigError(f"{args.config}: none of the {considered} layouts of {world} GPUs fits in "
                              f"{args.gpu_memory_gb:g} GiB per GPU; use more GPUs, engine.offload: cpu or a shorter seq_len")
        table = plan_mesh.render_search(ranked, considered, hardware, args.gpu_memory_gb, args.top)
        print("\n".join([*filter(None, [note]), header, table]))
        return 0
    mesh = plan_mesh.Mesh.of(config, world) if config.engine.type == "fsdp2" else None
    if mesh is not None:
        offload = config.engine.offload == "cpu"
        layout = plan_mesh.plan_mesh(shape, mesh, seq_len, config.precision, args.gpus_per_node, offload, eager)
    if mesh is not None and not mesh.data_parallel_only:
        need = layout.memory.total / GIB
        if need > args.gpu_memory_gb:
            remedies = [] if mesh.checkpointing else ["engine.activation_checkpointing: full"]
            remedies += ["a smaller train.micro_batch"] if mesh.rows > 1 else []
            remedies += ["parallel.pp_schedule 1f1b"] if mesh.schedule == "gpipe" and mesh.pp > 1 else []
            remedies.append("a larger parallel.tp or pp")
            raise ConfigError(f"{args.config}: {mesh.label()} needs ~{need:.1f} GiB per GPU, more than the "
                              f"{args.gpu_memory_gb:g} GiB available; use {', '.join(remedies)} or `plan --search`")
        time = plan_mesh.step_time(layout, shape, seq_len, hardware)
        count = count_params(shape)
        print("\n".join([*filter(None, [note]), header, f"parameters       {_count(count.total)}",
                         f"FLOPs per token  {flops_per_token(shape, count, seq_len):.4g}",
                         plan_mesh.render_plan(layout, time, args.gpu_memory_gb)]))
        return 0
    plan = make_plan(config, world, vocab, seq_len, eager)
    _refuse_if_too_big(plan, config, args.gpu_memory_gb, args.config)
    if note:
        print(note)
    print(header)
    print(render(plan, config, args.gpu_memory_gb, _throughput(plan, config, peak, device, args.tokens_per_s, args.mfu), eager))
    if mesh is not None:
        print(plan_mesh.render_plan(layout, plan_mesh.step_time(layout, shape, seq_len, hardware), args.gpu_memory_gb))
    return 0
