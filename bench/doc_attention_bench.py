"""Training tokens/s with and without document attention (CPU, PyTorch SDPA), measured in one run.

What it measures: the mean wall-clock time of one training step (forward, backward, AdamW) of the
Llama `trainer.models.build_model` makes (hidden 256, 4 layers, 4 heads, fp32, 1 thread) on the
same packed rows of the sample WARCs (BPE-4096 trained by `data_tools prepare`, rows of
`--seq-len` tokens, read by `LanesLoader` with document positions). The inputs come from the
causal-LM task itself, so the two variants are what the trainer runs:

1. `off` (data.doc_attention=false): every token attends to the whole row before it; SDPA runs
   with `is_causal` and no mask.
2. `on` (the default for format 2 shards): position ids restart at each document; Hugging Face
   builds a block-diagonal causal mask from them, and SDPA takes it as a dense boolean mask.

Only batches in which some row holds a document start are timed: a batch without one runs the
same unmasked SDPA in both variants, so this is the worst case for `on`.

Why: masking per document should cost at most 5% of training throughput on CPU SDPA. The machine
is shared, so the variants alternate in ROUNDS rounds (the order reversed every other round), the
first WARMUP steps of each run are left out, and the median beside the mean shows how much spikes
from other processes moved it.

    .venv/bin/python bench/doc_attention_bench.py [--seq-len 1024] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from data_tools.manifest import load_manifest  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data import LanesLoader, Source  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.tasks import TaskContext, build_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "examples" / "corpora"
MICRO_BATCH, WARMUP, ROUNDS = 4, 2, 4
VARIANTS = ("off", "on")


def prepare(out: Path, seq_len: int) -> Path:
    cmd = [sys.executable, "-m", "data_tools", "-q", "prepare", "--output", str(out), "--train-tokenizer", "4096",
           "--seq-len", str(seq_len), "--valid-fraction", "0.05", "--input", str(CORPORA / "*.warc.gz")]
    subprocess.run(cmd, check=True, capture_output=True)
    return out / "tokens" / "train"


def masked_batches(train: Path, seq_len: int, count: int) -> list[np.ndarray]:
    """The first `count` micro-batches ([MICRO_BATCH, 2, seq_len], tokens and document positions) in which
    some row holds a document start: a batch without one runs unmasked SDPA either way, so these are
    the worst case, every step paying for the mask."""
    loader = LanesLoader([Source(train)], global_batch=MICRO_BATCH, lanes=1, seed=0, rank=0,
                         world_size=1, doc_positions=True)
    try:
        return [batch for batch, _ in zip((b for b in loader.batches(0) if (b[:, 1, 1:] == 0).any()), range(count))]
    finally:
        loader.close()


def step_times(variant: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rows: list[np.ndarray],
               tasks: dict) -> list[float]:
    times = []
    for batch in rows:
        inputs = tasks[variant].inputs(torch.from_numpy(batch if variant == "on" else batch[:, 0].copy()), 0)
        started = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times[WARMUP:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant and round (after the warm-up)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        train = prepare(Path(tmp) / "data", args.seq_len)
        manifest = load_manifest(train)
        tokenizer = Tokenizer.from_file(str(train / manifest.tokenizer.path))
        rows = masked_batches(train, args.seq_len, args.steps + WARMUP)
    config = load_config(None, ["data.train=x", "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4"])
    tok = manifest.tokenizer
    model = build_model(config, tok.vocab_size, args.seq_len, tok.eos_id, [], 0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tasks = {variant: build_task(TaskContext(config, args.seq_len, tokenizer, tok.eos_id, tok.eos_id, [], None,
                                             doc_attention=variant == "on")) for variant in VARIANTS}
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for round_ in range(ROUNDS):
        for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
            times[variant] += step_times(variant, model, optimizer, rows, tasks)
    positions = np.concatenate(rows)[:, 1]
    starts_inside = (positions[:, 1:] == 0).sum(1)
    tokens = MICRO_BATCH * args.seq_len
    print(f"document attention on CPU SDPA: Llama 256x4, {MICRO_BATCH} rows x {args.seq_len} tokens per step, 1 thread, "
          f"{ROUNDS} rounds x {args.steps} steps per variant")
    print(f"every step's batch holds a document start (the worst case): {np.mean(starts_inside > 0):.0%} of rows do, "
          f"{1 + starts_inside.mean():.2f} documents per row")
    print(f"{'variant':<8}{'tokens/s (mean)':>17}{'tokens/s (median)':>19}{'ratio to off':>14}")
    base = tokens / statistics.mean(times["off"])
    for variant in VARIANTS:
        mean, median = tokens / statistics.mean(times[variant]), tokens / statistics.median(times[variant])
        print(f"{variant:<8}{mean:>17.0f}{median:>19.0f}{mean / base:>14.3f}")


if __name__ == "__main__":
    main()
