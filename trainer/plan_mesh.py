"""What one device-mesh layout of the FSDP2 engine costs per GPU (memory, communication, pipeline
bubble, step time), and the search over layouts behind `python -m trainer plan --search`.

A layout is dp_replicate × dp_shard × cp × tp × pp = world, ordered as torchtitan orders its mesh
(pp outermost, tp innermost), so a dimension's peers lie inside one node when it and every
dimension inside it fit the GPUs of a node. Symbols: s tokens per row, b rows per micro-batch, h
hidden, a heads, k kv heads, V vocabulary, L layers, t = tp, c = cp, p = pp, v = stages per rank,
m micro-batches per step, n = dp_shard × cp (FSDP shards over both, as torchtitan's dp_shard_cp).

Memory of pipeline rank r (the table shows the fullest rank):
  - model states: `trainer.plan.model_states` (FSDP2 row) for the rank's own parameters: its
    layers (L/(p·v) per virtual stage, rank r holding stages r, r+p, …), the first rank the
    embeddings, the last the final norm and head (a tied head is a copy there once p > 1); every
    matrix split over t (column/row-wise, vocab-parallel embedding and head), norms and row-wise
    biases replicated; sharded over n, replicated over dp_replicate (HSDP).
  - activations of one micro-batch and layer: `trainer.plan.layer_activation_bytes` with s/c
    tokens per rank; with sequence parallelism (always on with TP here) every term divides by t
    (Korthikanti et al. 2022, Table 2: sbh·(34/t + 5as/(ht)); without SP 10·sbh of norm and
    dropout activations would stay whole). Checkpointing keeps the 2·sbh/t block inputs.
  - in-flight micro-batches on rank r (each holding its rank's layers' activations): GPipe m
    (every forward before any backward); 1F1B min(p − r, m) (Narayanan et al. 2021, §2.2: at most
    p on the first stage); interleaved 1F1B min(2·(p − r − 1) + (v − 1)·p + 1, m·v) chunks of
    L/(p·v) layers (Megatron-LM's warm-up count; on rank 0 that is Korthikanti et al. §4.2.3's
    L·(1 + (p − 1)/(p·v)) layers); looped BFS m·v (every chunk's forwards before its backwards).
    The fp32 logits 4·s·b·V/(t·c) live on the last rank, one micro-batch at a time, all m under
    GPipe and looped BFS.

Pipeline bubble, as a fraction of the step: (p − 1)/(v·m + p − 1), i.e. (p − 1)/(v·m) of the
compute time (Narayanan et al. 2021, §2.2 and §2.2.2: interleaving divides it by v).

Communication, bytes each GPU sends per step, ring collectives (an all-gather or reduce-scatter of
S bytes over g ranks sends (g − 1)/g·S, an all-reduce twice that); X = b·(s/c)·h·2 bytes, one
micro-batch's hidden states in bf16:
  - dp_shard (FSDP, group n): all-gather of the rank's bf16 parameters before each forward and
    backward (2 per micro-batch; pipelined, the warm-up forwards and the first backward only, the
    stage stays gathered after that), one fp32 reduce-scatter of its gradients per step.
  - dp_replicate (HSDP): all-reduce of the reduce-scattered fp32 gradient shard, once per step.
  - tp: per layer and micro-batch, Megatron's two all-reduces of X in forward and two in backward
    (Shoeybi et al. 2019, §3); with SP each is an all-gather + reduce-scatter of the same volume
    (Korthikanti et al. §4.2.2); recomputation repeats the forward's two; the embedding's and the
    head's input add one each way. The vocab-parallel loss's s·b max/sum exchange is not counted.
  - pp: each virtual-stage boundary sends X/t forward and its gradient back per micro-batch; with tied
    embeddings the first and last rank also all-reduce the embedding's fp32 gradient shard, 4·V·h/(t·n), once a step.
  - cp: ring attention (torch.distributed.tensor.experimental.context_parallel) passes each rank's
    K and V, 2·b·(s/c)·h·k/(a·t)·2 bytes, c − 1 times per layer in forward; backward is counted as
    twice that (K, V and their gradients go round), recomputation adds a forward.

Step time = compute + bubble + exposed communication. Compute: FLOPs per token × tokens per step
/ (world × peak × MFU), + 1/3 with recomputation (one more forward). TP collectives and PP sends sit
on the critical path (no asynchronous TP); FSDP, HSDP and the CP ring overlap with compute and are
exposed only beyond it (FSDP2 prefetches the next block's all-gather; the ring overlaps with
attention). Bandwidth per GPU: intra-node (NVLink, ~450 GB/s one way on H100) when a dimension's
group lies in one node, else inter-node (~50 GB/s: one 400 Gb/s NIC per GPU).

What is approximated, honestly: the same MFU for every layout (small per-GPU matmuls under large
t, and small micro-batches, run less efficiently in practice); ring algorithms at the nominal
bandwidth, no congestion and no latency term (which favours many small PP/CP messages); embedding
and head FLOPs spread evenly over stages; uneven layer splits take the fuller stage; CP's attention
load balance assumed perfect. Memory leaves out the CUDA context, NCCL buffers and fragmentation
(a few GiB). torchtitan's docs (docs/composability.md, the "TorchTitan" paper, Liang et al. 2024)
describe the same composition of FSDP2, TP/SP, PP and CP that this models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from trainer.config import Config, ConfigError
from trainer.parallel.mesh import MULTI_STAGE
from trainer.plan import GIB, Layout, Memory, ParamCount, Shape, count_params, flops_per_token, layer_activation_bytes
from trainer.plan import model_states

TIE = 0.01  # step times this close count as equal: the estimate is not finer than that
SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")
DIMENSIONS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # outermost to innermost, as torchtitan builds its mesh


@dataclass(frozen=True)
class Mesh:
    """One layout: the mesh, the pipeline schedule, micro-batching and recomputation."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    schedule: str = "1f1b"
    stages_per_rank: int = 1  # v: virtual stages per pipeline rank (interleaved schedules)
    microbatches: int = 1  # m: per step and data-parallel rank (the gradient accumulation steps)
    rows: int = 1  # b: rows per micro-batch
    checkpointing: bool = False

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp * self.pp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def data_parallel_only(self) -> bool:
        return self.world == self.dp_shard

    @property
    def virtual_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @property
    def splits(self) -> int:
        """How many model-splitting dimensions (cp, tp, pp) are in use: a tie goes to the simpler layout."""
        return (self.cp > 1) + (self.tp > 1) + (self.pp > 1)

    def label(self) -> str:
        return " × ".join(f"{dim} {getattr(self, dim)}" for dim in DIMENSIONS if getattr(self, dim) > 1 or dim == "dp_shard")

    @classmethod
    def of(cls, config: Config, world: int) -> Mesh:
        """The layout `parallel.*`, `train.*` and `engine.activation_checkpointing` give on `world` GPUs."""
        par, train = config.parallel, config.train
        others = par.dp_replicate * par.cp * par.tp * par.pp
        dp_shard = world // others if par.dp_shard == -1 else par.dp_shard
        if world % others or others * dp_shard != world:
            raise ConfigError(f"parallel: dp_replicate {par.dp_replicate} × dp_shard {par.dp_shard} × cp {par.cp} × "
                              f"tp {par.tp} × pp {par.pp} does not make the {world} GPUs; change parallel.* or the GPU count")
        dp = par.dp_replicate * dp_shard
        microbatches = par.pp_microbatches or train.accumulation(dp)
        if train.global_batch % (dp * microbatches) or not microbatches:
            raise ConfigError(f"train.global_batch {train.global_batch} must be a multiple of the data-parallel size {dp} × "
                              f"micro-batches {microbatches}; change train.micro_batch or parallel.pp_microbatches")
        stages = par.pp_stages_per_rank if par.pp_schedule in MULTI_STAGE else 1
        return cls(par.dp_replicate, dp_shard, par.cp, par.tp, par.pp, par.pp_schedule, stages, microbatches,
                   train.global_batch // (dp * microbatches), config.engine.activation_checkpointing == "full")

    def overrides(self) -> str:
        """The dotted keys that select this layout in a run config."""
        keys = [f"parallel.{dim}={getattr(self, dim)}" for dim in reversed(DIMENSIONS)]
        if self.pp > 1:
            keys += [f"parallel.pp_schedule={self.schedule}", f"parallel.pp_microbatches={self.microbatches}"]
            keys += [f"parallel.pp_stages_per_rank={self.stages_per_rank}"] if self.stages_per_rank > 1 else []
        keys += [f"train.micro_batch={self.rows}", f"engine.activation_checkpointing={'full' if self.checkpointing else 'none'}"]
        return " ".join(keys)


def _tp_replicated(shape: Shape) -> int:
    """Parameters of one block that tensor parallelism does not split: norms and row-parallel biases."""
    return 2 * shape.hidden if shape.arch == "llama" else 6 * shape.hidden  # GPT-2: two LayerNorms, two c_proj biases


def layers_of_rank(shape: Shape, mesh: Mesh, rank: int) -> int:
    """Layers on pipeline rank `rank`: virtual stage j holds L // S (+1 for the first L % S), rank r stages r, r+p, …"""
    stages = mesh.virtual_stages
    return sum(shape.layers // stages + (j < shape.layers % stages) for j in range(rank, stages, mesh.pp))


def rank_params(shape: Shape, mesh: Mesh, rank: int) -> ParamCount:
    """The parameters pipeline rank `rank` holds, after the tensor-parallel split (before FSDP shards them)."""
    t, full = mesh.tp, count_params(shape)
    kept = _tp_replicated(shape)
    block = (full.block - kept) // t + kept
    embed = shape.vocab * shape.hidden // t
    first = embed + (0 if shape.arch == "llama" else shape.positions * shape.hidden)
    last = (2 if shape.arch == "gpt2" else 1) * shape.hidden + (embed if not shape.tied or mesh.pp > 1 else 0)
    root = (first if rank == 0 else 0) + (last if rank == mesh.pp - 1 else 0)
    total = layers_of_rank(shape, mesh, rank) * block + root
    return ParamCount(total=total, embedding=embed if rank == 0 else 0, block=block, root=root, largest_layer=max(block, root))


def in_flight(mesh: Mesh, rank: int) -> int:
    """Micro-batch chunks (a chunk: one virtual stage's layers) whose activations rank `rank` holds at its peak."""
    p, m, v = mesh.pp, mesh.microbatches, mesh.stages_per_rank
    if p == 1:
        return 1
    if mesh.schedule in ("gpipe", "looped_bfs"):
        return m * v
    if mesh.schedule == "1f1b":
        return min(p - rank, m)
    return min(2 * (p - rank - 1) + (v - 1) * p + 1, m * v)


def bubble_fraction(mesh: Mesh) -> float:
    """Share of the step a pipeline rank idles: (p − 1)/(v·m + p − 1)."""
    return (mesh.pp - 1) / (mesh.stages_per_rank * mesh.microbatches + mesh.pp - 1)


@dataclass(frozen=True)
class Traffic:
    """Bytes one GPU sends per step over one mesh dimension."""

    dimension: str
    group: int  # ranks in the collective (or 2 for pipeline sends)
    what: str
    bytes: float
    intra_node: bool
    overlapped: bool  # hidden behind compute up to the compute time


@dataclass(frozen=True)
class MeshPlan:
    mesh: Mesh
    rank: int  # the pipeline rank with the most memory, whose numbers these are
    memory: Memory
    in_flight: int
    bubble: float
    traffic: tuple[Traffic, ...]


def _rank_memory(shape: Shape, mesh: Mesh, rank: int, seq_len: int, precision: str, offload: bool, eager: bool) -> Memory:
    count = rank_params(shape, mesh, rank)
    states = model_states(Layout(3, offload, fsdp=True), count, precision, mesh.dp_shard * mesh.cp, mesh.microbatches,
                          kept_gathered=mesh.pp > 1)
    layer = layer_activation_bytes(shape, mesh.rows, seq_len // mesh.cp, eager, mesh.tp)
    chunk_layers = layers_of_rank(shape, mesh, rank) / mesh.stages_per_rank
    held = in_flight(mesh, rank) * chunk_layers
    blocks = held * 2 * mesh.rows * seq_len // mesh.cp * shape.hidden / mesh.tp + layer if mesh.checkpointing else held * layer
    every_forward_first = mesh.schedule in ("gpipe", "looped_bfs") and mesh.pp > 1
    logits_live = (mesh.microbatches if every_forward_first else 1) if rank == mesh.pp - 1 else 0
    logits = logits_live * 4 * mesh.rows * seq_len // mesh.cp * shape.vocab / mesh.tp
    return Memory(*states, blocks * (2 if precision == "fp32" else 1) + logits)


def _span(mesh: Mesh, dimension: str) -> int:
    """GPUs between the first and last peer of a group of `dimension`: it and every dimension inside it."""
    inner = DIMENSIONS[DIMENSIONS.index(dimension):]
    span = 1
    for dim in inner:
        span *= getattr(mesh, dim)
    return span


def _traffic(shape: Shape, mesh: Mesh, rank: int, seq_len: int, precision: str, gpus_per_node: int) -> list[Traffic]:
    count, compute = rank_params(shape, mesh, rank), 2 if precision == "bf16" else 4
    m, t, c, n = mesh.microbatches, mesh.tp, mesh.cp, mesh.dp_shard * mesh.cp
    hidden_states = mesh.rows * seq_len / c * shape.hidden * compute
    layers, last, first = layers_of_rank(shape, mesh, rank), rank == mesh.pp - 1, rank == 0

    def intra(dimension: str) -> bool:
        return _span(mesh, dimension) <= gpus_per_node

    out = []
    if n > 1:
        gathers = 2 * m if mesh.pp == 1 else in_flight(mesh, rank) + 1
        volume = (n - 1) / n * count.total * (gathers * compute + 4)
        out.append(Traffic("dp_shard", n, f"FSDP {gathers} all-gathers + 1 reduce-scatter", volume, intra("dp_shard"), True))
    if mesh.dp_replicate > 1:
        r = mesh.dp_replicate
        volume = 2 * (r - 1) / r * 4 * count.total / n
        out.append(Traffic("dp_replicate", r, "HSDP all-reduce of the gradient shard", volume, intra("dp_replicate"), True))
    if t > 1:
        collectives = layers * (6 if mesh.checkpointing else 4) + 2 * first + 2 * last
        volume = m * collectives * 2 * (t - 1) / t * hidden_states
        out.append(Traffic("tp", t, f"{collectives} all-gather+reduce-scatter pairs per micro-batch", volume, intra("tp"), False))
    if mesh.pp > 1:
        volume = m * 2 * mesh.stages_per_rank * hidden_states / t
        tied = shape.tied and (first or last)  # the embedding's and its head copy's gradients summed (trainer.parallel.pipeline)
        volume += 4 * shape.vocab * shape.hidden / (t * n) if tied else 0
        what = f"{2 * mesh.stages_per_rank} sends per micro-batch" + (" + the tied embedding's gradient" if tied else "")
        out.append(Traffic("pp", 2, what, volume, intra("pp"), False))
    if c > 1:
        kv = 2 * mesh.rows * seq_len / c * shape.hidden * shape.kv_heads / (shape.heads * t) * compute
        passes = 4 if mesh.checkpointing else 3
        volume = m * layers * passes * (c - 1) * kv
        out.append(Traffic("cp", c, f"ring K/V, {passes}·(cp − 1) passes per layer", volume, intra("cp"), True))
    return out


def plan_mesh(shape: Shape, mesh: Mesh, seq_len: int, precision: str, gpus_per_node: int, offload: bool = False,
              eager: bool = False) -> MeshPlan:
    memories = [_rank_memory(shape, mesh, rank, seq_len, precision, offload, eager) for rank in range(mesh.pp)]
    rank = max(range(mesh.pp), key=lambda r: memories[r].total)
    # each dimension's traffic at the pipeline rank that sends most over it
    per_rank = [_traffic(shape, mesh, r, seq_len, precision, gpus_per_node) for r in range(mesh.pp)]
    traffic = tuple(max(column, key=lambda item: item.bytes) for column in zip(*per_rank))
    return MeshPlan(mesh, rank, memories[rank], in_flight(mesh, rank), bubble_fraction(mesh), traffic)


@dataclass(frozen=True)
class Hardware:
    peak_tflops: float  # dense bf16 per GPU
    mfu: float
    intra_gbps: float  # GB/s per GPU, one way, inside a node
    inter_gbps: float  # GB/s per GPU across nodes
    gpus_per_node: int


@dataclass(frozen=True)
class StepTime:
    compute: float
    bubble: float
    exposed: float  # communication not hidden behind compute

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.exposed


def step_time(plan: MeshPlan, shape: Shape, seq_len: int, hardware: Hardware) -> StepTime:
    mesh = plan.mesh
    tokens = mesh.dp * mesh.microbatches * mesh.rows * seq_len
    flops = flops_per_token(shape, count_params(shape), seq_len) * tokens * (4 / 3 if mesh.checkpointing else 1)
    compute = flops / (mesh.world * hardware.peak_tflops * 1e12 * hardware.mfu)
    bandwidth = {True: hardware.intra_gbps * 1e9, False: hardware.inter_gbps * 1e9}
    seconds = [(item, item.bytes / bandwidth[item.intra_node]) for item in plan.traffic]
    hidden = sum(time for item, time in seconds if item.overlapped)
    exposed = sum(time for item, time in seconds if not item.overlapped) + max(0.0, hidden - compute)
    bubble = compute * (mesh.pp - 1) / (mesh.stages_per_rank * mesh.microbatches)
    return StepTime(compute, bubble, exposed)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(shape: Shape, config: Config, world: int, gpus_per_node: int, seq_len: int) -> list[Mesh]:
    """Every layout of `world` GPUs the trainer can run: TP inside a node and dividing the heads, kv heads
    and vocabulary; CP dividing seq_len into 2·cp load-balanced chunks; data-parallel size dividing
    data.lanes and the global batch; micro-batches of 1, 2, 4, 8 or 16 rows, at least pp of them (a
    multiple of pp when interleaved, 2 stages per rank); recomputation off and on."""
    out = []
    batch, lanes = config.train.global_batch, config.data.lanes
    tps = [t for t in _divisors(gpus_per_node) if not (shape.heads % t or shape.kv_heads % t or shape.vocab % t)]
    for t in tps:
        for c in (c for c in _divisors(world // t) if seq_len % (2 * c) == 0 or c == 1):
            for p in (p for p in _divisors(world // (t * c)) if p <= shape.layers):
                dp = world // (t * c * p)
                if lanes % dp or batch % dp:
                    continue
                per_rank = batch // dp
                for r in _divisors(dp):
                    for rows in (b for b in (1, 2, 4, 8, 16) if per_rank % b == 0):
                        m = per_rank // rows
                        base = Mesh(r, dp // r, c, t, p, "1f1b", 1, m, rows)
                        for schedule in (SCHEDULES if p > 1 else ("1f1b",)):
                            stages = 2 if schedule == "interleaved_1f1b" else 1
                            if p > 1 and (m < p or (stages > 1 and (m % p or shape.layers < p * stages))):
                                continue
                            for checkpointing in (False, True):
                                out.append(replace(base, schedule=schedule, stages_per_rank=stages, checkpointing=checkpointing))
    return out


@dataclass(frozen=True)
class Ranked:
    plan: MeshPlan
    time: StepTime


def search(shape: Shape, config: Config, world: int, seq_len: int, hardware: Hardware, gpu_memory_gb: float,
           eager: bool = False) -> tuple[list[Ranked], int]:
    """(the layouts that fit, fastest first; how many were considered)."""
    candidates = layouts(shape, config, world, hardware.gpus_per_node, seq_len)
    offload = config.engine.offload == "cpu"
    fitting = []
    for mesh in candidates:
        plan = plan_mesh(shape, mesh, seq_len, config.precision, hardware.gpus_per_node, offload, eager)
        if plan.memory.total / GIB <= gpu_memory_gb:
            fitting.append(Ranked(plan, step_time(plan, shape, seq_len, hardware)))
    # the estimate cannot tell layouts apart within ~1%: then fewer split dimensions, then fewer and larger
    # micro-batches (the MFU it assumes is likelier there), then less memory
    fitting.sort(key=lambda item: (round(math.log(item.time.total) / math.log(1 + TIE)), item.plan.mesh.splits,
                                   item.plan.mesh.microbatches, item.plan.memory.total))
    return fitting, len(candidates)


def _row(item: Ranked) -> str:
    mesh, time = item.plan.mesh, item.time
    schedule = f"{mesh.schedule}×{mesh.stages_per_rank}" if mesh.stages_per_rank > 1 else mesh.schedule if mesh.pp > 1 else "-"
    return (f"{mesh.dp_replicate:>4}{mesh.dp_shard:>6}{mesh.cp:>4}{mesh.tp:>4}{mesh.pp:>4}  {schedule:<18}{mesh.microbatches:>5}"
            f"{mesh.rows:>5}  {'yes' if mesh.checkpointing else 'no':<4}{item.plan.memory.total / GIB:>8.1f}{time.total:>9.2f}"
            f"{time.compute:>9.2f}{time.bubble:>8.2f}{time.exposed:>9.2f}")


def _why(best: Ranked, other: Ranked, name: str) -> str:
    """The step-time component that makes `other` slower than `best`."""
    parts = {"compute (recomputation)": (best.time.compute, other.time.compute),
             "pipeline bubble": (best.time.bubble, other.time.bubble),
             "exposed communication": (best.time.exposed, other.time.exposed)}
    part, (ours, theirs) = max(parts.items(), key=lambda kv: kv[1][1] - kv[1][0])
    slower = other.time.total / best.time.total - 1
    mesh = other.plan.mesh
    schedule = f", {mesh.schedule}" if mesh.pp > 1 else ""
    head = f"  vs {name} ({mesh.label()}{schedule}, m {mesh.microbatches} × {mesh.rows} rows): "
    if slower < TIE:
        mine, other_mesh = best.plan.mesh, mesh
        reason = (f"splits the model over fewer dimensions ({mine.splits} against {other_mesh.splits})"
                  if mine.splits < other_mesh.splits
                  else f"runs fewer, larger micro-batches ({mine.microbatches} against {other_mesh.microbatches})"
                  if mine.microbatches < other_mesh.microbatches
                  else f"needs less memory ({best.plan.memory.total / GIB:.1f} against {other.plan.memory.total / GIB:.1f} GiB)"
                  if best.plan.memory.total < other.plan.memory.total else "ties with it on every count")
        return head + f"as fast within the estimate's resolution; the best {reason}"
    return head + f"{slower:.0%} slower, mostly {part}: {theirs:.2f} s against {ours:.2f} s"


def render_search(ranked: list[Ranked], considered: int, hardware: Hardware, gpu_memory_gb: float, top: int) -> str:
    lines = [f"{considered} layouts considered, {len(ranked)} fit in {gpu_memory_gb:g} GiB per GPU; step time at an assumed "
             f"{hardware.mfu:.0%} MFU of {hardware.peak_tflops:g} TFLOP/s, {hardware.intra_gbps:g} GB/s intra-node, "
             f"{hardware.inter_gbps:g} GB/s inter-node per GPU"]
    lines.append(f"  {'rep':>4}{'shard':>6}{'cp':>4}{'tp':>4}{'pp':>4}  {'schedule':<18}{'m':>5}{'rows':>5}  {'AC':<4}"
                 f"{'GiB':>8}{'step s':>9}{'compute':>9}{'bubble':>8}{'exposed':>9}")
    lines += [f"{'*' if i == 0 else ' '} {_row(item)}" for i, item in enumerate(ranked[:top])]
    best = ranked[0]
    lines.append(f"best: {best.plan.mesh.label()}; run it with {best.plan.mesh.overrides()}")
    if len(ranked) > 1:
        lines.append(_why(best, ranked[1], "the runner-up"))
    pure = next((item for item in ranked if item.plan.mesh.dp == item.plan.mesh.world), None)
    if pure is None:
        lines.append("  no data-parallel-only layout (FSDP/HSDP) fits")
    elif pure is not best:
        lines.append(_why(best, pure, "the fastest data-parallel-only layout"))
    return "\n".join(lines)


def render_plan(plan: MeshPlan, time: StepTime, gpu_memory_gb: float) -> str:
    mesh, memory = plan.mesh, plan.memory
    pipeline = (f"pipeline {mesh.schedule}" + (f", {mesh.stages_per_rank} stages per rank" if mesh.stages_per_rank > 1 else "")
                + f", {mesh.microbatches} micro-batches, {plan.in_flight} in flight on rank {plan.rank}; "
                  f"bubble {plan.bubble:.1%} of the step"
                if mesh.pp > 1 else "pipeline none")
    lines = [
        f"layout           {mesh.label()} = {mesh.world} GPUs; {mesh.microbatches} micro-batches of {mesh.rows} rows per step "
        f"and data-parallel rank; recomputation {'on' if mesh.checkpointing else 'off'}",
        pipeline,
        f"memory per GPU in GiB (pipeline rank {plan.rank}, the fullest): params {memory.params / GIB:.2f}, grads "
        f"{memory.grads / GIB:.2f}, optimizer {memory.optimizer / GIB:.2f}, activations {memory.activations / GIB:.2f}, total "
        f"{memory.total / GIB:.2f} ({'fits' if memory.total / GIB <= gpu_memory_gb else 'does not fit'} in {gpu_memory_gb:g})",
        "communication per GPU per step:",
    ]
    lines += [f"  {item.dimension:<13}{item.group:>4} GPUs {'intra' if item.intra_node else 'inter'}-node"
              f"  {item.bytes / 1e9:10.2f} GB  "
              f"{item.what}{' (overlapped)' if item.overlapped else ''}" for item in plan.traffic] or ["  none"]
    lines.append(f"step time        ~{time.total:.2f} s: compute {time.compute:.2f}, bubble {time.bubble:.2f}, "
                 f"exposed communication {time.exposed:.2f}")
    return "\n".join(lines)
