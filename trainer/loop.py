"""The training loop. Read `train` top to bottom and you know what a step does: get a batch, forward,
backward, step, log, maybe evaluate, maybe checkpoint. Everything else is a component (ARCHITECTURE.md, "The loop").
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch
import yaml
from tokenizers import Tokenizer

from data_tools.common import CheckpointError, StorageError, first_line
from data_tools.manifest import Manifest, load_manifest
from trainer import distributed
from trainer.adapt import adapt
from trainer.checkpoint import Checkpoints, TrainerState, rng_state, set_rng_state, tag
from trainer.config import Config, ConfigError
from trainer.data import LanesLoader, batch_digest
from trainer.distill import objective
from trainer.document_attention import attend_within_documents
from trainer.early_stop import BestMetric
from trainer.engines import Engine, build_engine
from trainer.evaluate import Evaluator, validation_parts
from trainer.metrics import TRAIN_TAGS, Metrics, peak_flops, peak_memory_gb
from trainer.mixture import MixtureLoader, build_loader
from trainer.downstream import positions
from trainer.models import base_model, build_model, flops_per_token
from trainer.plan import check_memory
from trainer.seq_len_schedule import SeqLenSchedule, seq_len_schedule
from trainer.tasks import DATA_TASK, Task, TaskContext, build_task, doc_attention, model_vocab_size

log = logging.getLogger("trainer")

EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpointed on SIGTERM/SIGUSR1/SIGUSR2; run the same command again
EXIT_NONFINITE = 65  # EX_DATAERR: stopped on a non-finite loss after checkpointing the last good state


class StopSignal:
    """SIGTERM / SIGUSR1 / SIGUSR2 set a flag; the loop acts on it at the next step boundary."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum


class RunManifests(NamedTuple):
    """Every manifest a run reads, loaded once and checked here; the loader and the tasks take them as they are."""

    train: list[Manifest]  # data.train's sources, in order
    valid: Manifest | None  # data.valid
    source_valid: list[Manifest | None]  # each source's own `valid:` (task.type multitask)
    named_valid: dict[str, Manifest]  # data.valid as a mapping: name → manifest, a loss each


def read_manifests(config: Config) -> RunManifests:
    """The run's manifests, checked to agree with each other and with `task.type`. A multi-task run's
    sources may differ in task and labels (a head each); each is checked against its own valid split."""
    sources = [load_manifest(s.path) for s in config.data.train_sources()]
    source_valid: list[Manifest | None] = []
    first, accepted = sources[0], DATA_TASK[config.task.type]
    multitask = config.task.type == "multitask"
    for i, (source, manifest) in enumerate(zip(config.data.train_sources(), sources)):
        key = f"data.sources[{i}].train" if config.data.sources else "data.train"
        if manifest.task not in accepted:
            made_by = f"prepare-finetune --task {manifest.task}" if manifest.task else "data_tools prepare (packed tokens)"
            needs = " or ".join(f"prepare-finetune --task {wanted}" if wanted else "data_tools prepare" for wanted in accepted)
            raise ConfigError(f"{key} {source.path}: made by {made_by}, but task.type {config.task.type} "
                              f"reads data from {needs}")
        if (manifest.seq_len, manifest.tokenizer.sha256, manifest.row_shape) != (first.seq_len, first.tokenizer.sha256,
                                                                                first.row_shape):
            raise ConfigError(
                f"{key} {source.path}: seq_len {manifest.seq_len} / tokenizer {manifest.tokenizer.name} differ from "
                f"the first source's {first.seq_len} / {first.tokenizer.name}; a mixture needs one tokenizer and seq_len"
            )
        if not multitask and manifest.labels != first.labels:
            raise ConfigError(f"{key} {source.path}: labels {manifest.labels} differ from the first source's {first.labels}")
        source_valid.append(load_manifest(source.valid) if source.valid else None)
        if source_valid[-1]:
            check_valid(f"data.train[{i}].valid {source.valid}", source_valid[-1], manifest)
    valid = {name: load_manifest(path) for name, path in config.data.valid_sources().items()}
    for name, path in config.data.valid_sources().items():
        check_valid(f"data.valid{'.' + name if name else ''} {path}", valid[name], first)
    return RunManifests(sources, valid.pop("", None), source_valid, valid)


