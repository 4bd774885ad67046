"""The training loop. Read it top to bottom and you know what a step does: get a batch, forward,
backward, step, log, maybe evaluate, maybe checkpoint. Everything else is a component.
"""

from __future__ import annotations

import logging
import math
import resource
import signal
import time
from pathlib import Path

import torch
import yaml

from data_tools.manifest import Manifest, load_manifest
from trainer import distributed
from trainer.checkpoint import Checkpoints, TrainerState, rng_state, set_rng_state, tag
from trainer.config import Config, ConfigError
from trainer.data import LanesLoader, Source, batch_digest
from trainer.engines import build_engine
from trainer.metrics import Metrics
from trainer.models import build_model, flops_per_token

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
    sources = [load_manifest(s.path) for s in config.data.sources()]
    first = sources[0]
    for source, manifest in zip(config.data.sources()[1:], sources[1:]):
        if (manifest.seq_len, manifest.tokenizer.sha256) != (first.seq_len, first.tokenizer.sha256):
            raise ConfigError(
                f"data.train {source.path}: seq_len {manifest.seq_len} / tokenizer {manifest.tokenizer.name} differ from "
                f"the first source's {first.seq_len} / {first.tokenizer.name}; a mixture needs one tokenizer and seq_len"
            )
    valid = load_manifest(config.data.valid) if config.data.valid else None
    if valid and (valid.seq_len, valid.tokenizer.sha256) != (first.seq_len, first.tokenizer.sha256):
        raise ConfigError(f"data.valid {config.data.valid}: seq_len or tokenizer differ from data.train's")
    return sources, valid


def total_steps(config: Config, seq_len: int) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    return math.ceil(config.train.max_tokens / (config.train.global_batch * seq_len))


def model_shape(model: torch.nn.Module) -> dict:
    cfg = model.config.to_dict()
    keys = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
            "num_key_value_heads", "intermediate_size", "n_inner")
    return {k: cfg[k] for k in keys if k in cfg}


def peak_flops(config: Config) -> float | None:
    if config.metrics.peak_tflops:
        return config.metrics.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return next((tf * 1e12 for gpu, tf in PEAK_TFLOPS.items() if gpu in name), None)
    return None


