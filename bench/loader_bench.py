"""LanesLoader throughput against a bare read of the same token shards, measured in one run.

The reference reads every shard in manifest order with `tarfile` + `np.load`, the least a loader
could do; it is timed as loaded (uint16) and cast to int64, which is what the trainer receives.
LanesLoader runs as one rank holding all lanes (verification off: it is a one-off sha256 pass, not
per-step work) and is timed from `batches(0)` to the last batch, so its shard indexing counts.
Each method reads the same number of rows (many epochs of the small sample corpus, page cache warm);
the best of REPEATS runs counts. Target: LanesLoader at >= 0.9x the reference.

    python bench/loader_bench.py [--data TOKEN_SPLIT_DIR] [--rows 100000] [--lanes 8] [--global-batch 64]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tarfile
import tempfile
import time
from collections.abc import Callable
from itertools import cycle
from pathlib import Path

import numpy as np

from data_tools.cli import main as data_tools_main
from data_tools.manifest import load_manifest
from trainer.data import LanesLoader, Source

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT / "examples" / "corpora"
REPEATS = 3


def build_split(out: Path, seq_len: int) -> Path:
    """Token shards of all shipped text corpora: several shards, blocks of 32 rows."""
    config = out / "pack.yaml"
    config.write_text("pack: {rows_per_shard: 128, rows_per_sample: 32}\n")
    argv = ["-q", "prepare", "--output", str(out / "job"), "--tokenizer", str(CORPORA / "tokenizers" / "gpt2")]
    argv += ["--input", str(CORPORA / "*.warc.gz"), "--input", str(CORPORA / "enwiki-sample.xml.bz2")]
    argv += ["--seq-len", str(seq_len), "--valid-fraction", "0", "--config", str(config)]
    with contextlib.redirect_stdout(io.StringIO()):  # prepare's own report; this bench prints one table
        status = data_tools_main(argv)
    if status != 0:
        raise SystemExit("could not build the token shards")
    return out / "job" / "tokens" / "train"


def raw_read(split: Path, rows: int, cast: bool) -> int:
    """Read shards in manifest order (cycling) with tarfile + np.load until `rows` rows are in hand."""
    shards = [split / s.path for s in load_manifest(split).shards]
    done = 0
    for path in cycle(shards):
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.name.endswith(".npy"):
                    block = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
                    done += len(block.astype(np.int64) if cast else block)
                    if done >= rows:
                        return done
    raise AssertionError("unreachable: cycle() never ends")


def loader_read(split: Path, rows: int, lanes: int, global_batch: int) -> int:
    """Batches of one rank holding every lane, until `rows` rows are in hand."""
    layout = dict(global_batch=global_batch, lanes=lanes, seed=0, rank=0, world_size=1)
    with LanesLoader([Source(str(split))], **layout, verify=False) as loader:
        done = 0
        for batch in loader.batches(0):
            done += len(batch)
            if done >= rows:
                return done
    raise AssertionError("unreachable: batches() never ends")


def best_rate(read: Callable[[], int]) -> float:
    """Rows per second of the fastest of REPEATS runs (the machine is shared; slower runs are noise)."""
    rates = []
    for _ in range(REPEATS):
        began = time.perf_counter()
        rows = read()
        rates.append(rows / (time.perf_counter() - began))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a token split (manifest.json + shards); default: build one")
    parser.add_argument("--seq-len", type=int, default=1024, help="when building the split")
    parser.add_argument("--rows", type=int, default=100_000, help="rows each method reads per run")
    parser.add_argument("--lanes", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        split = args.data or build_split(Path(tmp), args.seq_len)
        manifest = load_manifest(split)
        loader = f"LanesLoader ({args.lanes} lanes, 1 rank) -> int64"
        methods = {
            "tarfile + np.load (uint16)": lambda: raw_read(split, args.rows, cast=False),
            "tarfile + np.load -> int64": lambda: raw_read(split, args.rows, cast=True),
            loader: lambda: loader_read(split, args.rows, args.lanes, args.global_batch),
        }
        for read in methods.values():  # warm the page cache and imports before timing
            read()
        rates = {name: best_rate(read) for name, read in methods.items()}
    print(
        f"{manifest.total_rows} rows x {manifest.seq_len} ({manifest.dtype}) in {len(manifest.shards)} shards, "
        f"{manifest.rows_per_sample} rows per block; {args.rows} rows per run, best of {REPEATS}\n"
    )
    print(f"{'method':<42} {'rows/s':>12} {'LanesLoader / this':>20}")
    for name, rate in rates.items():
        print(f"{name:<42} {rate:>12,.0f} {rates[loader] / rate:>19.2f}x")

if __name__ == "__main__":
    main()
