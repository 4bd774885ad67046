"""The run configuration: one dataclass tree, loaded from YAML, overridden by dotted CLI args.

`python -m trainer --config run.yaml optim.lr=3e-4 train.max_steps=200`. Override values are
parsed as YAML scalars (numbers, booleans, lists). An unknown key or a wrong type stops the run
at start with one line naming the key and the nearest valid one. The resolved config is saved in
the run directory and in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from data_tools.common import ConfigError, from_dict, read_yaml
from trainer.mixture_weights import WeightSchedule, check_total_weight

log = logging.getLogger("trainer")


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run directory is out_dir/name
    seed: int = 0


@dataclass
class TaskConfig:
    """What the run learns; every task reads the same lanes and runs under either engine."""

    # multitask: one shared encoder, a head per data.train source (classification / token_classification data)
    type: Literal["causal_lm", "mlm", "classification", "token_classification", "sft", "seq2seq", "multitask"] = "causal_lm"
    mlm_probability: float = 0.15  # mlm: share of tokens selected; 80% [MASK], 10% random, 10% kept
    whole_word_masking: bool = False  # mlm: select whole words, not single sub-tokens
    # mlm: a second objective on the two halves of each row: BERT's next-sentence prediction (the second half
    # replaced by another row's half half of the time) or ALBERT's sentence-order prediction (halves swapped)
    sentence_task: Literal["none", "nsp", "sop"] = "none"
    input_noise: Literal["none", "token_dropout", "random_mask"] = "none"  # classification augmentation
    input_noise_prob: float = 0.1
    generate_samples: int = 3  # sft / seq2seq: validation examples generated at each eval (TensorBoard text)
    max_new_tokens: int = 48  # sft / seq2seq generation length


@dataclass
class ModelConfig:
    arch: Literal["llama", "gpt2", "bert", "t5", "bart"] = "llama"
    # instead of arch + sizes: a save_pretrained directory, a .gguf file, or package:<module>/<path> inside an installed package
    pretrained: str | None = None
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # grouped-query attention (llama); None: = num_heads
    intermediate_size: int | None = None  # None: the arch's default ratio
    tie_embeddings: bool = True
    trust_remote_code: bool = False
    # attention kernel: auto = flash_attention_2 on CUDA in bf16 when flash-attn is installed, else the model's default (SDPA)
    attention: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = "auto"


@dataclass
class DataSource:
    path: str  # a manifest.json or its directory
    weight: float = 1.0
    valid: str | None = None  # task.type multitask: this source's valid split (data.valid is for one-task runs)
    name: str | None = None  # task.type multitask: the task's name in metrics and exports; unset: the data directory's name

    def default_name(self) -> str:
        """`sentiment` for runs/finetune/data/sentiment/train (or …/train/manifest.json): what prepare-finetune was told."""
        directory = Path(self.path).parent if self.path.endswith(".json") else Path(self.path)
        return directory.parent.name


@dataclass
class MixtureSource:
    """One source of a weighted mixture (`data.sources`, trainer.mixture): its splits and its weight over the run."""

    name: str = ""  # in metrics: data/<name>/rows, eval/<name>/loss
    train: str = ""  # a manifest.json or its directory
    valid: str | None = None  # scored as eval/<name>/loss
    weight: float | list[list[float]] = 1.0  # a number, or [[step, weight], …]: linear between the steps, flat outside
    exhaust: Literal["wrap", "stop"] = "wrap"  # out of rows: its next epoch (reshuffled), or end the run at a checkpoint


@dataclass
class DataConfig:
    train: str | list[DataSource] = ""
    # instead of data.train: a weighted mixture, each batch holding each source's share exactly (trainer.mixture)
    sources: list[MixtureSource] = field(default_factory=list)
    # a manifest (eval/loss), or name → manifest: one loss per validation source (eval/<name>/loss)
    valid: str | dict[str, str] | None = None
    lanes: int = 8  # fixed for a run: world_size and global_batch must divide by it (ARCHITECTURE.md, "Contracts: lanes")
    prefetch: int = 4  # batches read ahead by the background thread
    verify: bool = True  # check each shard's size and sha256 against the manifest before use
    # a missing, truncated or corrupt shard: stop with its name, or skip it (every rank checks every shard, logged)
    on_corrupt: Literal["stop", "skip"] = "stop"
    # packed rows (causal_lm, mlm): attend within each document and restart positions at its start;
    # None: on when every split records document starts (format 2), off otherwise
    doc_attention: bool | None = None
    # sequence-length warmup (trainer.seq_len_schedule): [[step, seq_len], …] from [0, …], ascending, each length a divisor
    # of the shards' seq_len; shorter rows are cut from the same rows, tokens per step unchanged; unset: the shards' rows
    seq_len_schedule: list[list[int]] | None = None

    def train_sources(self) -> list[DataSource]:
        """The train manifests, in order: data.train's, or data.sources' (their weights live in data.sources)."""
        if self.sources:
            return [DataSource(s.train, name=s.name) for s in self.sources]
        return [DataSource(self.train)] if isinstance(self.train, str) else self.train

    def has_valid(self) -> bool:
        """Whether the run evaluates: a data.valid split, or a `valid:` on some source."""
        return bool(self.valid_sources() or any(s.valid for s in self.train_sources()))

    def valid_sources(self) -> dict[str, str]:
        """data.valid as name → manifest, and each data.sources' valid under its name; the name "" stands for a
        single data.valid (logged as eval/loss)."""
        named = dict(self.valid) if isinstance(self.valid, dict) else {"": self.valid} if self.valid else {}
        return {**named, **{s.name: s.valid for s in self.sources if s.valid}}


@dataclass
class TrainConfig:
    global_batch: int = 16  # rows per optimizer step, all ranks together
    micro_batch: int = 4  # rows per forward/backward on one rank
    max_steps: int | None = 100
    max_tokens: int | None = None  # alternative to max_steps
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    ckpt_every: int = 100
    keep_last: int = 2
    keep_every: int | None = None  # also keep every M-th step's checkpoint
    best_metric: str | None = None  # e.g. eval/accuracy: keep the best checkpoint by it (checkpoints/best)
    best_mode: Literal["max", "min"] = "max"
    early_stop_patience: int | None = None  # stop after this many evals without a better best_metric
    nan_policy: Literal["skip", "stop"] = "skip"  # a non-finite loss: skip that micro-batch, or checkpoint and stop
    max_nan_skips: int = 10  # skips allowed in a run before stopping anyway
    collective_timeout_s: float = 600  # a rank waits this long for the others (dead or stalled) before failing
    gpu_memory_gb: float | None = None  # per process, for the memory check before step 1; unset: the GPU's own; 0: no check
    # write checkpoints in the background (fsdp2): the loop blocks only to copy the state to host memory; at most one
    # write in flight, `latest` moves when it has finished
    async_checkpoint: bool = False

    def accumulation(self, data_world: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank: global_batch = micro_batch × data_world × this.

        The one place this arithmetic lives: the loop, the engines and the loader must agree on it.
        """
        if self.global_batch % (self.micro_batch * data_world):
            raise ConfigError(
                f"train.global_batch {self.global_batch} must be a multiple of train.micro_batch × world size "
                f"= {self.micro_batch} × {data_world}"
            )
        return self.global_batch // (self.micro_batch * data_world)