def check_valid(where: str, valid: Manifest, train: Manifest) -> None:
    """A valid split must be scored as its training data is read: same seq_len, tokenizer, task and label ids."""
    if (valid.seq_len, valid.tokenizer.sha256, valid.task) != (train.seq_len, train.tokenizer.sha256, train.task):
        raise ConfigError(f"{where}: seq_len, tokenizer or task differ from data.train's")
    if unknown := [label for label in valid.labels if label not in train.labels]:
        raise ConfigError(
            f"{where}: label {unknown[0]!r} is not in the training label vocabulary {train.labels}; "
            "prepare both splits in one prepare-finetune run"
        )
    if valid.labels and valid.labels != train.labels:
        raise ConfigError(f"{where}: label ids differ from data.train's; prepare both splits in one run")


def task_context(config: Config, manifests: RunManifests, tokenizer: Tokenizer, model: torch.nn.Module) -> TaskContext:
    data = manifests.train[0]
    splits = [*manifests.train, *([manifests.valid] if manifests.valid else []), *manifests.named_valid.values()]
    return TaskContext(config, data.seq_len, tokenizer, data.tokenizer.eos_id, model.config.pad_token_id, data.labels,
                       manifests.valid, manifests.train, manifests.source_valid, doc_attention(config, splits))


def total_steps(config: Config, seq_len: int) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    return math.ceil(config.train.max_tokens / (config.train.global_batch * seq_len))


def model_shape(model: torch.nn.Module) -> dict:
    cfg = model.config.to_dict()
    keys = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
            "num_key_value_heads", "intermediate_size", "n_inner", "multitask_heads")
    return {k: cfg[k] for k in keys if k in cfg}


def train(config: Config, resume_from: str = "latest") -> int:
    """Run (or continue) the training job; `resume_from` is `latest`, `previous` or a step_N tag (trainer.checkpoint).

    One optimizer step per iteration; every phase is a named function below (ARCHITECTURE.md, "The loop").
    """
    run = set_up(config, resume_from)
    window, exit_code = Window(), 0
    batches = run.loader.batches(run.progress.step)
    run.engine.train()  # from_pretrained returns a model in eval mode: dropout would stay off until the first eval
    while run.progress.step < run.steps_total:
        started = time.perf_counter()
        rows = next(batches)
        waited = time.perf_counter() - started
        loss = train_step(run, rows)
        if loss is None:
            exit_code = stop_on_nonfinite(run)
            break
        run.progress.step += 1
        # this data rank's, counted by one of its tensor/pipeline peers; summed over ranks when logged or saved
        step_tokens = run.task.tokens(rows) * run.engine.data_leader
        run.progress.tokens.add(step_tokens)
        window.add(loss, step_tokens, waited, time.perf_counter() - started)
        if run.due(config.train.log_every):
            log_window(run, window, rows)
            window = Window()
        improved, early_stop = maybe_evaluate(run)
        signalled = distributed.all_reduce([float(run.stop.received is not None)], distributed.dist.ReduceOp.MAX).item() > 0
        if run.due(config.train.ckpt_every) or signalled or improved or early_stop:
            run.save()
        if signalled:
            log.info("stopping at step %d on a signal; checkpoint saved, run the same command to resume", run.progress.step)
            exit_code = EXIT_REQUEUE
            break
        if early_stop:
            best = run.best
            log.info("early stop at step %d: %s has not improved for %d evals (best %.4f at step %d)",
                     run.progress.step, best.metric, best.patience, best.value, best.step)
            break
    finish(run, exit_code)
    return exit_code


@dataclass
class Progress:
    """What a checkpoint restores besides the engine's state: the step, the real tokens, the NaN skips."""

    step: int
    tokens: TokenCount
    nan_skips: int


