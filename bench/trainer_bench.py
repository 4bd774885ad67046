"""Trainer step time against a bare PyTorch loop and Hugging Face `Trainer`, measured in one run.

What it measures: the mean wall-clock time of one optimizer step (a global batch of 16 rows of
256 tokens = 4 accumulated micro-batches of 4 rows, 1 process, fp32 on CPU) of the same small Llama
(hidden 128, 4 layers, 4 heads, the 4096-token BPE trained on the sample WARCs), built by
`trainer.models.build_model` under the same seed and fed the same batches from `LanesLoader`:

1. dstrain: `python -m trainer` with DeepSpeed ZeRO-`--zero-stage` (default 0), `step_s` and
   `data_wait_frac` read from its metrics.jsonl. step_s runs from fetching the batch to the end of
   the optimizer step (NaN checks included); the per-step logging (log_every=1) falls outside it.
2. bare PyTorch (bench/plain_loop.py): what dstrain's loop would be without DeepSpeed, loader, checks
   or logging: forward/backward per micro-batch, grad clipping, torch AdamW, LambdaLR; batches in memory.
3. HF `Trainer` with the very DeepSpeed config dstrain builds (`ds_config`), and without DeepSpeed
   as a second reference. dstrain's AdamW, LambdaLR and batch order replace HF's defaults (its
   fused AdamW, linear schedule, shuffled rows), so all engines do the same arithmetic. A step is
   the time between consecutive `on_step_end` callbacks, so
   HF's batch fetch and collation (done before `on_step_begin`) count as dstrain's data wait does.

Why: the trainer should cost next to nothing over the bare loop (target <= 1.05x) and less than
HF Trainer on the same DeepSpeed config (target < 1x). Each engine runs in its own process with
the same thread count; the first WARMUP steps of each run are left out (allocator growth, first-step
setup). The machine is shared, so the engines run in ROUNDS rounds, the second in reverse order, and
a mean covers all rounds; the per-run means show how much the load moved, and the medians, which
spikes from other processes barely move, are printed beside the means. HF Trainer needs
`accelerate`, which dstrain does not: if .venv lacks it, it is pip-installed into bench/out/hf-deps.

    .venv/bin/python bench/trainer_bench.py [--zero-stage 0|1|2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import plain_loop  # bench/plain_loop.py: the script's own directory is on sys.path
from rounds import alternating_rounds

if TYPE_CHECKING:  # the engines import these in their own processes
    from data_tools.manifest import Manifest
    from trainer.config import Config

ROOT = Path(__file__).resolve().parents[1]
HF_DEPS = ROOT / "bench" / "out" / "hf-deps"
ACCELERATE = "accelerate==1.15.0"
SEQ_LEN, GLOBAL_BATCH, MICRO_BATCH = 256, 16, 4
STEPS, WARMUP, ROUNDS = 25, 5, 2
THREADS = "1"  # torch threads per engine: on 2 shared cores one thread each gives steadier timings
ENGINES = ("dstrain", "bare", "hf-deepspeed", "hf")


def run_overrides(data: Path, run_dir: Path, zero_stage: int) -> list[str]:
    """The run config of every engine, as `python -m trainer` dotted overrides (no data.valid: eval off)."""
    return [
        f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", "run.seed=0", f"data.train={data}", "data.lanes=8",
        "model.arch=llama", "model.hidden_size=128", "model.num_layers=4", "model.num_heads=4",
        f"train.global_batch={GLOBAL_BATCH}", f"train.micro_batch={MICRO_BATCH}", f"train.max_steps={STEPS}",
        "train.log_every=1", f"train.ckpt_every={10 * STEPS}", "optim.lr=1e-3", "optim.weight_decay=0.1",
        "optim.grad_clip=1.0", "schedule.warmup_steps=10", "schedule.decay=cosine", "engine.type=deepspeed",
        f"engine.zero_stage={zero_stage}", "precision=fp32",
        "data.doc_attention=false",  # the bare loop and HF Trainer attend across the whole row
    ]


@dataclass
class Result:
    """One run of one engine, per step (index 0 = step 1); `wait` is None where nothing waits for data."""

    step_s: list[float]
    loss: list[float]
    digests: list[str]
    wait: list[float] | None = None


# --- one engine, in its own process ---------------------------------------------------------------


def load_run(data: Path, zero_stage: int) -> tuple[Config, Manifest]:
    """The benchmark run's config, as `python -m trainer` parses it, and its data's manifest."""
    from data_tools.manifest import load_manifest
    from trainer.config import load_config

    config = load_config(None, run_overrides(data, Path("no-run-dir"), zero_stage))  # written by dstrain only
    return config, load_manifest(data)


def bare_side(config: Config, manifest: Manifest) -> Result:
    run = plain_loop.train(config, manifest, STEPS)
    return Result(run.step_s, run.loss, run.digests)


def hf_side(config: Config, manifest: Manifest, deepspeed: bool, output_dir: Path) -> Result:
    import numpy as np
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from trainer.engines.deepspeed_engine import ds_config

    batches, digests = plain_loop.global_batches(config, manifest, STEPS)
    model, optimizer, scheduler = plain_loop.model_and_optimizer(config, manifest, STEPS)
    rows = torch.from_numpy(np.concatenate(batches))

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": rows[i], "labels": rows[i]}

    class StepLog(TrainerCallback):
        """When each step began and ended, and its loss (the sum of its micro-batches' scaled losses)."""

        def __init__(self) -> None:
            self.ends: list[float] = []
            self.begins: list[float] = []
            self.losses: list[float] = []
            self.step_loss = 0.0

        def on_train_begin(self, args, state, control, **kwargs) -> None:
            self.ends.append(time.perf_counter())

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.ends.append(time.perf_counter())
            self.losses.append(self.step_loss)
            self.step_loss = 0.0

    log = StepLog()

    class SameRecipeTrainer(Trainer):
        """dstrain's AdamW and LambdaLR, rows in order; adds each micro-batch's loss to the step's."""

        def create_optimizer(self, model=None):
            self.optimizer = self.optimizer or optimizer
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            # HF calls this after deepspeed.initialize; the schedule drives the same AdamW's param groups
            self.lr_scheduler = self.lr_scheduler or scheduler
            return self.lr_scheduler

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            log.step_loss += loss.item()  # already scaled for accumulation: token sum / the step's token count
            return loss

    tcfg, optim = config.train, config.optim
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=tcfg.micro_batch,
        gradient_accumulation_steps=tcfg.accumulation(1), max_steps=STEPS, learning_rate=optim.lr,
        weight_decay=optim.weight_decay, adam_beta1=optim.betas[0], adam_beta2=optim.betas[1], adam_epsilon=optim.eps,
        max_grad_norm=optim.grad_clip, seed=config.run.seed, deepspeed=ds_config(config, 1) if deepspeed else None,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    SameRecipeTrainer(model=model, args=args, train_dataset=Rows(), callbacks=[log]).train()
    step_s = [end - prev for prev, end in zip(log.ends, log.ends[1:])]
    wait = [(begin - prev) / s for prev, begin, s in zip(log.ends, log.begins, step_s)]
    return Result(step_s, log.losses, digests, wait)


def run_side(engine: str, data: Path, zero_stage: int, result: Path) -> None:
    config, manifest = load_run(data, zero_stage)
    if engine == "bare":
        outcome = bare_side(config, manifest)
    else:
        if engine == "hf-deepspeed":
            # dstrain's own one-process setup: RANK/WORLD_SIZE/MASTER_*, gloo, DeepSpeed's CPU
            # accelerator, and no deepspeed_shm_comm JIT build (~25 s) when HF initialises DeepSpeed
            from trainer import distributed

            distributed.init()
        outcome = hf_side(config, manifest, engine == "hf-deepspeed", result.with_suffix(".hf"))
    result.write_text(json.dumps(asdict(outcome)))


# --- the orchestrating process --------------------------------------------------------------------


def prepare_data(out: Path) -> Path:
    cmd = [sys.executable, "-m", "data_tools", "-q", "prepare", "--input", "examples/corpora/*.warc.gz", "--output", str(out),
           "--train-tokenizer", "4096", "--seq-len", str(SEQ_LEN), "--valid-fraction", "0.05"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return out / "tokens" / "train"


def accelerate_path() -> str | None:
    """Where HF Trainer's `accelerate` imports from: .venv (None), or a target dir installed on first use."""
    if importlib.util.find_spec("accelerate"):
        return None
    if not (HF_DEPS / "accelerate").exists():
        # its dependencies (torch, numpy, psutil, pyyaml, huggingface_hub, safetensors) are in .venv already
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(HF_DEPS), ACCELERATE],
                       check=True, capture_output=True)
    return str(HF_DEPS)


