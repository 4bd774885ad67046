"""Pipeline parallelism for the FSDP2 engine: a Llama-family decoder split into stages by layer count,
run by a `torch.distributed.pipelining` schedule over the ranks of the mesh's pp dimension.

Stage j of S holds L // S layers (one more for the first L % S stages, as `trainer plan` counts them);
the first stage also holds the token embeddings, the last the final norm, the LM head and the loss.
Tied embeddings (Megatron's way): the last stage's head is a copy of the embedding weight; after each
backward the first and last pipeline ranks sum the two copies' gradients, so the copies, equal at the
start, get the same updates and stay equal. The norm counts that gradient once, and the checkpoint holds
the tied weight's optimizer state once, under the embedding's name, as the unsplit tied model saves it.
Rank r of pp holds stages r, r + pp, … (torch's looped placement: one stage per rank for `gpipe` /
`1f1b`, `pp_stages_per_rank` for `interleaved_1f1b` / `looped_bfs`). The parts of the model a rank
does not hold are moved to the meta device (shapes kept, storage freed). A rank's stages share one
container module, `local_model`, whose parameter names are the unsplit model's
(`model.layers.5.mlp.up_proj.weight`): its DCP checkpoint loads at any other layout, or into the
whole model, with no renaming.

Tensor parallel composes inside each stage: the engine applies trainer.parallel.tensor's plan on the
tp sub-mesh before the stages are built, so the activations a stage sends to the next are its tp
rank's slice of the sequence (the residual stream between blocks is sequence parallel), and the
last stage's logits stay sharded over the vocabulary for the vocab-parallel loss. FSDP then shards
each stage over the data-parallel ranks of its pp coordinate.

One optimizer step runs every micro-batch of the rank's local batch through the schedule. The loss
of micro-batch i is the model's own causal-LM loss divided by the number of micro-batches, so the
accumulated gradient is the unsplit model's for the same rows; FSDP averages it over the
data-parallel ranks. The gradient norm is the norm over all stages: each rank's squared norm
(already reduced over its data-parallel and tensor-parallel groups by DTensor) summed over pp.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleLoopedBFS,
)
from torch.distributed.tensor import DTensor
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutput

from trainer.config import Config, ConfigError
from trainer.parallel import tensor
from trainer.parallel.mesh import MULTI_STAGE, Layout

log = logging.getLogger("trainer")

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B,
             "looped_bfs": ScheduleLoopedBFS}
# torch's zero-bubble schedules (backward split into input and weight gradients) are left out: with FSDP
# stages their gradients differ from the unsplit model's here.
# what the stages read of a task's inputs: the first stage the tokens, the last the labels, every stage the document
# positions (data.doc_attention); use_cache=False comes with them and means nothing to a stage, which keeps no cache
STAGE_INPUTS = {"input_ids", "labels", "position_ids", "use_cache"}


def check_layout(config: Config, model: torch.nn.Module, pp: int, local_batch: int) -> int:
    """The number of micro-batches per step, or a one-line error naming the setting that does not fit."""
    par = config.parallel
    if config.task.type != "causal_lm":
        raise ConfigError(f"parallel.pp {pp}: pipeline stages run causal-LM pretraining only, not task.type {config.task.type}")
    if config.distill.teacher:
        raise ConfigError(f"parallel.pp {pp}: distillation is not pipelined; unset distill.teacher or set parallel.pp=1")
    if config.peft.method != "none":
        raise ConfigError(f"parallel.pp {pp}: adapters (peft.method {config.peft.method}) are not pipelined; set parallel.pp=1")
    if config.optim.layer_decay != 1 or config.optim.head_lr is not None or config.freeze.unfreeze_every is not None:
        raise ConfigError(f"parallel.pp {pp}: layer-wise LR (optim.layer_decay, optim.head_lr, freeze.unfreeze_every) "
                          "needs the whole model on each rank; unset them or set parallel.pp=1")
    decoder = getattr(model, "model", None)
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(decoder, name) for name in parts) or not hasattr(model, "lm_head"):
        raise ConfigError(f"parallel.pp {pp}: {type(model).__name__} is not a Llama-family decoder "
                          "(model.embed_tokens, model.layers, model.norm, lm_head); use model.arch llama")
    per_rank = par.pp_stages_per_rank
    if par.pp_schedule in MULTI_STAGE and per_rank < 2:
        raise ConfigError(f"parallel.pp_schedule {par.pp_schedule} runs several stages per rank; "
                          "set parallel.pp_stages_per_rank >= 2 or use 1f1b")
    if par.pp_schedule not in MULTI_STAGE and per_rank != 1:
        raise ConfigError(f"parallel.pp_schedule {par.pp_schedule} runs one stage per rank, parallel.pp_stages_per_rank is "
                          f"{per_rank}; use interleaved_1f1b or set it to 1")
    layers, stages = len(decoder.layers), pp * per_rank
    if layers < stages:
        raise ConfigError(f"parallel: {layers} layers do not fill parallel.pp × parallel.pp_stages_per_rank = "
                          f"{pp} × {per_rank} = {stages} stages of at least one layer; choose fewer stages")
    micro = par.pp_microbatches or local_batch // config.train.micro_batch  # the accumulation steps
    if micro < 1 or local_batch % micro:
        raise ConfigError(f"parallel.pp_microbatches {micro} does not divide the {local_batch} rows each data-parallel "
                          "rank reads per step (train.global_batch / data-parallel ranks); choose a divisor")
    if par.pp_schedule == "1f1b" and micro < pp:
        raise ConfigError(f"parallel.pp_schedule 1f1b needs at least parallel.pp = {pp} micro-batches, got {micro}; "
                          "raise parallel.pp_microbatches or use gpipe")
    rounds = max(1, micro // pp)
    if par.pp_schedule == "interleaved_1f1b" and micro % rounds:
        raise ConfigError(f"parallel.pp_schedule interleaved_1f1b runs micro-batches in rounds of parallel.pp = {pp}: "
                          f"{micro} micro-batches do not make whole rounds; use a multiple of {pp} (or fewer than {pp})")
    return micro


def stage_layers(layers: int, stages: int) -> list[list[int]]:
    """The layer indices of each stage: L // S each, one more for the first L % S (trainer.plan_mesh.layers_of_rank)."""
    sizes = [layers // stages + (j < layers % stages) for j in range(stages)]
    starts = [sum(sizes[:j]) for j in range(stages)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes)]