@dataclass
class Run:
    """Everything `set_up` builds and the loop's phases share."""

    config: Config
    rank: int
    world: int
    engine: Engine
    loader: LanesLoader | MixtureLoader
    task: Task
    evaluator: Evaluator
    loss_of: Callable
    checkpoints: Checkpoints
    saver: Saver
    metrics: Metrics
    stop: StopSignal
    best: BestMetric
    progress: Progress
    steps_total: int
    accum: int
    flops_per_token: dict[int, float]  # by row length: the attention term grows with it
    peak_flops: float | None
    seq_lens: SeqLenSchedule  # each step's row length (data.seq_len_schedule)

    def due(self, every: int) -> bool:
        """A periodic event falls on this step: every `every` steps, and always on the last one."""
        return self.progress.step % every == 0 or self.progress.step == self.steps_total

    def save(self) -> None:
        self.saver.save(self.progress.step, self.progress.tokens.sum(), self.progress.nan_skips, self.best)


def set_up(config: Config, resume_from: str) -> Run:
    """Process group, data, model, engine and loader, restored from the checkpoint `resume_from` names."""
    rank, world, _ = distributed.init(config.train.collective_timeout_s)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", force=True)
    manifests = read_manifests(config)
    data, tok = manifests.train[0], manifests.train[0].tokenizer
    data_dir = data.directory
    tokenizer_file = data_dir / tok.path  # copied into each checkpoint
    tokenizer = Tokenizer.from_str(tokenizer_file.read_text())
    steps_total = total_steps(config, data.seq_len)
    seq_lens = seq_len_schedule(config, data.seq_len)
    check_memory(config, world, tok.vocab_size, data.seq_len)  # refuse what cannot fit before building any of it

    checkpoints = Checkpoints(config.run_dir / "checkpoints")
    resume = checkpoints.resume_tag(resume_from)
    state = checkpoints.read_state(resume) if resume else None
    model = build_model(config, model_vocab_size(config, tokenizer, tok.vocab_size), data.seq_len, tok.eos_id, data.labels,
                        config.run.seed, sources=manifests.train)
    if state and state.model_shape != model_shape(model):
        raise CheckpointError(
            f"{checkpoints.root / resume}: checkpoint of model {state.model_shape}, this run builds {model_shape(model)}; "
            "use a new run.name or the old model settings"
        )
    ctx = task_context(config, manifests, tokenizer, model)
    if state and state.trained_doc_attention() not in (None, ctx.doc_attention):
        trained = str(state.trained_doc_attention()).lower()
        raise CheckpointError(f"{checkpoints.root / resume}: trained with data.doc_attention {trained}, this run resolves it to "
                              f"{str(ctx.doc_attention).lower()}; set data.doc_attention={trained} or use a new run.name")
    if ctx.doc_attention:
        attend_within_documents(model)  # SDPA per document span, not a dense mask (trainer.document_attention)
    task = build_task(ctx)
    parts = validation_parts(task, ctx, manifests.named_valid)
    evaluator = Evaluator(config, tokenizer, tok.eos_id, positions(model.config), parts)
    engine = build_engine(adapt(model, config), config, world, steps_total, state.world_size if state else None)
    accum = config.train.accumulation(engine.data_world)
    # the model's loss, or mixed with a teacher's (distill)
    loss_of = objective(config, model, tokenizer_file, engine.place_frozen, ctx.doc_attention)
    progress = Progress(0, TokenCount(0), 0)
    best = BestMetric(config.train.best_metric, config.train.best_mode, config.train.early_stop_patience)
    if state:
        progress = resume_engine(config, checkpoints, resume, state, engine, best, rank, world)
        if resume_from != "latest":
            distributed.barrier()  # every rank has read the checkpoints before rank 0 moves the newer ones
            if rank == 0:
                checkpoints.rewind(resume)

    loader = build_loader(config, manifests.train, engine.data_rank, engine.data_world, ctx.doc_attention)
    if config.task.type == "multitask":
        task.route(loader.row_sources())
    if state:
        check_data(checkpoints.root / resume, state, loader)
    # a source with `exhaust: stop` may end the run early; the engine's LR schedule keeps the planned length
    steps_total = loader.end_step(progress.step, steps_total)
    config_text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    if rank == 0:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        (config.run_dir / "config.yaml").write_text(config_text)
    metrics = Metrics(config.run_dir, rank == 0, progress.step, config_text, config.metrics.tensorboard)
    saver = Saver(engine, checkpoints, config, loader, data_dir, tokenizer_file, world, rank)
    if rank == 0:
        engine_name = f"ZeRO-{config.engine.zero_stage}" if config.engine.type == "deepspeed" else "FSDP2"
        log.info("%s: %d steps, %d processes × %d micro-batches of %d rows × %d tokens, %s, %s%s%s", config.task.type,
                 steps_total, world, accum, config.train.micro_batch, data.seq_len, engine_name, config.precision,
                 ", attention within documents" if ctx.doc_attention else "",
                 f", {seq_lens.describe()}" if config.data.seq_len_schedule else "")
    return Run(config, rank, world, engine, loader, task, evaluator, loss_of, checkpoints, saver, metrics, StopSignal(), best,
               progress, steps_total, accum, {s: flops_per_token(engine.module, s) for s in seq_lens.lengths},
               peak_flops(config.metrics.peak_tflops), seq_lens)