def engine_env(pythonpath: str | None) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": THREADS, "TOKENIZERS_PARALLELISM": "false"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    return env


def failure(result: subprocess.CompletedProcess) -> str:
    """The line that says why a run failed: the last error line, else the last line."""
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (errors or lines or [f"exit {result.returncode}, no output"])[-1][:200]


def run_engine(engine: str, data: Path, work: Path, zero_stage: int, pythonpath: str | None) -> Result | str:
    """One run of `engine` in a fresh process: its Result, or why it failed."""
    out = work / f"{engine}-{time.monotonic_ns()}"
    if engine == "dstrain":
        cmd = [sys.executable, "-m", "trainer", *run_overrides(data, out, zero_stage)]
    else:
        cmd = [sys.executable, __file__, "--side", engine, "--data", str(data), "--zero-stage", str(zero_stage),
               "--result", str(out)]
    env = engine_env(pythonpath if engine.startswith("hf") else None)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        return failure(result)
    if engine != "dstrain":
        return Result(**json.loads(out.read_text()))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return Result([r["step_s"] for r in records], [r["loss"] for r in records], [r["batch_digest"] for r in records],
                  [r["data_wait_frac"] for r in records])


def measured(runs: list[Result]) -> list[float]:
    return [s for run in runs for s in run.step_s[WARMUP:]]