def local_model(model: torch.nn.Module, layer_ids: list[int], first: bool, last: bool) -> torch.nn.Module:
    """The parts of `model` a rank's stages hold, under the unsplit model's parameter names."""
    local, decoder = torch.nn.Module(), model.model
    local.model = torch.nn.Module()
    if first:
        local.model.embed_tokens = decoder.embed_tokens
    local.model.layers = torch.nn.ModuleDict({str(i): decoder.layers[i] for i in layer_ids})
    if last:
        local.model.norm = decoder.norm
        local.lm_head = model.lm_head
    return local


def untie(model: torch.nn.Module) -> None:
    """Give the LM head its own copy of the tied embedding weight: the first stage holds the embedding,
    the last the head (Megatron's way). The copies start equal; `Pipeline` sums their gradients, so they stay equal."""
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())


def ends_group(layout: Layout) -> dist.ProcessGroup:
    """The process group of this rank's first and last pipeline ranks (the same other mesh coordinates), which
    hold the two copies of a tied embedding. Every rank creates every pair's group, as torch requires."""
    stride = layout.world // layout.pp  # pp is the outermost mesh dimension
    groups = [dist.new_group([inner, (layout.pp - 1) * stride + inner]) for inner in range(stride)]
    return groups[dist.get_rank() % stride]


def release_others(model: torch.nn.Module, layer_ids: list[int], first: bool, last: bool) -> None:
    """Move the parts this rank does not hold to the meta device: their memory is freed, their shapes
    (the parameter count, FLOPs per token) stay."""
    decoder, keep = model.model, set(layer_ids)
    others = [layer for i, layer in enumerate(decoder.layers) if i not in keep]
    others += [] if first else [decoder.embed_tokens]
    others += [] if last else [decoder.norm, model.lm_head]
    for module in others:
        module.to("meta")