@dataclass
class EvalConfig:
    """Downstream zero-shot tasks scored by log-likelihood at every train.eval_every (trainer.downstream)."""

    tasks: list[str] = field(default_factory=list)  # JSONL task files; each file's stem names it: eval/<stem>/acc
    max_examples: int | None = None  # score the first N examples of each task (unset: all)
    batch_size: int = 16  # sequences per forward; an example's choices stay in one batch


@dataclass
class PeftConfig:
    """Parameter-efficient finetuning through `peft`: only the added weights train."""

    method: Literal["none", "lora", "dora", "adapter", "prefix"] = "none"
    target_modules: list[str] | str = "all-linear"  # module names (or suffixes) to adapt
    r: int = 8  # lora/dora rank
    alpha: int = 16
    dropout: float = 0.05
    adapter_size: int = 64  # bottleneck adapters: hidden width of each adapter
    adapter_placement: Literal["houlsby", "pfeiffer"] = "houlsby"  # after attention and FFN, or after FFN only
    num_virtual_tokens: int = 20  # prefix tuning
    merge_on_export: bool = True  # export a plain model with the adapter folded in


@dataclass
class FreezeConfig:
    patterns: list[str] = field(default_factory=list)  # regexes of parameter names kept frozen for the whole run
    first_layers: int = 0  # freeze the embeddings and the first N transformer layers
    # gradual unfreezing: start with the head only, thaw one more layer (top down) every N steps
    unfreeze_every: int | None = None