def train(config: Config) -> int:
    rank, world, _ = distributed.init()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", force=True)
    device = distributed.device()
    tcfg = config.train
    if tcfg.global_batch % (tcfg.micro_batch * world):
        raise ConfigError(
            f"train.global_batch {tcfg.global_batch} must be a multiple of train.micro_batch × world size "
            f"= {tcfg.micro_batch} × {world}"
        )
    accum = tcfg.global_batch // (tcfg.micro_batch * world)
    sources, valid = read_manifests(config)
    data, tok = sources[0], sources[0].tokenizer
    train_path = Path(config.data.sources()[0].path)
    tokenizer_file = (train_path if train_path.is_dir() else train_path.parent) / tok.path  # copied into each checkpoint
    steps_total = total_steps(config, data.seq_len)

    checkpoints = Checkpoints(config.run_dir / "checkpoints")
    resume = checkpoints.latest()
    state = checkpoints.read_state(resume) if resume else None
    model = build_model(config.model, tok.vocab_size, data.seq_len, tok.eos_id, config.run.seed)
    if state and state.model_shape != model_shape(model):
        raise ConfigError(
            f"{checkpoints.root / resume}: checkpoint of model {state.model_shape}, this run builds {model_shape(model)}; "
            "use a new run.name or the old model settings"
        )
    engine = build_engine(model, config, world, steps_total, state.world_size if state else None)
    step, tokens, nan_skips = 0, 0, 0
    if state:
        if state.engine != config.engine.type:
            raise ConfigError(f"{checkpoints.root / resume}: written by engine {state.engine}, this run uses {config.engine.type}")
        engine.load(checkpoints.root, resume)
        rng_file = checkpoints.root / resume / f"rng_rank{rank}.txt"
        if state.world_size == world and rng_file.exists():
            set_rng_state(rng_file.read_text())
        step, tokens, nan_skips = state.step, state.tokens, state.nan_skips
        log.info("resumed from %s (step %d, written by %d processes)", checkpoints.root / resume, step, state.world_size)

    loader = LanesLoader(
        [Source(s.path, s.weight) for s in config.data.sources()],
        seq_len=data.seq_len, global_batch=tcfg.global_batch, lanes=config.data.lanes, seed=config.run.seed,
        rank=rank, world_size=world, vocab_size=tok.vocab_size, eos_id=tok.eos_id, tokenizer_sha256=tok.sha256,
        prefetch=config.data.prefetch, verify=config.data.verify,
    )
    if state and state.data_fingerprint != loader.fingerprint():
        raise ConfigError(
            f"{checkpoints.root / resume}: written for other data, seed, global batch or lanes (fingerprint "
            f"{state.data_fingerprint[:12]}…, now {loader.fingerprint()[:12]}…); use a new run.name"
        )
    valid_loader = None
    if valid is not None:
        # One lane per rank and one micro-batch per rank per eval batch: a small valid split suffices.
        valid_loader = LanesLoader(
            [Source(config.data.valid)], seq_len=valid.seq_len, global_batch=tcfg.micro_batch * world, lanes=world,
            seed=config.run.seed, rank=rank, world_size=world, verify=config.data.verify,
        )
    config_text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    if rank == 0:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        (config.run_dir / "config.yaml").write_text(config_text)
    metrics = Metrics(config.run_dir, rank == 0, step, config_text, config.metrics.tensorboard)
    stop = StopSignal()
    flops, peak = flops_per_token(engine.module, data.seq_len), peak_flops(config)
    tokens_per_step = tcfg.global_batch * data.seq_len
    window = {"loss": 0.0, "steps": 0, "wait": 0.0, "time": 0.0}
    if rank == 0:
        engine_name = f"ZeRO-{config.engine.zero_stage}" if config.engine.type == "deepspeed" else "FSDP2"
        log.info("training %d steps: %d processes × %d micro-batches of %d rows × %d tokens, %s, %s",
                 steps_total, world, accum, tcfg.micro_batch, data.seq_len, engine_name, config.precision)

    batches = loader.batches(step)
    exit_code = 0
    while step < steps_total:
        started = time.perf_counter()
        rows = next(batches)
        waited = time.perf_counter() - started
        step_loss, stopping = 0.0, False
        for micro in range(accum):
            input_ids = torch.from_numpy(rows[micro * tcfg.micro_batch : (micro + 1) * tcfg.micro_batch]).to(device)
            loss, logits = engine.forward(input_ids)
            if step + 1 in config.debug.nan_at_steps and micro == 0:
                loss = loss * float("nan")
            if distributed.all_reduce([float(torch.isfinite(loss))], distributed.dist.ReduceOp.MIN).item() < 1:
                nan_skips += 1
                log.warning("step %d: non-finite loss in micro-batch %d (%d so far)", step + 1, micro, nan_skips)
                if tcfg.nan_policy == "stop" or nan_skips > tcfg.max_nan_skips:
                    stopping = True
                    break
                loss = logits.float().sum() * 0.0  # a zero gradient keeps every rank's engine in step
            else:
                step_loss += loss.item() / accum
            engine.backward(loss)
            engine.step()
        if stopping:  # the parameters are still those after the last completed step
            save(engine, checkpoints, config, loader, tokenizer_file, step, tokens, nan_skips, world, rank)
            log.error("stopped at step %d: non-finite loss (train.nan_policy=%s); last good state saved", step + 1, tcfg.nan_policy)
            exit_code = EXIT_NONFINITE
            break
        step += 1
        tokens += tokens_per_step
        window["loss"] += step_loss
        window["steps"] += 1
        window["wait"] += waited
        window["time"] += time.perf_counter() - started

        if step % tcfg.log_every == 0 or step == steps_total:
            lane_digests = distributed.all_reduce(torch.from_numpy(loader.local_lane_digests(rows)), distributed.dist.ReduceOp.SUM)
            loss_mean = distributed.all_reduce([window["loss"] / window["steps"]]).item() / world
            step_s = window["time"] / window["steps"]
            record = {
                "loss": loss_mean, "lr": engine.lr, "grad_norm": engine.grad_norm, "tokens": tokens,
                "tokens_per_s": tokens_per_step / step_s, "step_s": step_s, "data_wait_frac": window["wait"] / window["time"],
                "batch_digest": batch_digest(lane_digests.numpy()), "peak_mem_gb": peak_memory_gb(),
            }
            scalars = {
                "train/loss": loss_mean, "train/lr": engine.lr, "perf/tokens_per_s": record["tokens_per_s"],
                "perf/step_s": step_s, "perf/data_wait_frac": record["data_wait_frac"], "mem/peak_gb": record["peak_mem_gb"],
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
            window = {"loss": 0.0, "steps": 0, "wait": 0.0, "time": 0.0}

        if valid_loader is not None and (step % tcfg.eval_every == 0 or step == steps_total):
            eval_loss = evaluate(engine, valid_loader, tcfg.eval_batches, tcfg.micro_batch, device)
            metrics.log(step, {"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50))},
                        {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))})
            log.info("step %d | eval loss %.4f | perplexity %.2f", step, eval_loss, math.exp(min(eval_loss, 50)))

        signalled = distributed.all_reduce([float(stop.received is not None)], distributed.dist.ReduceOp.MAX).item() > 0
        if step % tcfg.ckpt_every == 0 or step == steps_total or signalled:
            save(engine, checkpoints, config, loader, tokenizer_file, step, tokens, nan_skips, world, rank)
        if signalled:
            log.info("stopping at step %d on a signal; checkpoint saved, run the same command to resume", step)
            exit_code = EXIT_REQUEUE
            break

    loader.close()
    if valid_loader is not None:
        valid_loader.close()
    metrics.close()
    if exit_code == 0 and rank == 0:
        from trainer.export import export

        out = export(checkpoints.root / tag(step), config.run_dir / "export")
        log.info("exported %s; TensorBoard: tensorboard --logdir %s", out, config.run_dir / "tb")
    distributed.barrier()
    return exit_code


