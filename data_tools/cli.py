"""`python -m data_tools` (also the `dstrain-data` script): prepare, run one stage, inspect, prepare-finetune."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from functools import partial
from pathlib import Path

from data_tools import storage
from data_tools.arrays import DEFAULT_MAX_ARRAY_SIZE, DEFAULT_PARALLELISM
from data_tools.common import DataError, DstrainError

log = logging.getLogger("data_tools")


def run_stage_task(out: str, stage: str, index: int, progress=lambda n: None) -> None:
    """One task of a per-task stage; the unit a process pool or a SLURM array element runs."""
    from data_tools.pipeline import Job

    getattr(Job(out), f"run_{stage}")(index, progress)


def run_job(out: Path, workers: int) -> None:
    from data_tools.executor import run_tasks, worker_pool
    from data_tools.pipeline import PER_TASK_STAGES, STAGES, Job

    job = Job(out)
    with worker_pool(workers) as pool:
        for stage in STAGES:
            if stage in PER_TASK_STAGES:
                pending = job.pending(stage)
                if pending:
                    log.info("%s: %d of %d tasks to run", stage, len(pending), job.task_count(stage))
                    run_tasks(partial(run_stage_task, str(out), stage), pending, pool, stage)
            elif not job.is_done(stage):
                log.info("%s", stage)
                getattr(job, f"run_{stage}")()


def prepare(args: argparse.Namespace) -> int:
    from data_tools.config import PipelineConfig
    from data_tools.estimate import summary
    from data_tools.lang import check_languages
    from data_tools.pipeline import Job, Plan
    from data_tools.readers import expand_inputs, plan_tasks
    from data_tools.report import stage_table

    if args.seq_len <= 1:
        raise DataError(f"--seq-len {args.seq_len}: must be at least 2 (a row predicts its next tokens)")
    if not 0 <= args.valid_fraction < 1:
        raise DataError(f"--valid-fraction {args.valid_fraction}: must be in [0, 1)")
    if args.train_tokenizer is not None and args.train_tokenizer < 257:
        raise DataError(f"--train-tokenizer {args.train_tokenizer}: a byte-level BPE needs a vocabulary of at least 257")
    tokenizer, vocab_size = None, args.train_tokenizer
    if args.tokenizer:
        from data_tools.tokenize import load_tokenizer

        vocab_size = load_tokenizer(args.tokenizer).vocab_size  # fail now, not after hours of extraction
        tokenizer = str(Path(args.tokenizer).resolve())
    config = PipelineConfig.from_yaml(args.config)
    if args.langs:
        config.lang.keep = [code.strip() for code in args.langs.split(",") if code.strip()]
    check_languages(config.lang.keep)
    if args.task_mb <= 0:
        raise DataError(f"--task-mb {args.task_mb}: must be positive")
    work = work_dir(args.output, args.work_dir)
    published = is_published_elsewhere(args.output, work)
    if published:
        storage.check_writable(args.output)
    if args.input_list:
        from data_tools.listing import listed_inputs, listed_tasks

        if args.assume_file_mb is not None and args.assume_file_mb <= 0:
            raise DataError(f"--assume-file-mb {args.assume_file_mb}: must be positive")
        listed = listed_inputs(args.input_list, args.input_prefix, args.assume_file_mb)
        tasks = listed_tasks(listed)
        sizes = [(item.format, item.docs, item.mib) for item in listed]
        task_mb = max(item.mib for item in listed)  # a listed file is one task, whole
    else:
        tasks = plan_tasks(expand_inputs(args.input), int(args.task_mb * 2**20))
        sizes, task_mb = task_sizes(tasks), args.task_mb
    plan = Plan(tasks, args.seq_len, tokenizer, args.train_tokenizer, args.valid_fraction, config, task_mb)
    plan.estimate = cost_estimate(plan, sizes, vocab_size, args.array_parallelism, args.max_array_size)
    job = Job(work)
    job.create(plan)
    if args.plan_only:
        print(f"plan written: {job.out / 'plan.json'} ({len(tasks)} tasks)")
        print(summary(plan.estimate))
        return 0
    run_job(job.out, args.workers)
    out = storage.location(args.output)
    if published:
        from data_tools.publish import publish

        publish(work, args.output)
    stats = json.loads((job.out / "stats.json").read_text())
    print(stage_table(stats))
    print(f"\ntoken shards: {out / 'tokens/train'} and {out / 'tokens/valid'} (manifest.json in each)")
    print(f"documents:    {out / 'docs'}")
    print(f"stats:        {out / 'stats.json'}")
    print(f"tensorboard:  tensorboard --logdir {job.out / 'tensorboard'}")
    return 0


def task_sizes(tasks: list[dict]) -> list[tuple[str, int, float]]:
    """(format, assumed documents, MiB) of each planned task: its byte range, or its file's size shared evenly
    among the file's tasks (a whole file, Parquet row groups)."""
    from collections import Counter

    from data_tools.listing import assumed_docs

    tasks_of_file = Counter(task["path"] for task in tasks)
    sizes = []
    for task in tasks:
        path = storage.location(task["path"])
        if task["end"] is None or task["format"] == "parquet":
            size = (0 if storage.is_dir(path) else storage.size(path)) / tasks_of_file[task["path"]]
        else:
            size = task["end"] - task["start"]
        sizes.append((task["format"], assumed_docs(path.name, task["format"], size / 2**20), size / 2**20))
    return sizes