@dataclass
class OptimConfig:
    lr: float = 3e-4
    head_lr: float | None = None  # a separate learning rate for the task head (unset: lr)
    layer_decay: float = 1.0  # layer-wise LR decay: layer l of L gets lr * layer_decay ** (L - l)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # AdamW's kernels: a Python loop over parameters, one multi-tensor (foreach) pass, or one fused kernel per group
    impl: Literal["for_loop", "foreach", "fused"] = "for_loop"


@dataclass
class ScheduleConfig:
    warmup_steps: int = 10
    decay: Literal["constant", "linear", "cosine", "wsd"] = "cosine"
    min_lr_ratio: float = 0.1  # the floor, as a fraction of optim.lr
    wsd_decay_frac: float = 0.2  # wsd: the last fraction of steps decays linearly


@dataclass
class EngineConfig:
    type: Literal["deepspeed", "fsdp2"] = "deepspeed"
    offload: Literal["none", "cpu"] = "none"  # optimizer state (and FSDP2 parameters) on the CPU
    # deepspeed only
    zero_stage: int | None = None  # 0-3; unset: 2
    ds_config: str | None = None  # a DeepSpeed JSON of your own; "auto" fields are filled
    # both engines (trainer.engines.blocks): recompute activations in backward: none, full (every block), selective
    # (each block keeps its matmul and attention outputs, recomputes the rest); true / false mean full / none
    activation_checkpointing: Literal["none", "full", "selective", True, False] = "none"
    compile: bool = False  # torch.compile each transformer block (regional: one compiled graph reused by every block)
    # fsdp2 only
    reduce_dtype: Literal["fp32", "bf16"] | None = None  # gradient reduction dtype under bf16; unset: fp32
    # false: each block stays gathered from its forward through backward and over a step's micro-batches, one
    # all-gather per step instead of two per micro-batch, for the unsharded model's memory per process; unset: true
    reshard_after_forward: bool | None = None


ENGINE_ONLY_KEYS = {"deepspeed": ("zero_stage", "ds_config"), "fsdp2": ("reduce_dtype", "reshard_after_forward")}


@dataclass
class ParallelConfig:
    """How the ranks split the model (engine fsdp2): one device mesh of named dimensions,
    world size = dp_replicate × dp_shard × cp × tp × pp. The lanes loader sees only the data-parallel
    rank (dp_replicate × dp_shard); tensor, context and pipeline peers read the same rows."""

    dp_replicate: int = 1  # replicas (HSDP when > 1: replicate across groups, shard within)
    dp_shard: int = -1  # FSDP sharding degree; -1: whatever the other dimensions leave of the world
    cp: int = 1  # context parallel (ring attention over the sequence)
    tp: int = 1  # tensor parallel with sequence-parallel norms
    pp: int = 1  # pipeline stages over ranks
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs"] = "1f1b"
    pp_microbatches: int | None = None  # micro-batches per step through the pipeline; unset: the accumulation steps
    pp_stages_per_rank: int = 1  # > 1 for interleaved schedules (virtual stages)


@dataclass
class MetricsConfig:
    peak_tflops: float | None = None  # per device; None: bf16 dense peak of known GPUs, none on CPU
    tensorboard: bool = True


@dataclass
class DistillConfig:
    """Knowledge distillation (trainer.distill): the loss mixes the task loss with KL to a teacher's logits."""

    teacher: str | None = None  # a checkpoint, run directory or save_pretrained directory with the data's tokenizer
    temperature: float = 2.0  # softens both distributions; the KL term is scaled by T² to keep its gradient size
    alpha: float = 0.5  # weight of the KL term; 1 - alpha weighs the task loss