def save(engine, checkpoints: Checkpoints, config: Config, loader: LanesLoader, tokenizer_file: Path, step: int, tokens: int,
         nan_skips: int, world: int, rank: int) -> None:
    """Every rank writes its shards into step_N.tmp; rank 0 publishes once all are done."""
    if rank == 0:
        checkpoints.clear_staging(step)
    distributed.barrier()
    staging = checkpoints.staging(step)
    engine.save(checkpoints.root, staging)
    (checkpoints.root / staging / f"rng_rank{rank}.txt").write_text(rng_state())
    distributed.barrier()
    if rank == 0:
        (checkpoints.root / staging / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
        (checkpoints.root / staging / "hf_config.json").write_text(engine.module.config.to_json_string())
        state = TrainerState(step, tokens, loader.fingerprint(), world, config.engine.type, config.engine.zero_stage,
                             model_shape(engine.module), nan_skips, config.to_dict())
        final = checkpoints.publish(state, config.train.keep_last, config.train.keep_every)
        log.info("checkpoint %s", final)
    distributed.barrier()


def evaluate(engine, loader: LanesLoader, n_batches: int, micro_batch: int, device: torch.device) -> float:
    """Mean token loss over the first `n_batches` batches of the valid split (the same ones each time)."""
    engine.eval()
    total, count = 0.0, 0
    batches = loader.batches(0)
    with torch.no_grad():
        for _ in range(n_batches):
            rows = next(batches)
            for first in range(0, len(rows), micro_batch):
                loss, _ = engine.forward(torch.from_numpy(rows[first : first + micro_batch]).to(device))
                total, count = total + loss.item(), count + 1
    batches.close()
    engine.train()
    summed = distributed.all_reduce([total, count])
    return (summed[0] / summed[1]).item()


def peak_memory_gb() -> float:
    """Peak GPU memory allocated, or on CPU the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