def check_data(checkpoint: Path, state: TrainerState, loader: LanesLoader | MixtureLoader) -> None:
    """A checkpoint continues only the batch sequence it was written for: the same fingerprint and, for a
    mixture, the rows per source that the mixture gives at its step."""
    if state.data_fingerprint != loader.fingerprint():
        raise CheckpointError(
            f"{checkpoint}: written for other data, seed, global batch or lanes (fingerprint "
            f"{state.data_fingerprint[:12]}…, now {loader.fingerprint()[:12]}…); use a new run.name"
        )
    if state.sources != loader.source_state(state.step):
        raise CheckpointError(f"{checkpoint}: per-source rows {state.sources} differ from the "
                              f"{loader.source_state(state.step)} the mixture gives at step {state.step}; use a new run.name")


def resume_engine(config: Config, checkpoints: Checkpoints, resume: str, state: TrainerState, engine: Engine,
                  best: BestMetric, rank: int, world: int) -> Progress:
    """Load the engine's shards and this rank's RNG streams from checkpoint `resume`; the progress it recorded."""
    if state.engine != config.engine.type:
        raise CheckpointError(f"{checkpoints.root / resume}: written by engine {state.engine}, "
                              f"this run uses {config.engine.type}")
    try:
        engine.load(checkpoints.root, resume)
    except (CheckpointError, ConfigError) as err:
        raise CheckpointError(f"{err}; `--resume-from previous` continues from the checkpoint before {resume}") from None
    rng_file = checkpoints.root / resume / f"rng_rank{rank}.txt"
    if state.world_size == world and rng_file.exists():
        set_rng_state(rng_file.read_text())
    best.restore(state.best)
    log.info("resumed from %s (step %d, written by %d processes)", checkpoints.root / resume, state.step, state.world_size)
    return Progress(state.step, TokenCount(state.tokens), state.nan_skips)


