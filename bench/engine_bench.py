"""DeepSpeed ZeRO-2 against FSDP2: step time of the same tiny model, same batches, 2 CPU processes.

Both engines run `torchrun --nproc-per-node 2 -m trainer` on the same token shards (BPE-4096,
256-token rows from the sample WARCs), fp32, global batch 16 = 2 ranks × 2 micro-batches of 4
rows. step_s comes from each run's metrics.jsonl (batch fetch to optimizer step, logging
excluded); the first WARMUP steps are left out. Engines alternate over ROUNDS rounds so a change
in the shared machine's load hits both.

    .venv/bin/python bench/engine_bench.py
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, WARMUP, ROUNDS = 30, 5, 2
ENGINES = {"DeepSpeed ZeRO-2": ["engine.type=deepspeed", "engine.zero_stage=2"], "FSDP2": ["engine.type=fsdp2"]}


def prepare(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "data_tools", "-q", "prepare", "--input", str(ROOT / "examples/corpora/*.warc.gz"),
                    "--output", str(out), "--train-tokenizer", "4096", "--seq-len", "256", "--valid-fraction", "0.05"],
                   check=True, capture_output=True)
    return out / "tokens" / "train"


def step_times(data: Path, run_dir: Path, engine: list[str]) -> list[float]:
    overrides = [
        f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", f"data.train={data}", "model.arch=llama",
        "model.hidden_size=128", "model.num_layers=4", "model.num_heads=4", "data.lanes=8", "train.global_batch=16",
        "train.micro_batch=4", f"train.max_steps={STEPS}", "train.log_every=1", "train.ckpt_every=100000", *engine,
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "trainer", *overrides],
                   check=True, capture_output=True, env=env, cwd=ROOT)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_s"] for r in records if "step_s" in r and r["step"] > WARMUP]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(Path(tmp) / "data")
        times: dict[str, list[float]] = {name: [] for name in ENGINES}
        for round_ in range(ROUNDS):
            for name in (list(ENGINES) if round_ % 2 == 0 else list(reversed(ENGINES))):
                times[name] += step_times(data, Path(tmp) / f"{name.split()[0]}-{round_}", ENGINES[name])
    print(f"2 processes, fp32 CPU, Llama 128×4, 16 rows × 256 tokens per step; {ROUNDS} runs × {STEPS - WARMUP} steps each")
    print(f"{'engine':20}{'mean s/step':>13}{'median':>9}{'tokens/s':>10}")
    for name, values in times.items():
        mean = statistics.fmean(values)
        print(f"{name:20}{mean:>13.3f}{statistics.median(values):>9.3f}{16 * 256 / mean:>10.0f}")
    ds, fsdp = (statistics.fmean(v) for v in times.values())
    print(f"ratio FSDP2 / DeepSpeed ZeRO-2 (s/step): {fsdp / ds:.2f}x")


if __name__ == "__main__":
    main()