def cost_estimate(plan, sizes: list[tuple[str, int, float]], vocab_size: int, parallelism: int, max_array_size: int) -> dict:
    """The plan's cost estimate (data_tools.estimate) for its stages, task counts and expected peaks."""
    from collections import Counter

    from data_tools.estimate import plan_estimate
    from data_tools.pipeline import STAGES, task_count

    if parallelism < 1:
        raise DataError(f"--array-parallelism {parallelism}: must be at least 1")
    if max_array_size < 1:
        raise DataError(f"--max-array-size {max_array_size}: must be at least 1 (the cluster's MaxArraySize)")
    docs: Counter = Counter()
    for fmt, n, _ in sizes:
        docs[fmt] += n
    stages = [(stage, task_count(plan, stage), plan.peak_mb[stage]) for stage in STAGES]
    return plan_estimate(stages, dict(docs), sum(mib for _, _, mib in sizes), plan.config,
                         2 if vocab_size <= 2**16 else 4, plan.train_tokenizer is not None, parallelism, max_array_size)


def work_dir(output: str, given: Path | None) -> Path:
    """Where the job's intermediate files and markers live: --work-dir, else the output directory itself,
    else (an object-store output) `dstrain-work/<bucket>/<prefix>` under the current directory."""
    if given is not None:
        return given
    if storage.is_url(output):
        return Path("dstrain-work") / output.partition("://")[2].strip("/")
    return Path(output)


def is_published_elsewhere(output: str, work: Path) -> bool:
    """Whether the products are copied from the work directory to --output at the end (`data_tools publish`)."""
    return storage.is_url(output) or work.resolve() != Path(output).resolve()


def publish_job(args: argparse.Namespace) -> int:
    from data_tools.publish import publish

    storage.check_writable(args.output)
    publish(args.work_dir, args.output)
    return 0


def run(args: argparse.Namespace) -> int:
    from data_tools.pipeline import PER_TASK_STAGES, Job

    job = Job(args.output)
    if args.stage in PER_TASK_STAGES:
        index = args.task if args.task is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
        if index is None:
            raise DataError(f"--stage {args.stage} runs one task: give --task N (or run inside a SLURM array)")
        index = int(index)
        if not 0 <= index < job.task_count(args.stage):
            raise DataError(f"--task {index}: stage {args.stage} has tasks 0..{job.task_count(args.stage) - 1}")
        if not job.is_done(args.stage, index):
            run_stage_task(str(job.out), args.stage, index)
    elif not job.is_done(args.stage):
        getattr(job, f"run_{args.stage}")()
    return 0


def inspect(args: argparse.Namespace) -> int:
    from data_tools.manifest import iter_blocks, load_manifest
    from data_tools.report import stage_table

    out = storage.location(args.dir)  # a directory or a published s3:// prefix
    stats_path = out / "stats.json"
    if storage.is_url(out):
        storage.check_readable(out)
    if not storage.exists(stats_path):
        raise DataError(f"{out}: no stats.json; the job has not finished (rerun the same prepare command)")
    stats = json.loads(storage.read_text(stats_path))
    print(stage_table(stats))
    for split in ("train", "valid"):
        m = load_manifest(out / "tokens" / split)
        print(
            f"\n{split}: {m.total_rows} rows × {m.seq_len} = {m.total_tokens} tokens in {len(m.shards)} shards, "
            f"{m.dtype}, tokenizer {m.tokenizer.name} (vocab {m.tokenizer.vocab_size}, eos {m.tokenizer.eos_id})"
        )
    train = load_manifest(out / "tokens" / "train")
    if train.shards:
        from tokenizers import Tokenizer

        rows, meta = next(iter_blocks(out / "tokens" / "train" / train.shards[0].path))
        tokenizer = Tokenizer.from_str(storage.read_text(out / "tokens" / "train" / train.tokenizer.path))
        print(f"\nsample row (shard {train.shards[0].path}, row 0, documents start at {meta['doc_starts'][0]}):")
        print(tokenizer.decode(rows[0].tolist(), skip_special_tokens=False)[: args.chars])
    return 0