def train_step(run: Run, rows: np.ndarray) -> float | None:
    """One optimizer step: forward, backward and step over this rank's micro-batches of `rows`.

    Returns the step's mean loss on this rank, or None when `train.nan_policy` says stop on a non-finite
    loss (the parameters are then those after the last completed step). A rank replaces its own non-finite
    micro-batch loss by a backward of zeros, so every rank's engine stays in step; the ranks agree on the
    non-finite micro-batches in one collective before the update, not one per micro-batch (a collective per
    micro-batch made every rank wait for the slowest at each of them). The whole step is this one function so
    that an engine that owns the micro-batch schedule (pipeline parallel) can replace it.
    """
    config, engine, progress = run.config, run.engine, run.progress
    batch = run.seq_lens.cut(torch.from_numpy(rows).to(distributed.device()), progress.step)
    micro_batch = len(batch) // run.accum  # train.micro_batch rows, or S/s times as many cut rows of the same tokens
    poisoned = progress.step + 1 in config.debug.nan_at_steps  # micro-batch 0's loss made NaN
    if engine.pipelined:  # the engine's schedule runs all micro-batches (trainer.parallel.pipeline)
        step_loss, non_finite = engine.forward_backward(run.task.inputs(batch, progress.step, train=True), poisoned)
        if non_finite and not skip_nonfinite(run, non_finite, f"{non_finite} of the pipeline's micro-batches"):
            return None
        engine.step()
        return step_loss
    # the loss summed on the device and read once per step; one flag per micro-batch, agreed on after the last
    step_loss, finite = torch.zeros((), dtype=torch.float64, device=batch.device), [1.0] * run.accum
    for micro in range(run.accum):
        inputs = run.task.inputs(batch[micro * micro_batch : (micro + 1) * micro_batch], progress.step, micro, train=True)
        output = engine.forward(**inputs)
        loss = run.loss_of(inputs, output)
        if poisoned and micro == 0:
            loss = loss * float("nan")
        if torch.isfinite(loss):  # this rank's own loss, read on the host: no collective
            step_loss += loss.detach().double() / run.accum
        else:
            finite[micro] = 0.0
            loss = output.logits.float().sum() * 0.0  # a zero gradient keeps every rank's engine in step
        engine.backward(loss)
        if micro < run.accum - 1:
            engine.step()  # accumulates: the update is at the last micro-batch's step
    agreed = distributed.all_reduce(finite, distributed.dist.ReduceOp.MIN)  # non-finite on any rank
    if bad := [micro for micro, ok in enumerate(agreed.tolist()) if ok < 1]:
        if not skip_nonfinite(run, len(bad), ", ".join(f"micro-batch {micro}" for micro in bad)):
            return None
    engine.step()
    return step_loss.item()


def skip_nonfinite(run: Run, count: int, where: str) -> bool:
    """Count `count` non-finite micro-batch losses; whether `train.nan_policy` lets the step go on without them."""
    progress = run.progress
    progress.nan_skips += count
    log.warning("step %d: non-finite loss in %s (%d so far)", progress.step + 1, where, progress.nan_skips)
    return run.config.train.nan_policy != "stop" and progress.nan_skips <= run.config.train.max_nan_skips


def stop_on_nonfinite(run: Run) -> int:
    """Save the last good state and give the exit code that says why the run stopped."""
    run.save()
    log.error("stopped at step %d: non-finite loss (train.nan_policy=%s); last good state saved", run.progress.step + 1,
              run.config.train.nan_policy)
    return EXIT_NONFINITE


class Window:
    """Sums over the steps since the last log line: loss, real tokens, data wait and step time."""

    def __init__(self) -> None:
        self.loss, self.steps, self.tokens, self.wait, self.time = 0.0, 0, 0, 0.0, 0.0

    def add(self, loss: float, tokens: int, wait: float, elapsed: float) -> None:
        self.loss, self.steps, self.tokens = self.loss + loss, self.steps + 1, self.tokens + tokens
        self.wait, self.time = self.wait + wait, self.time + elapsed


