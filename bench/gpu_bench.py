"""Single-GPU throughput of both engines on a Llama-style ~1B model: tokens/s, MFU, peak memory.

Each engine trains the same model on the same batches for STEPS steps in one process
(`python -m trainer`, bf16, sequence 2048, SDPA/flash attention); the numbers are the means of
the logged steps after WARMUP, read from each run's metrics.jsonl. MFU is the trainer's own:
(6·N + 12·L·H·Q·T) · tokens/s / peak, with the bf16 dense peak of the GPU (H100/H200 989, A100
312 TFLOP/s). The data is the sample corpus tokenized with GPT-2's BPE (so the model has a
50257-token vocabulary, ~1.0 B parameters with Llama-3.2-1B's other sizes).

    .venv/bin/python bench/gpu_bench.py            # on a GPU machine (install a CUDA torch first)
    .venv/bin/python bench/gpu_bench.py --tiny     # a few CPU steps of a tiny model: checks it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "examples" / "corpora"
LLAMA_1B = ["model.hidden_size=2048", "model.num_layers=16", "model.num_heads=32", "model.num_kv_heads=8",
            "model.intermediate_size=8192", "model.tie_embeddings=true"]
TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4"]
ENGINES = {
    "DeepSpeed ZeRO-0": ["engine.type=deepspeed", "engine.zero_stage=0"],
    "DeepSpeed ZeRO-2": ["engine.type=deepspeed", "engine.zero_stage=2"],
    "FSDP2": ["engine.type=fsdp2"],
    "FSDP2 + compile": ["engine.type=fsdp2", "engine.compile=true"],
}


def prepare(out: Path, seq_len: int) -> Path:
    cmd = [sys.executable, "-m", "data_tools", "-q", "prepare", "--output", str(out), "--seq-len", str(seq_len),
           "--tokenizer", str(CORPORA / "tokenizers" / "gpt2"), "--valid-fraction", "0.01", "--workers", "2"]
    for name in ("handbook-multilingual.warc.gz", "iana.warc.gz", "enwiki-sample.xml.bz2"):
        cmd += ["--input", str(CORPORA / name)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out / "tokens" / "train"


def run(data: Path, run_dir: Path, model: list[str], engine: list[str], args: argparse.Namespace) -> dict[str, float]:
    overrides = [
        f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", f"data.train={data}", "data.lanes=4", *model, *engine,
        f"train.global_batch={args.global_batch}", f"train.micro_batch={args.micro_batch}", f"train.max_steps={args.steps}",
        "train.log_every=1", "train.ckpt_every=1000000", f"precision={args.precision}",
    ]
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if not args.tiny else "cpu")}
    result = subprocess.run([sys.executable, "-m", "trainer", *overrides], capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1][:80]}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "step_s" in r and r["step"] > args.warmup] or records[-1:]
    mean = lambda key: statistics.fmean(r[key] for r in timed) if all(key in r for r in timed) else float("nan")  # noqa: E731
    return {"tokens_per_s": mean("tokens_per_s"), "mfu": mean("mfu"), "peak_mem_gb": max(r["peak_mem_gb"] for r in records),
            "step_s": mean("step_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, fp32, CPU: checks the script, measures nothing")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of: " + ", ".join(ENGINES))
    args = parser.parse_args()
    if args.tiny:
        args.seq_len, args.steps, args.warmup, args.global_batch, args.micro_batch, args.precision = 64, 3, 1, 4, 2, "fp32"
    engines = [name.strip() for name in args.engines.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(Path(tmp) / "data", args.seq_len)
        results = {name: run(data, Path(tmp) / f"run{i}", TINY if args.tiny else LLAMA_1B, ENGINES[name], args)
                   for i, name in enumerate(engines)}
    device = "CPU (tiny model: a correctness check, not a measurement)" if args.tiny else "1 GPU"
    print(f"{device}; Llama {'tiny' if args.tiny else '~1B'}, {args.precision}, seq {args.seq_len}, "
          f"{args.global_batch} rows/step ({args.micro_batch} per micro-batch), mean of steps {args.warmup + 1}-{args.steps}")
    print(f"{'engine':20}{'tokens/s':>11}{'MFU':>8}{'peak GB':>9}{'s/step':>8}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:20}  failed: {r['error']}")
            continue
        mfu = "-" if r["mfu"] != r["mfu"] else f"{100 * r['mfu']:.1f}%"
        print(f"{name:20}{r['tokens_per_s']:>11.0f}{mfu:>8}{r['peak_mem_gb']:>9.2f}{r['step_s']:>8.3f}")


if __name__ == "__main__":
    main()