def prepare_finetune(args: argparse.Namespace) -> int:
    from data_tools.finetune.prepare import Options, prepare, summary
    from data_tools.finetune.records import FIELD_KEYS

    fields = {key: getattr(args, f"{key}_field") for key in FIELD_KEYS if getattr(args, f"{key}_field") is not None}
    options = Options(
        args.task, args.input, args.output, args.tokenizer, args.seq_len, args.valid_fraction, args.seed, fields, args.too_long,
        args.pack,
    )
    print(summary(options, prepare(options)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from data_tools.finetune.records import FIELD_KEYS, TASK_KEYS, TOO_LONG
    from data_tools.pipeline import STAGES

    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="raw corpora → cleaned documents → token shards + manifest")
    inputs = p.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--input", action="append", help="file, directory or glob; repeatable")
    inputs.add_argument("--input-list", type=Path, metavar="LISTING",
                        help="a file (or .gz) of relative paths, one a line, e.g. Common Crawl's warc.paths.gz; "
                        "with --plan-only: planned without opening the files")
    p.add_argument("--input-prefix", metavar="PREFIX",
                   help="what the listed paths are relative to: https://data.commoncrawl.org/, s3://commoncrawl/ or a "
                   "local directory (default: the listing's directory)")
    p.add_argument("--assume-file-mb", type=float, metavar="MIB",
                   help="size of each listed file, for the estimates (default: the typical size of its kind, "
                   "1024 for a Common Crawl WARC, 80 for a WET)")
    p.add_argument("--output", required=True, help="directory or object-store URL (s3://bucket/prefix) for the products")
    p.add_argument(
        "--work-dir", type=Path,
        help="intermediate files and stage markers (default: --output when it is a directory, else dstrain-work/<bucket>/<prefix>"
        " here); on a cluster it must be on a file system every node shares",
    )
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="tokenizer.json, a tokenizer directory, or vocab.json (+ merges.txt)")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE", help="train a byte-level BPE on the corpus")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--task-mb", type=float, default=128, help="cut larger inputs into tasks of about this size (MiB)")
    p.add_argument("--langs", help="comma-separated ISO codes to keep, e.g. en,fr (default: all)")
    p.add_argument("--config", help="pipeline YAML (thresholds; see examples/pipeline.yaml)")
    p.add_argument("--valid-fraction", type=float, default=0.005)
    p.add_argument("--plan-only", action="store_true", help="write plan.json and stop (for SLURM arrays)")
    p.add_argument("--array-parallelism", type=int, default=DEFAULT_PARALLELISM,
                   help=f"SLURM array elements running at once, for the plan (default {DEFAULT_PARALLELISM})")
    p.add_argument("--max-array-size", type=int, default=DEFAULT_MAX_ARRAY_SIZE,
                   help=f"the cluster's MaxArraySize: larger stages become several arrays (default {DEFAULT_MAX_ARRAY_SIZE})")
    p.set_defaults(func=prepare)

    p = sub.add_parser("run", help="run one stage (one task of it for per-task stages) of a planned job")
    p.add_argument("output", type=Path)
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--task", type=int, help="task index (default: $SLURM_ARRAY_TASK_ID)")
    p.set_defaults(func=run)

    p = sub.add_parser("publish", help="copy a finished job's products from its work directory to --output")
    p.add_argument("work_dir", type=Path)
    p.add_argument("--output", required=True, help="directory or object-store URL")
    p.set_defaults(func=publish_job)

    p = sub.add_parser("inspect", help="manifest summary, stage stats and a decoded sample row")
    p.add_argument("dir", help="the job's output: a directory or an object-store URL (s3://bucket/prefix)")
    p.add_argument("--chars", type=int, default=600, help="characters of the sample row to show")
    p.set_defaults(func=inspect)

    p = sub.add_parser("prepare-finetune", help="labelled or paired examples → [input ids, targets] shards + manifest")
    p.add_argument("--task", required=True, choices=tuple(TASK_KEYS))
    p.add_argument("--input", required=True, help="CSV/TSV, CoNLL, JSONL, Parquet or a datasets save_to_disk directory")
    p.add_argument("--output", required=True, help="gets train/ and valid/, each with shards, manifest.json, tokenizer.json")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer.json, a tokenizer directory, a .gguf file, or package:<module>/<path>")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--valid-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="salts the content hash that orders and splits the examples")
    reads = "; ".join(f"{task} {'/'.join(keys)}" for task, keys in TASK_KEYS.items())
    fields = p.add_argument_group("input fields", f"the column or JSON field holding each value, if not its own name ({reads})")
    for key in FIELD_KEYS:
        fields.add_argument(f"--{key}-field", metavar="NAME")
    p.add_argument("--too-long", choices=TOO_LONG,
                   help="sft: drop (default) an example whose prompt fills --seq-len, or keep the prompt's last tokens")
    p.add_argument(
        "--pack", action="store_true",
        help="sft: fill each train row with several whole examples (valid stays one per row); cheaper per token, but "
        "with no attention reset an example attends to the earlier ones in its row (off by default)",
    )
    p.set_defaults(func=prepare_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except DstrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        where = getattr(args, "output", None) or err.filename
        print(f"error: {where}: no space left on the device; finished tasks are kept, free space and run the same command "
              "to resume", file=sys.stderr)
        return 2
