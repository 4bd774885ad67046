"""Compiled blocks, activation checkpointing and async checkpoints, each against its plain setting, in one run.

Every row is a 2-process `torchrun -m trainer` run on CPU (gloo, fp32) on the same token shards (BPE-4096,
256-token rows from the sample WARCs), so the ratios come from runs on the same machine minutes apart:
- compile: `engine.compile` true vs false, Llama 128×4, both engines; mean step_s after the first WARMUP steps
  (the first steps compile), and the loss at the last step (compiled vs eager: equal to float tolerance);
- activation checkpointing: none / full / selective, Llama 256×4, micro-batch 8 rows; peak resident memory per
  process (mem/peak_gb: on CPU the process's peak RSS, the ~0.5 GB of libraries included, so the rows' differences
  are the activations) and step time;
- checkpoints: `train.async_checkpoint` false vs true, FSDP2, Llama 512×8 (27M parameters: ~0.3 GB of weights and
  Adam moments per checkpoint), a checkpoint every CKPT_EVERY steps; the time the loop waits per checkpoint, from
  each checkpoint's log line (sync: the whole write; async: the copy to host memory, plus any wait for the
  previous write).

    .venv/bin/python bench/step_knobs_bench.py
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from engine_bench import prepare

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 3
ENGINES = {"FSDP2": ["engine.type=fsdp2"], "DeepSpeed ZeRO-2": ["engine.type=deepspeed", "engine.zero_stage=2"]}
CKPT_EVERY, CKPT_STEPS = 3, 12


def run(data: Path, run_dir: Path, *overrides: str) -> tuple[list[dict], str]:
    """One 2-process run: (its train records, its log)."""
    args = [f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", f"data.train={data}", "model.arch=llama",
            "data.lanes=8", "train.log_every=1", "train.ckpt_every=100000", "schedule.warmup_steps=2", *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "trainer", *args],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        sys.exit(f"{run_dir.name} failed: {errors[0] if errors else result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "step_s" in r], result.stdout + result.stderr


def mean_step_s(records: list[dict]) -> float:
    return statistics.fmean(r["step_s"] for r in records if r["step"] > WARMUP)


def compile_rows(data: Path, tmp: Path) -> None:
    model = ["model.hidden_size=128", "model.num_layers=4", "model.num_heads=4", "train.global_batch=16",
             "train.micro_batch=4", "train.max_steps=15"]
    print(f"compile: Llama 128×4, 16 rows × 256 tokens per step, mean s/step of steps {WARMUP + 1}-15")
    print(f"{'engine':20}{'eager s/step':>14}{'compiled':>10}{'ratio':>7}{'loss eager':>12}{'compiled':>10}")
    for name, engine in ENGINES.items():
        eager, _ = run(data, tmp / f"eager-{name[:5]}", *model, *engine)
        compiled, _ = run(data, tmp / f"compiled-{name[:5]}", *model, *engine, "engine.compile=true")
        ratio = mean_step_s(compiled) / mean_step_s(eager)
        print(f"{name:20}{mean_step_s(eager):>14.3f}{mean_step_s(compiled):>10.3f}{ratio:>6.2f}x"
              f"{eager[-1]['loss']:>12.5f}{compiled[-1]['loss']:>10.5f}")


def checkpointing_rows(data: Path, tmp: Path) -> None:
    model = ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=4", "train.global_batch=16",
             "train.micro_batch=8", "train.max_steps=6"]
    print("\nactivation checkpointing: Llama 256×4, micro-batch 8 rows × 256 tokens; peak RSS per process")
    print(f"{'engine':20}{'mode':>10}{'peak GB':>9}{'vs none':>9}{'s/step':>8}{'vs none':>9}")
    for name, engine in ENGINES.items():
        base = None
        for mode in ("none", "full", "selective"):
            records, _ = run(data, tmp / f"ac-{mode}-{name[:5]}", *model, *engine, f"engine.activation_checkpointing={mode}")
            peak, step = max(r["peak_mem_gb"] for r in records), mean_step_s(records)
            base = base or (peak, step)
            print(f"{name:20}{mode:>10}{peak:>9.3f}{peak - base[0]:>+9.3f}{step:>8.3f}{step / base[1]:>8.2f}x")


def waited(log: str) -> list[float]:
    return [float(s) for s in re.findall(r"the loop waited ([0-9.]+) s", log)]


def async_rows(data: Path, tmp: Path) -> None:
    model = ["engine.type=fsdp2", "model.hidden_size=512", "model.num_layers=8", "model.num_heads=8", "train.global_batch=8",
             "train.micro_batch=4", f"train.max_steps={CKPT_STEPS}", f"train.ckpt_every={CKPT_EVERY}", "train.keep_last=1"]
    print(f"\ncheckpoints: FSDP2, Llama 512×8, a checkpoint every {CKPT_EVERY} steps, {CKPT_STEPS // CKPT_EVERY} per run")
    print(f"{'mode':8}{'loop waited per checkpoint, s':>32}{'mean':>8}{'s/step':>8}")
    means = {}
    for mode in ("sync", "async"):
        records, log = run(data, tmp / f"ckpt-{mode}", *model, f"train.async_checkpoint={str(mode == 'async').lower()}")
        times = waited(log)
        means[mode] = statistics.fmean(times)
        print(f"{mode:8}{' '.join(f'{t:.3f}' for t in times):>32}{means[mode]:>8.3f}{mean_step_s(records):>8.3f}")
    print(f"async / sync time the loop waits per checkpoint: {means['async'] / means['sync']:.0%} (goal <= 25%)")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(Path(tmp) / "data")
        compile_rows(data, Path(tmp))
        checkpointing_rows(data, Path(tmp))
        async_rows(data, Path(tmp))


if __name__ == "__main__":
    main()
