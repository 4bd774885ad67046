"""The training loop. Read it top to bottom and you know what a step does: get a batch, forward,
backward, step, log, maybe evaluate, maybe checkpoint. Everything else is a component.
"""

from __future__ import annotations

import contextlib
import logging
import math
import resource
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer

from data_tools import storage
from data_tools.errors import first_line
from data_tools.manifest import Manifest, load_manifest
from trainer import distributed
from trainer.adapt import adapt
from trainer.checkpoint import Checkpoints, TrainerState, rng_state, set_rng_state, tag
from trainer.config import Config, ConfigError
from trainer.data import LanesLoader, Source, batch_digest, row_shape
from trainer.distill import objective
from trainer.early_stop import BestMetric
from trainer.engines import build_engine
from trainer.metrics import Metrics
from trainer.models import base_model, build_model, flops_per_token
from trainer.tasks import DATA_TASK, TaskContext, build_task, model_vocab_size

log = logging.getLogger("trainer")

EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpointed on SIGTERM/SIGUSR1/SIGUSR2; run the same command again
EXIT_NONFINITE = 65  # EX_DATAERR: stopped on a non-finite loss after checkpointing the last good state
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 per device


class StopSignal:
    """SIGTERM / SIGUSR1 / SIGUSR2 set a flag; the loop acts on it at the next step boundary."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum


def read_manifests(config: Config) -> tuple[list[Manifest], Manifest | None]:
    """The run's manifests, checked to agree with each other and with `task.type`. A multi-task run's
    sources may differ in task and labels (a head each); each is checked against its own valid split."""
    sources = [load_manifest(s.path) for s in config.data.sources()]
    first, accepted = sources[0], DATA_TASK[config.task.type]
    multitask = config.task.type == "multitask"
    for i, (source, manifest) in enumerate(zip(config.data.sources(), sources)):
        if manifest.task not in accepted:
            made_by = f"prepare-finetune --task {manifest.task}" if manifest.task else "data_tools prepare (packed tokens)"
            needs = " or ".join(f"prepare-finetune --task {wanted}" if wanted else "data_tools prepare" for wanted in accepted)
            raise ConfigError(f"data.train {source.path}: made by {made_by}, but task.type {config.task.type} reads data from {needs}")
        if (manifest.seq_len, manifest.tokenizer.sha256, row_shape(manifest)) != (first.seq_len, first.tokenizer.sha256, row_shape(first)):
            raise ConfigError(
                f"data.train {source.path}: seq_len {manifest.seq_len} / tokenizer {manifest.tokenizer.name} differ from "
                f"the first source's {first.seq_len} / {first.tokenizer.name}; a mixture needs one tokenizer and seq_len"
            )
        if not multitask and manifest.labels != first.labels:
            raise ConfigError(f"data.train {source.path}: labels {manifest.labels} differ from the first source's {first.labels}")
        if source.valid:
            check_valid(f"data.train[{i}].valid {source.valid}", load_manifest(source.valid), manifest)
    valid = load_manifest(config.data.valid) if config.data.valid else None
    if valid:
        check_valid(f"data.valid {config.data.valid}", valid, first)
    return sources, valid


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


def total_steps(config: Config, seq_len: int) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    return math.ceil(config.train.max_tokens / (config.train.global_batch * seq_len))


def model_shape(model: torch.nn.Module) -> dict:
    cfg = model.config.to_dict()
    keys = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
            "num_key_value_heads", "intermediate_size", "n_inner", "multitask_heads")
    return {k: cfg[k] for k in keys if k in cfg}


def peak_flops(config: Config) -> float | None:
    if config.metrics.peak_tflops:
        return config.metrics.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((tf * 1e12 for gpu, tf in PEAK_TFLOPS.items() if gpu in name), None)
    return None


def train(config: Config, resume_from: str = "latest") -> int:
    """Run (or continue) the training job; `resume_from` is `latest`, `previous` or a step_N tag (trainer.checkpoint)."""
    rank, world, _ = distributed.init(config.train.collective_timeout_s)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", force=True)
    device = distributed.device()
    tcfg = config.train
    if tcfg.global_batch % (tcfg.micro_batch * world):
        raise ConfigError(
            f"train.global_batch {tcfg.global_batch} must be a multiple of train.micro_batch × world size "
            f"= {tcfg.micro_batch} × {world}"
        )
    accum = tcfg.global_batch // (tcfg.micro_batch * world)
    sources, _ = read_manifests(config)
    data, tok = sources[0], sources[0].tokenizer
    train_path = storage.location(config.data.sources()[0].path)  # a directory, or an object-store URL
    data_dir = train_path if train_path.is_dir() else train_path.parent
    tokenizer_file = data_dir / tok.path  # copied into each checkpoint
    tokenizer = Tokenizer.from_str(tokenizer_file.read_text())
    steps_total = total_steps(config, data.seq_len)

    checkpoints = Checkpoints(config.run_dir / "checkpoints")
    resume = checkpoints.resume_tag(resume_from)
    state = checkpoints.read_state(resume) if resume else None
    model = build_model(config, model_vocab_size(config, tokenizer, tok.vocab_size), data.seq_len, tok.eos_id, data.labels, config.run.seed)
    if state and state.model_shape != model_shape(model):
        raise ConfigError(
            f"{checkpoints.root / resume}: checkpoint of model {state.model_shape}, this run builds {model_shape(model)}; "
            "use a new run.name or the old model settings"
        )
    task = build_task(TaskContext(config, data.seq_len, tokenizer, tok.eos_id, model.config.pad_token_id, data.labels,
                                  config.data.valid))
    engine = build_engine(adapt(model, config), config, world, steps_total, state.world_size if state else None)
    loss_of = objective(config, model, tokenizer_file, engine.place_frozen)  # the model's loss, or mixed with a teacher's (distill)
    step, tokens, nan_skips = 0, TokenCount(0), 0
    best = BestMetric(tcfg.best_metric, tcfg.best_mode, tcfg.early_stop_patience)
    if state:
        if state.engine != config.engine.type:
            raise ConfigError(f"{checkpoints.root / resume}: written by engine {state.engine}, this run uses {config.engine.type}")
        try:
            engine.load(checkpoints.root, resume)
        except ConfigError as err:
            raise ConfigError(f"{err}; `--resume-from previous` continues from the checkpoint before {resume}") from None
        rng_file = checkpoints.root / resume / f"rng_rank{rank}.txt"
        if state.world_size == world and rng_file.exists():
            set_rng_state(rng_file.read_text())
        step, tokens, nan_skips = state.step, TokenCount(state.tokens), state.nan_skips
        best.restore(state.best)
        log.info("resumed from %s (step %d, written by %d processes)", checkpoints.root / resume, step, state.world_size)
        if resume_from != "latest":
            distributed.barrier()  # every rank has read the checkpoints before rank 0 moves the newer ones
            if rank == 0:
                checkpoints.rewind(resume)

    loader = LanesLoader(
        [Source(s.path, s.weight) for s in config.data.sources()],
        seq_len=data.seq_len, global_batch=tcfg.global_batch, lanes=config.data.lanes, seed=config.run.seed,
        rank=rank, world_size=world, vocab_size=tok.vocab_size, eos_id=tok.eos_id, tokenizer_sha256=tok.sha256,
        prefetch=config.data.prefetch, verify=config.data.verify, on_corrupt=config.data.on_corrupt,
    )
    if config.task.type == "multitask":
        task.route(loader.row_sources())
    if state and state.data_fingerprint != loader.fingerprint():
        raise ConfigError(
            f"{checkpoints.root / resume}: written for other data, seed, global batch or lanes (fingerprint "
            f"{state.data_fingerprint[:12]}…, now {loader.fingerprint()[:12]}…); use a new run.name"
        )
    config_text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    if rank == 0:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        (config.run_dir / "config.yaml").write_text(config_text)
    metrics = Metrics(config.run_dir, rank == 0, step, config_text, config.metrics.tensorboard)
    stop = StopSignal()
    flops, peak = flops_per_token(engine.module, data.seq_len), peak_flops(config)
    saver = Saver(engine, checkpoints, config, loader, data_dir, tokenizer_file, world, rank)
    window = {"loss": 0.0, "steps": 0, "wait": 0.0, "time": 0.0, "tokens": 0}
    if rank == 0:
        engine_name = f"ZeRO-{config.engine.zero_stage}" if config.engine.type == "deepspeed" else "FSDP2"
        log.info("%s: %d steps, %d processes × %d micro-batches of %d rows × %d tokens, %s, %s", config.task.type,
                 steps_total, world, accum, tcfg.micro_batch, data.seq_len, engine_name, config.precision)

    batches = loader.batches(step)
    engine.train()  # from_pretrained returns a model in eval mode: dropout would stay off until the first eval
    exit_code = 0
    while step < steps_total:
        started = time.perf_counter()
        rows = next(batches)
        waited = time.perf_counter() - started
        batch = torch.from_numpy(rows).to(device)
        step_loss, stopping = 0.0, False
        for micro in range(accum):
            inputs = task.inputs(batch[micro * tcfg.micro_batch : (micro + 1) * tcfg.micro_batch], step, micro, train=True)
            output = engine.forward(**inputs)
            loss = loss_of(inputs, output)
            if step + 1 in config.debug.nan_at_steps and micro == 0:
                loss = loss * float("nan")
            if distributed.all_reduce([float(torch.isfinite(loss))], distributed.dist.ReduceOp.MIN).item() < 1:
                nan_skips += 1
                log.warning("step %d: non-finite loss in micro-batch %d (%d so far)", step + 1, micro, nan_skips)
                if tcfg.nan_policy == "stop" or nan_skips > tcfg.max_nan_skips:
                    stopping = True
                    break
                loss = output.logits.float().sum() * 0.0  # a zero gradient keeps every rank's engine in step
            else:
                step_loss += loss.item() / accum
            engine.backward(loss)
            engine.step()
        if stopping:  # the parameters are still those after the last completed step
            saver.save(step, tokens.sum(), nan_skips, best)
            log.error("stopped at step %d: non-finite loss (train.nan_policy=%s); last good state saved", step + 1, tcfg.nan_policy)
            exit_code = EXIT_NONFINITE
            break
        step += 1
        step_tokens = task.tokens(rows)  # this rank's; summed over ranks when logged or saved, not every step
        tokens.add(step_tokens)
        window["loss"] += step_loss
        window["steps"] += 1
        window["wait"] += waited
        window["time"] += time.perf_counter() - started
        window["tokens"] += step_tokens

        if step % tcfg.log_every == 0 or step == steps_total:
            lane_digests = distributed.all_reduce(torch.from_numpy(loader.local_lane_digests(rows)), distributed.dist.ReduceOp.SUM)
            loss_sum, window_tokens = distributed.all_reduce([window["loss"] / window["steps"], window["tokens"]]).tolist()
            loss_mean = loss_sum / world
            step_s = window["time"] / window["steps"]
            record = {
                "loss": loss_mean, "lr": engine.lr, "grad_norm": engine.grad_norm, "tokens": tokens.sum(),
                "tokens_per_s": window_tokens / window["time"], "step_s": step_s,
                "data_wait_frac": window["wait"] / window["time"],
                "batch_digest": batch_digest(lane_digests.numpy()), "peak_mem_gb": peak_memory_gb(), "nan_skips": nan_skips,
            }
            scalars = {
                "train/loss": loss_mean, "train/lr": engine.lr, "perf/tokens_per_s": record["tokens_per_s"],
                "perf/step_s": step_s, "perf/data_wait_frac": record["data_wait_frac"], "mem/peak_gb": record["peak_mem_gb"],
                "train/nan_skips": nan_skips,
            }
            if record["grad_norm"] is not None:
                scalars["train/grad_norm"] = record["grad_norm"]
            if peak:
                scalars["perf/mfu"] = record["mfu"] = flops * record["tokens_per_s"] / (peak * world)
            metrics.log(step, scalars, record)
            log.info("step %d/%d | loss %.4f | lr %.2e | gnorm %s | %.0f tok/s | %.2f s/step | data wait %.1f%%",
                     step, steps_total, loss_mean, engine.lr,
                     "-" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}",
                     record["tokens_per_s"], step_s, 100 * record["data_wait_frac"])
            window = {"loss": 0.0, "steps": 0, "wait": 0.0, "time": 0.0, "tokens": 0}

        improved = early_stop = False
        if config.data.has_valid() and (step % tcfg.eval_every == 0 or step == steps_total):
            engine.eval()
            evaluation = task.evaluate(engine)
            engine.train()
            metrics.log(step, {f"eval/{k}": v for k, v in evaluation.scalars.items()}, {f"eval_{k}": v for k, v in evaluation.scalars.items()})
            for name, text in evaluation.texts.items():
                metrics.text(step, f"eval/{name}", text)
            log.info("step %d | eval %s", step, " | ".join(f"{k} {v:.4f}" for k, v in evaluation.scalars.items()))
            improved = best.update(evaluation.scalars, step)
            early_stop = best.exhausted()

        signalled = distributed.all_reduce([float(stop.received is not None)], distributed.dist.ReduceOp.MAX).item() > 0
        if step % tcfg.ckpt_every == 0 or step == steps_total or signalled or improved or early_stop:
            saver.save(step, tokens.sum(), nan_skips, best)
        if signalled:
            log.info("stopping at step %d on a signal; checkpoint saved, run the same command to resume", step)
            exit_code = EXIT_REQUEUE
            break
        if early_stop:
            log.info("early stop at step %d: %s has not improved for %d evals (best %.4f at step %d)",
                     step, best.metric, best.patience, best.value, best.step)
            break

    loader.close()
    task.close()
    metrics.close()
    if exit_code == 0 and rank == 0:
        from trainer.export import export

        final = checkpoints.best() or tag(step)
        out = export(checkpoints.root / final, config.run_dir / "export")
        log.info("exported %s from %s; TensorBoard: tensorboard --logdir %s", out, final, config.run_dir / "tb")
    distributed.barrier()
    return exit_code


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
    """Writes a checkpoint collectively: every rank its shards into step_N.tmp, then rank 0 publishes."""

    def __init__(self, engine, checkpoints: Checkpoints, config: Config, loader: LanesLoader, data_dir: Path,
                 tokenizer_file: Path, world: int, rank: int) -> None:
        self.engine, self.checkpoints, self.config, self.loader = engine, checkpoints, config, loader
        self.data_dir, self.tokenizer_file, self.world, self.rank = data_dir, tokenizer_file, world, rank

    def save(self, step: int, tokens: int, nan_skips: int, best: BestMetric) -> None:
        checkpoints = self.checkpoints
        if self.rank == 0:
            checkpoints.clear_staging(step)
        distributed.barrier()
        staging = checkpoints.root / checkpoints.staging(step)
        with _writing(staging, checkpoints):
            self.engine.save(checkpoints.root, staging.name)
            (staging / f"rng_rank{self.rank}.txt").write_text(rng_state())
        distributed.barrier()
        if self.rank == 0:
            self._publish(staging, step, tokens, nan_skips, best)
        distributed.barrier()

    def _publish(self, staging: Path, step: int, tokens: int, nan_skips: int, best: BestMetric) -> None:
        checkpoints, config = self.checkpoints, self.config
        with _writing(staging, checkpoints):
            (staging / "tokenizer.json").write_bytes(self.tokenizer_file.read_bytes())
            template = self.data_dir / "tokenizer_config.json"  # the chat template, when the data has one
            if template.exists():
                (staging / template.name).write_bytes(template.read_bytes())
            model = base_model(self.engine.module)
            (staging / "hf_config.json").write_text(model.config.to_json_string())
            state = TrainerState(step, tokens, self.loader.fingerprint(), self.world, config.engine.type, config.engine.zero_stage,
                                 model_shape(model), nan_skips, config.to_dict(), best.state())
            final = checkpoints.publish(state, config.train.keep_last, config.train.keep_every, best=best.step == step)
        log.info("checkpoint %s%s", final, " (best so far)" if best.step == step else "")


@contextlib.contextmanager
def _writing(staging: Path, checkpoints: Checkpoints) -> Iterator[None]:
    """A failed checkpoint write (a full disk, a quota) as one line naming the directory; `latest` is untouched."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if isinstance(err, distributed.dist.DistError):
            raise
        free = shutil.disk_usage(checkpoints.root).free / 2**20
        raise ConfigError(f"{staging}: writing the checkpoint failed ({first_line(err, 200)}; {free:.1f} MiB free there); "
                          f"`latest` still names {checkpoints.latest() or 'no checkpoint'}") from None


def peak_memory_gb() -> float:
    """Peak GPU memory allocated, or on CPU the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