def log_window(run: Run, window: Window, rows: np.ndarray) -> None:
    """Log the window's record (collective: loss, tokens and the batch digest are summed over ranks)."""
    engine, world = run.engine, run.world
    own_lanes = run.loader.local_lane_digests(rows) * engine.data_leader  # each lane once, not once per tensor peer
    lane_digests = distributed.all_reduce(torch.from_numpy(own_lanes), distributed.dist.ReduceOp.SUM)
    loss_sum, window_tokens = distributed.all_reduce([window.loss / window.steps, window.tokens]).tolist()
    record = {
        "loss": loss_sum / world, "lr": engine.lr, "grad_norm": engine.grad_norm, "tokens": run.progress.tokens.sum(),
        "tokens_per_s": window_tokens / window.time, "step_s": window.time / window.steps,
        "data_wait_frac": window.wait / window.time, "batch_digest": batch_digest(lane_digests.numpy()),
        "peak_mem_gb": peak_memory_gb(), "nan_skips": run.progress.nan_skips, "seq_len": run.seq_lens.at(run.progress.step - 1),
    }
    sources = run.loader.source_record(run.progress.step)  # a mixture's rows, tokens, epoch and weight per source
    record.update(sources)
    if run.peak_flops:
        record["mfu"] = run.flops_per_token[record["seq_len"]] * record["tokens_per_s"] / (run.peak_flops * world)
    run.metrics.log(run.progress.step, record, {**TRAIN_TAGS, **{key: key for key in sources}})
    log.info("step %d/%d | loss %.4f | lr %.2e | gnorm %s | %.0f tok/s | %.2f s/step | data wait %.1f%%",
             run.progress.step, run.steps_total, record["loss"], record["lr"],
             "-" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}",
             record["tokens_per_s"], record["step_s"], 100 * record["data_wait_frac"])


def maybe_evaluate(run: Run) -> tuple[bool, bool]:
    """Evaluate when it is due and there is something to score (valid splits, downstream tasks):
    (the best metric improved, early stop is due)."""
    if not (run.evaluator.active and run.due(run.config.train.eval_every)):
        return False, False
    step = run.progress.step
    run.engine.eval()
    evaluation = run.evaluator.evaluate(run.engine)
    run.engine.train()
    record = {f"eval_{k}": v for k, v in evaluation.scalars.items()}
    run.metrics.log(step, record, {f"eval_{k}": f"eval/{k}" for k in evaluation.scalars})
    for name, text in evaluation.texts.items():
        run.metrics.text(step, f"eval/{name}", text)
    log.info("step %d | eval %s", step, " | ".join(f"{k} {v:.4f}" for k, v in evaluation.scalars.items()))
    improved = run.best.update(evaluation.scalars, step)
    return improved, run.best.exhausted()


def finish(run: Run, exit_code: int) -> None:
    """Stop the reader threads and writers; after a completed run, rank 0 exports the best (or last) checkpoint."""
    run.saver.wait()
    run.loader.close()
    run.task.close()
    run.evaluator.close()
    run.metrics.close()
    if exit_code == 0 and run.rank == 0:
        from trainer.export import export

        final = run.checkpoints.best() or tag(run.progress.step)
        out = export(run.checkpoints.root / final, run.config.run_dir / "export")
        log.info("exported %s from %s; TensorBoard: tensorboard --logdir %s", out, final, run.config.run_dir / "tb")
    distributed.barrier()


class TokenCount:
    """Real (non-padding) tokens trained on, all ranks together. Each rank counts its own rows; the sum
    over ranks is taken when a step is logged or checkpointed, so a step has no collective for it."""

    def __init__(self, total: int) -> None:
        self.total, self.pending = total, 0

    def add(self, local: int) -> None:
        self.pending += local

    def sum(self) -> int:
        """The total over all ranks: a collective, called by every rank at the same step."""
        self.total += int(distributed.all_reduce([self.pending]).item())
        self.pending = 0
        return self.total