def label(engine: str, zero_stage: int) -> str:
    return {"dstrain": f"dstrain ZeRO-{zero_stage}", "bare": "bare PyTorch loop",
            "hf-deepspeed": f"HF Trainer + DeepSpeed ZeRO-{zero_stage}", "hf": "HF Trainer, no DeepSpeed"}[engine]


def print_table(runs: dict[str, list[Result] | str], zero_stage: int) -> None:
    """One row per engine, then dstrain's ratios to the others."""
    print(f"one optimizer step: Llama h128 L4 H4, vocab 4096, {GLOBAL_BATCH} rows x {SEQ_LEN} tokens = "
          f"{GLOBAL_BATCH // MICRO_BATCH} micro-batches of {MICRO_BATCH}, 1 process, fp32 CPU, {THREADS} thread;")
    print(f"mean over steps {WARMUP + 1}-{STEPS} of {ROUNDS} runs each (engines in turn, the second round reversed)")
    print(f"{'':34}{'s/step':>8}{'per run':>13}{'median':>8}{'tok/s':>7}{'data wait':>11}{'loss@1':>9}{f'loss@{STEPS}':>9}")
    ours = runs["dstrain"]
    for engine, result in runs.items():
        name = label(engine, zero_stage)
        if isinstance(result, str):
            print(f"{name:34}failed: {result}")
            continue
        times, first = measured(result), result[0]
        per_run = "/".join(f"{statistics.fmean(run.step_s[WARMUP:]):.2f}" for run in result)
        wait = "-" if first.wait is None else f"{100 * statistics.fmean(w for run in result for w in run.wait[WARMUP:]):.2f}%"
        same = "" if isinstance(ours, str) or first.digests == ours[0].digests else "  (other batches than dstrain!)"
        print(f"{name:34}{statistics.fmean(times):>8.3f}{per_run:>13}{statistics.median(times):>8.3f}"
              f"{GLOBAL_BATCH * SEQ_LEN / statistics.fmean(times):>7.0f}{wait:>11}"
              f"{first.loss[0]:>9.4f}{first.loss[-1]:>9.4f}{same}")
    print("data wait: dstrain's data_wait_frac; HF: the time before on_step_begin (fetch + collate); bare: batches in memory")
    # Same init and batches, so the losses agree to the printed digits; they may still drift in the last
    # ones: DeepSpeed clips with its own norm code and scales by 1/accumulation inside backward, HF sums token
    # losses over the 4 micro-batches and divides once, the bare loop averages 4 means; fp32 rounds by order.
    if isinstance(ours, str):
        return
    for engine, target in (("bare", "  target <= 1.05x"), ("hf-deepspeed", "  target < 1x"), ("hf", "")):
        if not isinstance(runs[engine], str):
            mean, median = (stat(measured(ours)) / stat(measured(runs[engine])) for stat in (statistics.fmean, statistics.median))
            print(f"ratio dstrain / {label(engine, zero_stage)} (s/step): {mean:.3f}x (medians: {median:.3f}x){target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2), default=0, help="ZeRO stage of dstrain and HF+DeepSpeed")
    parser.add_argument("--side", choices=ENGINES[1:], help=argparse.SUPPRESS)  # run one engine, in this process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side(args.side, args.data, args.zero_stage, args.result)
        return
    pythonpath = accelerate_path()
    with tempfile.TemporaryDirectory(prefix="trainer-bench-") as tmp:
        work = Path(tmp)
        data = prepare_data(work / "data")
        runs = alternating_rounds(list(ENGINES), ROUNDS,
                                  lambda engine: run_engine(engine, data, work, args.zero_stage, pythonpath))
    print_table(runs, args.zero_stage)


if __name__ == "__main__":
    main()