@dataclass
class DebugConfig:
    nan_at_steps: list[int] = field(default_factory=list)  # make the loss NaN at these steps (tests the NaN policy)
    checkpoint_write_delay_s: float = 0.0  # each background checkpoint write waits this long first (tests a kill during it)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    precision: Literal["fp32", "bf16"] = "fp32"

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Put `value` at `a.b.c` in the raw config, refusing a path that is not a config field."""
    keys = dotted.split(".")
    node, cls = data, Config
    for depth, key in enumerate(keys):
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if key not in hints:
            near = difflib.get_close_matches(key, hints, n=1)
            hint = f"; did you mean '{'.'.join([*keys[:depth], near[0]])}'?" if near else ""
            raise ConfigError(f"override: unknown key '{dotted}'{hint}")
        if depth == len(keys) - 1:
            node[key] = value
        else:
            node, cls = node.setdefault(key, {}), hints[key]


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """YAML file (optional) plus `key.sub=value` overrides → a validated Config."""
    data = read_yaml(path) if path is not None else {}
    where = str(path) if path else "config"
    overridden = set()
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep:
            raise ConfigError(f"override '{override}': expected key=value, e.g. optim.lr=3e-4")
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
        overridden.add(key.strip())
    if "engine.type" in overridden:
        _drop_other_engine_keys(data["engine"], overridden, where)
    config = from_dict(Config, data, where=where)
    _check(config, where)
    return config


def _drop_other_engine_keys(engine: dict, overridden: set[str], where: str) -> None:
    """`engine.type=…` on the command line switches a recipe's engine: the file's options of the other
    engine are dropped with one warning (a command line cannot delete a key); options given on the
    command line itself are kept, and refused by `_check` if they belong to the other engine."""
    dropped = [
        key for other, keys in ENGINE_ONLY_KEYS.items() if other != engine.get("type") for key in keys
        if engine.get(key) is not None and f"engine.{key}" not in overridden
    ]
    for key in dropped:
        del engine[key]
    if dropped and os.environ.get("RANK", "0") == "0":
        log.warning("%s: engine.type=%s given on the command line; ignoring %s from the file", where, engine.get("type"),
                    ", ".join(f"engine.{key}" for key in dropped))


def _check(config: Config, where: str) -> None:
    positive = {
        "train.global_batch": config.train.global_batch,
        "train.micro_batch": config.train.micro_batch,
        "data.lanes": config.data.lanes,
        "train.log_every": config.train.log_every,
        "train.ckpt_every": config.train.ckpt_every,
        "train.eval_every": config.train.eval_every,
        "eval.batch_size": config.eval.batch_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}: '{key}' must be positive, got {value}")
    if (config.train.gpu_memory_gb or 0) < 0:
        raise ConfigError(
            f"{where}: 'train.gpu_memory_gb' must be positive (or 0: no memory check), got {config.train.gpu_memory_gb}"
        )
    if not 0 <= config.distill.alpha <= 1 or config.distill.temperature <= 0:
        raise ConfigError(f"{where}: 'distill.alpha' must lie in [0, 1] and 'distill.temperature' be positive")
    if config.train.max_steps is None and config.train.max_tokens is None:
        raise ConfigError(f"{where}: set 'train.max_steps' or 'train.max_tokens'")
    engine = config.engine
    engine.activation_checkpointing = {True: "full", False: "none"}.get(engine.activation_checkpointing,
                                                                         engine.activation_checkpointing)
    for other, keys in ENGINE_ONLY_KEYS.items():
        for key in keys:
            if other != engine.type and getattr(engine, key) is not None:
                raise ConfigError(f"{where}: 'engine.{key}' is a {other} option, but engine.type is {engine.type}; remove it")
    if engine.type == "deepspeed":
        engine.zero_stage = 2 if engine.zero_stage is None else engine.zero_stage
        if not 0 <= engine.zero_stage <= 3:
            raise ConfigError(f"{where}: 'engine.zero_stage' must be 0, 1, 2 or 3, got {engine.zero_stage}")
        if engine.offload == "cpu" and engine.zero_stage == 0:
            raise ConfigError(f"{where}: 'engine.offload: cpu' needs engine.zero_stage 1-3")
        mesh = [f"parallel.{key}={getattr(config.parallel, key)}" for key in ("dp_replicate", "cp", "tp", "pp")
                if getattr(config.parallel, key) > 1]
        if mesh:  # DeepSpeed shards over data parallel only; the device mesh lives in the FSDP2 engine
            raise ConfigError(f"{where}: {', '.join(mesh)} needs the device-mesh engine; set engine.type=fsdp2")
        if engine.zero_stage == 3 and engine.activation_checkpointing == "selective":  # ZeRO-3 gathers inside the block,
            # differently in the recompute (parameters already gathered), which selective checkpointing cannot replay
            raise ConfigError(f"{where}: 'engine.activation_checkpointing: selective' does not work with ZeRO-3's "
                              "parameter gathering; use full, or engine.zero_stage 0-2, or engine.type fsdp2")
        if config.train.async_checkpoint:  # checked on DeepSpeed 0.19.8: the decoupled writer cannot pickle ZeRO's state
            raise ConfigError(f"{where}: 'train.async_checkpoint' needs engine.type fsdp2: DeepSpeed's decoupled checkpoint "
                              "writer (checkpoint.writer.decoupled) fails on ZeRO optimizer state; set it to false")
    if config.data.sources:
        _check_mixture(config, where)
    if not config.data.train_sources() or not config.data.train_sources()[0].path:
        raise ConfigError(f"{where}: 'data.train' is empty; give a manifest from `python -m data_tools prepare`")
    for name in config.data.valid if isinstance(config.data.valid, dict) else ():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ConfigError(f"{where}: 'data.valid' source name {name!r} is not a plain word (letters, digits, _ -)")
    if config.task.type == "multitask":
        _check_multitask(config, where)
    elif (given := next((i for i, s in enumerate(config.data.train_sources()) if s.valid), None)) is not None:
        raise ConfigError(f"{where}: 'data.train[{given}].valid' is for task.type multitask only; use data.valid")


def _check_multitask(config: Config, where: str) -> None:
    """A multi-task run's sources carry their own valid splits and names; names become metric and export paths."""
    data = config.data
    if isinstance(data.train, str):
        raise ConfigError(f"{where}: task.type multitask needs 'data.train' as a list of sources "
                          "({path, weight, valid, name}), one per task")
    if data.valid:
        raise ConfigError(f"{where}: 'data.valid' is not read by task.type multitask; put 'valid:' on each data.train source")
    if config.peft.method != "none":
        raise ConfigError(f"{where}: 'peft.method {config.peft.method}' is not supported with task.type multitask; "
                          "set peft.method none")
    names: set[str] = set()
    for i, source in enumerate(data.train):
        source.name = source.name or source.default_name()
        if not re.fullmatch(r"[A-Za-z0-9_-]+", source.name) or source.name in names:
            raise ConfigError(f"{where}: 'data.train[{i}].name' {source.name!r} is empty, repeated or not a plain word "
                              "(letters, digits, _ -); give each source a distinct name")
        names.add(source.name)