class Saver:
    """Writes a checkpoint collectively: every rank its shards into step_N.tmp, then rank 0 publishes.

    With `train.async_checkpoint` the engine writes in the background: the loop waits only while the state is
    copied to host memory, and a thread on rank 0 publishes (COMPLETE, rename, `latest`) once every rank's files
    are written. At most one write is in flight: the next save, the end of the run and a stop on a signal wait
    for it first. A kill during the write leaves `latest` at the previous checkpoint.
    """

    def __init__(self, engine, checkpoints: Checkpoints, config: Config, loader: LanesLoader | MixtureLoader, data_dir: Path,
                 tokenizer_file: Path, world: int, rank: int) -> None:
        self.engine, self.checkpoints, self.config, self.loader = engine, checkpoints, config, loader
        self.data_dir, self.tokenizer_file, self.world, self.rank = data_dir, tokenizer_file, world, rank
        self.in_flight: threading.Thread | None = None
        self.failed: Exception | None = None  # the background write's error, raised by `wait`

    def save(self, step: int, tokens: int, nan_skips: int, best: BestMetric) -> None:
        started, checkpoints = time.perf_counter(), self.checkpoints
        self.wait()
        if self.rank == 0:
            checkpoints.clear_staging(step)
        distributed.barrier()
        staging = checkpoints.root / checkpoints.staging(step)
        with _writing(staging, checkpoints):
            staging.mkdir(parents=True, exist_ok=True)  # a background writer makes its own files later
            written = self.engine.save(checkpoints.root, staging.name)
            (staging / f"rng_rank{self.rank}.txt").write_text(rng_state())
        # what rank 0 publishes, taken now: the run goes on while a background write finishes
        state, waited = self._state(step, tokens, nan_skips, best), time.perf_counter() - started
        publish = functools.partial(self._publish, staging, state, best.step == step, waited)
        if written is None:
            distributed.barrier()
            if self.rank == 0:
                publish()
            distributed.barrier()
        else:
            self.in_flight = threading.Thread(target=self._finish_write, args=(written, staging, publish), daemon=True)
            self.in_flight.start()

    def wait(self) -> None:
        """Until the checkpoint being written in the background is written (and on rank 0 published); its error."""
        if self.in_flight is not None:
            self.in_flight.join()
            self.in_flight = None
        if self.failed is not None:
            failed, self.failed = self.failed, None
            raise failed

    def _finish_write(self, written: Future, staging: Path, publish: Callable[[], None]) -> None:
        try:
            with _writing(staging, self.checkpoints):
                written.result()
            if self.rank == 0:
                publish()
        except Exception as err:  # raised in the loop's thread by `wait`
            self.failed = err

    def _state(self, step: int, tokens: int, nan_skips: int, best: BestMetric) -> TrainerState:
        model = base_model(self.engine.module)
        return TrainerState(step, tokens, self.loader.fingerprint(), self.world, self.config.engine.type,
                            self.config.engine.zero_stage, model_shape(model), nan_skips, self.config.to_dict(), best.state(),
                            self.loader.source_state(step), doc_attention=self.loader.doc_positions)

    def _publish(self, staging: Path, state: TrainerState, is_best: bool, waited: float) -> None:
        checkpoints, config = self.checkpoints, self.config
        with _writing(staging, checkpoints):
            (staging / "tokenizer.json").write_bytes(self.tokenizer_file.read_bytes())
            template = self.data_dir / "tokenizer_config.json"  # the chat template, when the data has one
            if template.exists():
                (staging / template.name).write_bytes(template.read_bytes())
            (staging / "hf_config.json").write_text(base_model(self.engine.module).config.to_json_string())
            final = checkpoints.publish(state, config.train.keep_last, config.train.keep_every, best=is_best)
        log.info("checkpoint %s%s (the loop waited %.3f s%s)", final, " (best so far)" if is_best else "", waited,
                 ", written in the background" if self.config.train.async_checkpoint else "")


@contextlib.contextmanager
def _writing(staging: Path, checkpoints: Checkpoints) -> Iterator[None]:
    """A failed checkpoint write (a full disk, a quota) as one line naming the directory; `latest` is untouched."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if isinstance(err, distributed.dist.DistError):
            raise
        free = shutil.disk_usage(checkpoints.root).free / 2**20
        raise StorageError(f"{staging}: writing the checkpoint failed ({first_line(err, 200)}; {free:.1f} MiB free there); "
                          f"`latest` still names {checkpoints.latest() or 'no checkpoint'}") from None
