"""Training tokens/s with and without document attention (CPU, PyTorch SDPA), measured in one run.

What it measures: the mean wall-clock time of one training step (forward, backward, AdamW) of the
Llama `trainer.models.build_model` makes (hidden 256, 4 layers, 4 heads, fp32, 1 thread) on the
same packed rows of the sample WARCs (BPE-4096 trained by `data_tools prepare`, rows of 256 and of
1024 tokens, read by `LanesLoader` with document positions): the first micro-batches of the lane in
order, so the rows hold the corpus's real mix of document lengths. The inputs come from the
causal-LM task itself, so the variants are what the trainer runs:

1. `off` (data.doc_attention=false): every token attends to the whole row before it; SDPA runs
   with `is_causal` and no mask.
2. `dense`: position ids restart at each document; Hugging Face builds a block-diagonal causal mask
   from them and SDPA takes it as a dense boolean mask (model.attention sdpa; what document
   attention cost before trainer.document_attention).
3. `spans` (the default for format 2 shards): the same position ids, attention through
   `trainer.document_attention` (SDPA with `is_causal` on each document's span).

A second table keeps only the micro-batches in which some row holds a document start: a batch
without one runs the same unmasked SDPA in every variant, so this is the worst case for masking.

Why: masking per document should cost at most 5% of training throughput on CPU SDPA. The machine
is shared, so each batch runs in every variant back to back (the order rotating), ROUNDS times, the
first WARMUP batches are left out, and the median of the per-step paired ratios beside the ratio of
the means shows how much spikes from other processes moved it. The last column compares the CPU time
the process used (one thread), which other processes on the cores hardly move.

    .venv/bin/python bench/doc_attention_bench.py [--seq-len 256 1024] [--steps 6]
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
from trainer.document_attention import NAME  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.tasks import TaskContext, build_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "examples" / "corpora"
MICRO_BATCH, WARMUP, ROUNDS = 4, 1, 2
VARIANTS = ("off", "dense", "spans")


def prepare(out: Path, seq_len: int) -> Path:
    cmd = [sys.executable, "-m", "data_tools", "-q", "prepare", "--output", str(out), "--train-tokenizer", "4096",
           "--seq-len", str(seq_len), "--valid-fraction", "0.05", "--input", str(CORPORA / "*.warc.gz")]
    subprocess.run(cmd, check=True, capture_output=True)
    return out / "tokens" / "train"


def first_batches(train: Path, count: int) -> list[np.ndarray]:
    """The lane's first `count` micro-batches ([MICRO_BATCH, 2, seq_len], tokens and document positions)."""
    with LanesLoader([Source(train)], global_batch=MICRO_BATCH, lanes=1, seed=0, rank=0, world_size=1,
                     doc_positions=True) as loader:
        batches = loader.batches(0)
        return [next(batches) for _ in range(count)]


def step_time(variant: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: np.ndarray,
              tasks: dict) -> tuple[float, float]:
    """(wall-clock, CPU) seconds of one training step on `batch`, attending as `variant` says."""
    model.config._attn_implementation = NAME if variant == "spans" else "sdpa"
    inputs = tasks[variant != "off"].inputs(torch.from_numpy(batch if variant != "off" else batch[:, 0].copy()), 0)
    started, cpu = time.perf_counter(), time.process_time()
    model(**inputs).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started, time.process_time() - cpu


def measure(seq_len: int, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        train = prepare(Path(tmp) / "data", seq_len)
        manifest = load_manifest(train)
        tokenizer = Tokenizer.from_file(str(train / manifest.tokenizer.path))
        steps = max(steps, steps * 1024 // seq_len)  # shorter rows: more steps, the same tokens timed
        rows = first_batches(train, steps + WARMUP)
    config = load_config(None, ["data.train=x", "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4"])
    tok = manifest.tokenizer
    model = build_model(config, tok.vocab_size, seq_len, tok.eos_id, [], 0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tasks = {on: build_task(TaskContext(config, seq_len, tokenizer, tok.eos_id, tok.eos_id, [], None, doc_attention=on))
             for on in (False, True)}
    # each batch runs in every variant back to back (the order rotating), so a spike from another process
    # lands on one step of one variant, and the paired ratio of that batch shows it
    times: dict[str, list[list[tuple[float, float]]]] = {variant: [[] for _ in range(steps)] for variant in VARIANTS}
    order = list(VARIANTS)
    for _ in range(ROUNDS):
        for i, batch in enumerate(rows):
            order = order[1:] + order[:1]
            for variant in order:
                seconds = step_time(variant, model, optimizer, batch, tasks)
                if i >= WARMUP:
                    times[variant][i - WARMUP].append(seconds)
    timed = rows[WARMUP:]
    starts_inside = (np.concatenate(timed)[:, 1, 1:] == 0).sum(1)
    with_start = [i for i, batch in enumerate(timed) if (batch[:, 1, 1:] == 0).any()]
    print(f"\n{MICRO_BATCH} rows x {seq_len} tokens per step: {1 + starts_inside.mean():.2f} documents per row, "
          f"{np.mean(starts_inside > 0):.0%} of rows and {len(with_start) / len(timed):.0%} of steps hold a document start")
    for title, chosen in (("every step (the corpus's mix)", range(len(timed))), ("steps with a document start", with_start)):
        if not chosen:
            continue
        print(f"  {title}, {len(chosen)} steps x {ROUNDS} rounds per variant")
        print(f"  {'variant':<8}{'tokens/s (mean)':>17}{'ratio to off':>14}{'paired median':>15}{'CPU-time ratio':>16}")
        wall = {variant: [t[0] for i in chosen for t in runs[i]] for variant, runs in times.items()}
        cpu = {variant: sum(t[1] for i in chosen for t in runs[i]) for variant, runs in times.items()}
        for variant in VARIANTS:
            paired = statistics.median(off / t for off, t in zip(wall["off"], wall[variant]))
            mean = statistics.mean(wall[variant])
            print(f"  {variant:<8}{MICRO_BATCH * seq_len / mean:>17.0f}{statistics.mean(wall['off']) / mean:>14.3f}"
                  f"{paired:>15.3f}{cpu['off'] / cpu[variant]:>16.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=6, help="timed steps of 1024-token rows per variant and round "
                                                             "(after the warm-up); shorter rows take more")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("document attention on CPU SDPA: Llama 256x4, 1 thread, the first batches of the sample WARCs' lane")
    for seq_len in args.seq_len:
        measure(seq_len, args.steps)


if __name__ == "__main__":
    main()
