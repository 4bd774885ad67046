"""Parallel layouts on the device mesh against pure FSDP2: step time and peak memory per process,
4 CPU processes, the same tiny Llama and the same global batches.

Every layout runs `torchrun --nproc-per-node 4 -m trainer` (engine fsdp2, fp32) on the same token
shards (BPE-4096, 256-token rows from the sample WARCs), global batch 16 in micro-batches of 4 rows
(a layout with fewer data-parallel ranks accumulates more micro-batches per step; a pipeline runs
them through its schedule), embeddings untied in every layout (tied, the last stage holds a copy). step_s and
peak_mem_gb (rank 0's peak resident set: under pp the first stage's) come from metrics.jsonl; the first WARMUP steps are left
out. With ROUNDS > 1 the layouts alternate, so a change in the shared machine's load hits all. On
CPU tensor parallel only adds collectives (gloo, no fast interconnect, no kernel that gets faster
on a smaller shard): the table shows its cost here, not its benefit on GPUs.

    .venv/bin/python bench/parallel_bench.py
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
STEPS, WARMUP, ROUNDS = 10, 3, 1
LAYOUTS = {
    "FSDP2 (dp_shard 4)": [],
    "HSDP (dp_replicate 2 × dp_shard 2)": ["parallel.dp_replicate=2"],
    "dp_shard 2 × tp 2": ["parallel.tp=2"],
    "tp 4": ["parallel.tp=4"],
    "dp_shard 2 × pp 2 (1F1B)": ["parallel.pp=2"],
    "tp 2 × pp 2 (1F1B)": ["parallel.tp=2", "parallel.pp=2"],
}


def prepare(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "data_tools", "-q", "prepare", "--input", str(ROOT / "examples/corpora/*.warc.gz"),
                    "--output", str(out), "--train-tokenizer", "4096", "--seq-len", "256", "--valid-fraction", "0.05"],
                   check=True, capture_output=True)
    return out / "tokens" / "train"


def measure(data: Path, run_dir: Path, layout: list[str]) -> tuple[list[float], float]:
    overrides = [
        f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", f"data.train={data}", "engine.type=fsdp2",
        "model.arch=llama", "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4", "model.tie_embeddings=false",
        "data.lanes=4",
        "train.global_batch=16", "train.micro_batch=4", f"train.max_steps={STEPS}", "train.log_every=1",
        "train.ckpt_every=100000", *layout,
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "-m", "trainer", *overrides],
                   check=True, capture_output=True, env=env, cwd=ROOT)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_s" in r and r["step"] > WARMUP]
    return [r["step_s"] for r in steps], max(r["peak_mem_gb"] for r in steps)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(Path(tmp) / "data")
        times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        memory: dict[str, float] = {}
        for round_ in range(ROUNDS):
            for i, (name, layout) in enumerate(LAYOUTS.items()):
                step_s, peak = measure(data, Path(tmp) / f"run{round_}_{i}", layout)
                times[name] += step_s
                memory[name] = max(memory.get(name, 0.0), peak)
    base = next(iter(LAYOUTS))
    base_s, base_mem = statistics.median(times[base]), memory[base]
    print("| layout (4 CPU processes) | step s (median) | × FSDP2 | peak RSS GiB / process | × FSDP2 |")
    print("| --- | --- | --- | --- | --- |")
    for name in LAYOUTS:
        step_s = statistics.median(times[name])
        print(f"| {name} | {step_s:.3f} | {step_s / base_s:.2f} | {memory[name]:.2f} | {memory[name] / base_mem:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
