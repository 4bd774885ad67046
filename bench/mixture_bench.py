"""Cost of a weighted mixture (`data.sources`) against one source, measured in one run.

Row 1, through the training loop: the same tiny Llama trained for STEPS steps in one process, on the
web token split alone (`data.train`, the lanes loader) and on a mixture of web, Wikipedia and a held
web split (`data.sources`, a weight schedule on each); tokens/s from metrics.jsonl (the median of the
log windows after the first), the best of REPEATS alternating runs. Goal: the mixture >= 0.98x. On a shared
machine the step time swings more than that between runs, so the loop's own data wait (`data_wait_frac`: the
prefetch thread did not have the batch ready) is printed too: it is the loader's cost the step actually pays.
Row 2, the loaders alone: rows/s of MixtureLoader (three sources) against LanesLoader (one source),
one rank, verification off, timed from `batches(0)` to the last batch.

    python bench/mixture_bench.py [--steps 150] [--rows 200000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from data_tools.cli import main as data_tools_main
from data_tools.manifest import load_manifest
from trainer.data import LanesLoader, Source
from trainer.mixture import MixtureLoader, WeightedSource
from trainer.mixture_weights import WeightSchedule

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "examples" / "corpora"
REPEATS = 3
SEQ_LEN = 128
WEIGHTS = {"web": [[0, 0.6], [100, 0.6], [150, 0.3]], "wiki": [[0, 0.3], [100, 0.3], [150, 0.6]], "held": 0.1}


def prepare(out: Path, name: str, tokenizer: list[str], *inputs: str) -> Path:
    """Token splits of `inputs` (`tokenizer`: prepare's --train-tokenizer or --tokenizer option and value)."""
    argv = ["-q", "prepare", "--output", str(out / name), *tokenizer, "--seq-len", str(SEQ_LEN), "--valid-fraction", "0.1"]
    for path in inputs:
        argv += ["--input", str(CORPORA / path)]
    with contextlib.redirect_stdout(io.StringIO()):  # prepare's own report; this bench prints one table
        if data_tools_main(argv) != 0:
            raise SystemExit(f"could not prepare {name}")
    return out / name / "tokens"


def run_config(out: Path, name: str, data: dict, steps: int) -> Path:
    config = {
        "run": {"name": name, "out_dir": str(out / "runs"), "seed": 0},
        "model": {"arch": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 2},
        "data": {"lanes": 4, **data},
        "train": {"global_batch": 16, "micro_batch": 16, "max_steps": steps, "log_every": 10, "eval_every": 10**6,
                  "ckpt_every": 10**6, "keep_last": 1},
        "engine": {"type": "fsdp2"},
    }
    path = out / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path


def loop_rate(config: Path, run_dir: Path) -> tuple[float, float]:
    """(tokens/s, share of the step time spent waiting for data) of one training run: medians of its log windows
    after the first (start-up and the first batches)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    subprocess.run([sys.executable, "-m", "trainer", "--config", str(config), f"run.name={run_dir.name}"], check=True,
                   capture_output=True, env=env)
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if "tokens_per_s" in w][1:]
    shutil.rmtree(run_dir)  # the next repeat starts afresh
    return statistics.median(w["tokens_per_s"] for w in windows), statistics.median(w["data_wait_frac"] for w in windows)


def rows_read(make: Callable[[], LanesLoader | MixtureLoader], rows: int) -> float:
    """Rows/s of a loader, from `batches(0)` until `rows` rows are in hand; the best of REPEATS."""
    best = 0.0
    for _ in range(REPEATS):
        began, done = time.perf_counter(), 0
        with make() as loader:
            for batch in loader.batches(0):
                done += len(batch)
                if done >= rows:
                    break
        best = max(best, done / (time.perf_counter() - began))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per run")
    parser.add_argument("--rows", type=int, default=200_000, help="rows each loader reads per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # a small vocabulary keeps the step short, so the loader's share of it shows; wiki reuses web's tokenizer
        web = prepare(out, "web", ["--train-tokenizer", "1024"], "handbook-multilingual.warc.gz", "iana.warc.gz")
        wiki = prepare(out, "wiki", ["--tokenizer", str(out / "web" / "tokenizer" / "tokenizer.json")], "enwiki-sample.xml.bz2")
        splits = {"web": web / "train", "wiki": wiki / "train", "held": web / "valid"}
        one = run_config(out, "one", {"train": str(web / "train")}, args.steps)
        mix = run_config(out, "mix", {"sources": [{"name": n, "train": str(splits[n]), "weight": w}
                                                  for n, w in WEIGHTS.items()]}, args.steps)
        loop, wait = {"one": 0.0, "mix": 0.0}, {"one": 1.0, "mix": 1.0}
        for _ in range(REPEATS):  # alternating, so a busy moment on a shared machine hits both
            for name, config in (("one", one), ("mix", mix)):
                rate, waited = loop_rate(config, out / "runs" / name)
                loop[name], wait[name] = max(loop[name], rate), min(wait[name], waited)
        layout = dict(global_batch=64, seed=0, rank=0, world_size=1, verify=False)

        def lanes() -> LanesLoader:
            return LanesLoader([Source(str(splits["web"]))], lanes=8, **layout)

        def mixture() -> MixtureLoader:
            sources = [WeightedSource(n, load_manifest(splits[n]), WeightSchedule.parse(w, n)) for n, w in WEIGHTS.items()]
            return MixtureLoader(sources, pieces=8, **layout)

        rows_read(lanes, args.rows // 10), rows_read(mixture, args.rows // 10)  # warm the page cache and imports
        loader = {"one": rows_read(lanes, args.rows), "mix": rows_read(mixture, args.rows)}
        sizes = {n: load_manifest(p).total_rows for n, p in splits.items()}
    print(f"sources (rows of {SEQ_LEN} tokens): {sizes}; weights {WEIGHTS}; best of {REPEATS}\n")
    rows = {"training loop, Llama 64x2, vocab 1024, 16 x 128 tokens, 1 process: tok/s": loop,
            "loader alone, 64-row batches, 1 rank: rows/s": loader}
    print(f"{'measure':<72} {'one source':>12} {'mixture':>12} {'mixture / one':>14}")
    for name, rate in rows.items():
        print(f"{name:<72} {rate['one']:>12,.0f} {rate['mix']:>12,.0f} {rate['mix'] / rate['one']:>13.3f}x")
    print(f"{'training loop: step time waiting for the next batch (data_wait_frac)':<72} {wait['one']:>12.2%} "
          f"{wait['mix']:>12.2%}")


if __name__ == "__main__":
    main()