def _check_mixture(config: Config, where: str) -> None:
    """`data.sources`: plain, distinct names (they become metric paths), a train split each, weights that
    are schedules (trainer.mixture_weights) never all zero at one step."""
    data = config.data
    if data.train:
        raise ConfigError(f"{where}: 'data.train' and 'data.sources' are both set; give the mixture's splits in data.sources")
    if config.task.type == "multitask":
        raise ConfigError(f"{where}: task.type multitask reads 'data.train' as a list of sources (a head each), "
                          "not data.sources; move them to data.train")
    named_valid = set(data.valid) if isinstance(data.valid, dict) else set()
    schedules: dict[str, WeightSchedule] = {}
    for i, source in enumerate(data.sources):
        key = f"data.sources[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", source.name) or source.name in schedules:
            raise ConfigError(f"{where}: '{key}.name' {source.name!r} is empty, repeated or not a plain word "
                              "(letters, digits, _ -); give each source a distinct name")
        if not source.train:
            raise ConfigError(f"{where}: '{key}.train' is empty; give a manifest from `python -m data_tools prepare`")
        if source.valid and source.name in named_valid:
            raise ConfigError(f"{where}: '{key}.valid' and 'data.valid.{source.name}' both name eval/{source.name}; "
                              "keep one")
        try:
            schedules[source.name] = WeightSchedule.parse(source.weight, f"{key}.weight")
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    check_total_weight(schedules, where)