class DecoderStage(torch.nn.Module):
    """One pipeline stage: (embeddings) → decoder layers → (final norm → logits), calling the layers
    as the Hugging Face decoder does, with its rotary embeddings and causal mask computed per stage
    from the position ids, so no stage sends them to the next. Without document attention they are
    0 … S-1; with it every stage is given the micro-batch's per-document positions (a keyword argument
    of the schedule, split into micro-batches as the tokens are), from which Hugging Face's mask
    function derives the same block-diagonal mask as in the unsplit model. Under tensor parallel a
    stage after the first receives its tp rank's 1/tp of the sequence, but the positions of all of it:
    attention runs on the whole sequence, gathered over tp."""

    def __init__(self, model: torch.nn.Module, layer_ids: list[int], first: bool, last: bool, tp: int) -> None:
        super().__init__()
        decoder = model.model
        self.config, self.tp = model.config, tp
        self.embed_tokens = decoder.embed_tokens if first else None
        self.layers = torch.nn.ModuleList(decoder.layers[i] for i in layer_ids)
        self.norm = decoder.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.rotary_emb = decoder.rotary_emb

    def forward(self, inputs: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs
        seq_len = hidden.shape[1] * (self.tp if self.embed_tokens is None else 1)
        whole = hidden[:, :1].expand(-1, seq_len, -1)  # the full sequence's shape, no copy: masks and rotary read only that
        positions = torch.arange(seq_len, device=hidden.device).unsqueeze(0) if position_ids is None else position_ids
        mask = create_causal_mask(config=self.config, inputs_embeds=whole, attention_mask=None, cache=None,
                                  position_ids=positions)
        rotary = self.rotary_emb(whole, position_ids=positions)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        return self.lm_head(self.norm(hidden)) if self.lm_head is not None else hidden


def _local(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (the replicated vocab-parallel loss, a sharded gradient) as this rank's plain tensor, the same storage."""
    return value.to_local() if isinstance(value, DTensor) else value


HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"  # the two names of a tied embedding weight


def _param_name(key: str) -> str:
    """The parameter a flattened optimizer state key is about: `state.<name>.exp_avg`, `param_groups.<name>.lr`."""
    return key.split(".", 1)[1].rsplit(".", 1)[0]


def _renamed(key: str, old: str, new: str) -> str:
    """A flattened optimizer state key of parameter `old` as the same key of parameter `new`."""
    kind, rest = key.split(".", 1)
    return f"{kind}.{new}{rest[len(old):]}" if _param_name(key) == old else key


def without_head_copy(state: dict) -> dict:
    """A last stage's flattened optimizer state without its tied head copy's (the first stage saves the weight's)."""
    return {key: value for key, value in state.items() if _param_name(key) != HEAD}


def head_copy_as_embedding(state: dict, back: bool = False) -> dict:
    """The head copy's optimizer state keys as the embedding's (what a checkpoint holds), or `back` again."""
    old, new = (EMBED, HEAD) if back else (HEAD, EMBED)
    return {_renamed(key, old, new): value for key, value in state.items()}


def _positions(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keyword argument every stage reads: the document positions, when the task gives them."""
    return {"position_ids": inputs["position_ids"]} if "position_ids" in inputs else {}


class Pipeline:
    """A rank's stages, tensor-parallel and sharded over its data-parallel ranks, and the schedule that runs them.

    `parallelize(model)` applies the tensor-parallel plan (after the other ranks' parts are released);
    `shard(module)` applies FSDP to a stage (its blocks first, then the stage as root), as the engine
    does to a whole model. `mesh` is the run's trainer.parallel.mesh.Mesh."""

    def __init__(self, model: torch.nn.Module, config: Config, mesh, local_batch: int, device: torch.device,
                 parallelize: Callable[[torch.nn.Module], None], shard: Callable[[torch.nn.Module], None]) -> None:
        par = config.parallel
        self.group, self.rank, self.size = mesh.pp_group, mesh.pp_rank, mesh.layout.pp
        self.tp, self.tp_rank = mesh.layout.tp, mesh.coordinates["tp"]
        self.microbatches = check_layout(config, model, self.size, local_batch)
        self.num_stages = self.size * par.pp_stages_per_rank
        layers = stage_layers(len(model.model.layers), self.num_stages)
        self.stage_ids = [self.rank + k * self.size for k in range(par.pp_stages_per_rank)]
        self.has_first, self.has_last = 0 in self.stage_ids, self.num_stages - 1 in self.stage_ids
        own = [i for s in self.stage_ids for i in layers[s]]
        self.tied = bool(model.config.tie_word_embeddings)
        if self.tied:
            untie(model)
            self.ends = ends_group(mesh.layout)
        release_others(model, own, self.has_first, self.has_last)
        parallelize(model)
        self.local = local_model(model, own, self.has_first, self.has_last)
        self.modules = [DecoderStage(model, layers[s], s == 0, s == self.num_stages - 1, self.tp) for s in self.stage_ids]
        for module in self.modules:
            shard(module)
        self.stages = [PipelineStage(module, s, self.num_stages, device, group=self.group)
                       for s, module in zip(self.stage_ids, self.modules)]
        self.loss_function, self.vocab_size = model.loss_function, model.config.vocab_size
        self.hidden_size = model.config.hidden_size
        self.activation_dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        self.poison_ptr: int | None = None
        self.computed: list[tuple[torch.Tensor, bool]] = []
        cls = SCHEDULES[par.pp_schedule]
        stages = self.stages if par.pp_schedule in MULTI_STAGE else self.stages[0]
        self.schedule = cls(stages, n_microbatches=self.microbatches, loss_fn=self._loss, scale_grads=False)
        log.info("pipeline: %d stages of %s layers over %d ranks, %s over %d micro-batches of %d rows",
                 self.num_stages, "/".join(sorted({str(len(ids)) for ids in layers})), self.size, par.pp_schedule,
                 self.microbatches, local_batch // self.microbatches)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Micro-batch loss as the unsplit model computes it, over the micro-batch count (gradient accumulation).
        A non-finite loss contributes a zero gradient, as the loop does without pipelining. torch also calls
        this once on the first step to infer gradient shapes: each returned loss is kept with its flag, and
        the flags of the losses the schedule reports are read back by identity."""
        loss = _local(self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size))
        if self.poison_ptr is not None and labels.data_ptr() == self.poison_ptr:  # debug.nan_at_steps: micro-batch 0
            loss = loss * float("nan")
        finite = bool(torch.isfinite(loss))
        loss = (loss if finite else _local(logits.float().sum() * 0.0)) / self.microbatches
        self.computed.append((loss, finite))
        return loss

    def saved_optimizer_state(self, state: dict) -> dict:
        """The optimizer state to save (flattened, keyed by parameter name): a tied weight's once, under the
        embedding's name, as the unsplit tied model saves it, so the checkpoint loads at any layout."""
        return without_head_copy(state) if self.tied and self.has_last else state

    def optimizer_state_to_load(self, state: dict, loaded: bool = False) -> dict:
        """The head copy's optimizer state read from (`loaded` False) and renamed back from (True) the embedding's."""
        return head_copy_as_embedding(state, back=loaded) if self.tied and self.has_last else state

    def _check_inputs(self, inputs: dict[str, torch.Tensor]) -> None:
        if set(inputs) - STAGE_INPUTS:
            raise ConfigError(f"parallel.pp {self.size}: the pipeline stages take {sorted(STAGE_INPUTS)}, the task gives "
                              f"{sorted(inputs)}; set parallel.pp=1")
        if inputs["input_ids"].shape[1] % self.tp:
            raise ConfigError(f"parallel.pp {self.size} × tp {self.tp}: the sequence length {inputs['input_ids'].shape[1]} "
                              "does not split over parallel.tp; choose a tp that divides it")

    def forward_backward(self, inputs: dict[str, torch.Tensor], poison: bool = False) -> tuple[float, int]:
        """One step's forward and backward over the rank's local batch: (mean loss over the finite
        micro-batches, the same on every rank; micro-batches non-finite on any rank)."""
        self._check_inputs(inputs)
        input_ids, labels = inputs["input_ids"], inputs["labels"]
        self.poison_ptr, self.computed = labels.data_ptr() if poison else None, []
        losses: list[torch.Tensor] | None = [] if self.has_last else None
        with tensor.loss_context(self.tp):  # the vocab-parallel loss and its backward
            self.schedule.step(*((input_ids,) if self.has_first else ()), target=labels if self.has_last else None,
                               losses=losses, return_outputs=False, **_positions(inputs))
        summary = torch.zeros(2 * self.microbatches, dtype=torch.float64)
        if losses is not None:
            finite = torch.tensor([next(flag for kept, flag in self.computed if kept is loss) for loss in losses],
                                  dtype=torch.float64)
            summary[: self.microbatches] = torch.stack([loss.detach().double().cpu() for loss in losses]) * finite
            summary[self.microbatches :] = 1 - finite
        self.computed = []
        summary = summary.to(input_ids.device)
        dist.all_reduce(summary, group=self.group)  # only the last stage contributes
        bad = summary[self.microbatches :].clone()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # over every rank: a micro-batch non-finite on any replica
        self._sum_tied_grads()
        return float(summary[: self.microbatches].sum()), int(bad.sum())

    def _tied_copy(self) -> torch.nn.Parameter | None:
        """This rank's copy of a tied embedding weight (the embedding on the first stage, the head on the last)."""
        if not self.tied:
            return None
        return self.local.model.embed_tokens.weight if self.has_first else self.local.lm_head.weight if self.has_last else None

    @torch.no_grad()
    def _sum_tied_grads(self) -> None:
        """The tied weight's gradient is the sum of its uses: the embedding's and the head's, each already reduced
        over the data-parallel ranks by FSDP. Both copies are sharded alike (the same shape, tp and dp placements),
        so the local shards add element by element."""
        copy = self._tied_copy()
        if copy is not None:
            dist.all_reduce(_local(copy.grad), group=self.ends)

    @torch.no_grad()
    def forward(self, inputs: dict[str, torch.Tensor]) -> CausalLMOutput:
        """Forward only (evaluation) of a task's inputs: the stages in order, activations sent point to point
        to the next stage's rank; the loss computed on the last stage and returned on every pp rank."""
        self._check_inputs(inputs)
        input_ids, labels = inputs["input_ids"], inputs.get("labels")
        hidden = input_ids
        for s in range(self.num_stages):
            owner, prev_owner = s % self.size, (s - 1) % self.size
            if s > 0 and owner != prev_owner and self.rank in (owner, prev_owner):
                if self.rank == prev_owner:
                    dist.send(hidden.contiguous(), group_dst=owner, group=self.group)
                else:
                    shape = (input_ids.shape[0], input_ids.shape[1] // self.tp, self.hidden_size)
                    hidden = torch.empty(shape, dtype=self.activation_dtype, device=input_ids.device)
                    dist.recv(hidden, group_src=prev_owner, group=self.group)
            if owner == self.rank:
                hidden = self.modules[self.stage_ids.index(s)](hidden, **_positions(inputs))
        loss = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        if self.has_last and labels is not None:
            with tensor.loss_context(self.tp):
                loss += _local(self.loss_function(logits=hidden, labels=labels, vocab_size=self.vocab_size)).float()
        dist.all_reduce(loss, group=self.group)
        return CausalLMOutput(loss=loss)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip by the norm over every stage's gradients; return that norm (the unsplit model's: a tied weight's
        gradient counted once, on the first stage)."""
        params = [p for p in self.local.parameters() if p.grad is not None]
        head_copy = self._tied_copy() if self.has_last else None
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p is not head_copy])
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squared = norm.double() ** 2
        dist.all_reduce(squared, group=self.group)
        total = squared.sqrt().to(norm.dtype)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)
