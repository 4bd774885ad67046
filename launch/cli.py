"""`python -m launch`: start training or data preparation on one machine or on SLURM, and follow it.

    python -m launch local --config X [--nproc N] [--launcher deepspeed] [--dry-run] [key=value …]
    python -m launch slurm train --config X --nodes 2 --gpus-per-node 8 --time 04:00:00 [--partition P …] [--resume-from step_N]
                                 [--dry-run] [k=v …]
    python -m launch slurm data --time 02:00:00 [--array-parallelism 64] [--dry-run] <data_tools prepare options>
    python -m launch status DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_tools.arrays import DEFAULT_MAX_ARRAY_SIZE, DEFAULT_PARALLELISM
from launch import sbatch

LOCAL_HELP = "N processes on this machine through torchrun or the deepspeed launcher"


def _time(value: str) -> str:
    try:
        sbatch.minutes(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _add_resources(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SLURM resources (sbatch options of the same names)")
    group.add_argument("--time", required=True, type=_time, help="time limit per allocation, e.g. 04:00:00 or 240 (minutes)")
    group.add_argument("--partition")
    group.add_argument("--account")
    group.add_argument("--qos")
    group.add_argument("--constraint")
    group.add_argument("--exclusive", action="store_true")
    group.add_argument("--mem", help="memory per node in sbatch's syntax, e.g. 200G or 0 (all)")
    group.add_argument("--cpus-per-task", type=int)
    group.add_argument("--setup", action="append", default=[], metavar="COMMAND",
                       help="shell line run before the job starts, e.g. 'module load cuda/12.4'; repeatable")
    group.add_argument("--dry-run", action="store_true", help="print the sbatch script(s) and what the tasks run; submit nothing")


def _resources(args: argparse.Namespace) -> sbatch.Resources:
    return sbatch.Resources(args.time, args.partition, args.account, args.qos, args.constraint, args.exclusive, args.mem,
                            args.cpus_per_task, args.setup)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("local", help=LOCAL_HELP, description=LOCAL_HELP, allow_abbrev=False)
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--nproc", type=int, help="processes (default: the GPUs here, or 1)")
    p.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    p.add_argument("--dry-run", action="store_true", help="print the command line only")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    slurm = sub.add_parser("slurm", help="submit to SLURM").add_subparsers(dest="job", required=True)
    p = slurm.add_parser("train", allow_abbrev=False, help="a training run: N nodes × one task per GPU, requeued until done")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node, one task each; 0 on a CPU cluster")
    p.add_argument("--tasks-per-node", type=int, help="trainer processes per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--max-requeues", type=int, default=10, help="requeues of one job before it stops asking (default 10)")
    p.add_argument("--signal-delay", type=int, default=120, metavar="SECONDS",
                   help="SIGUSR2 this long before --time: the trainer checkpoints and the job requeues (default 120)")
    p.add_argument("--resume-from", metavar="previous|step_N",
                   help="the trainer's --resume-from for the job's first allocation; requeued ones continue from latest")
    _add_resources(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="trainer config overrides, e.g. train.max_steps=1000")

    p = slurm.add_parser("data", allow_abbrev=False, help="data_tools prepare as job arrays; other options go to prepare",
                         usage="python -m launch slurm data --time T [options] <data_tools prepare options>")
    p.add_argument("--array-parallelism", type=int, default=DEFAULT_PARALLELISM,
                   help=f"array elements running at once, over all the arrays of a stage (default {DEFAULT_PARALLELISM})")
    p.add_argument("--max-array-size", type=int, default=DEFAULT_MAX_ARRAY_SIZE,
                   help="the cluster's MaxArraySize (scontrol show config | grep MaxArraySize): a larger stage is "
                   f"submitted as several arrays (default {DEFAULT_MAX_ARRAY_SIZE})")
    _add_resources(p)

    p = sub.add_parser("status", help="job state, requeues, last checkpoint and step of a run or data directory")
    p.add_argument("directory", type=Path)
    return parser


def _tasks_per_node(args: argparse.Namespace) -> int:
    if args.gpus_per_node and args.tasks_per_node not in (None, args.gpus_per_node):
        raise sbatch.LaunchError(f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {args.gpus_per_node}: "
                                 "the trainer runs one process per GPU")
    return args.tasks_per_node or args.gpus_per_node or 1


def slurm_train(args: argparse.Namespace) -> int:
    from launch.slurm import TrainJob

    job = TrainJob(args.config, args.overrides, args.nodes, args.gpus_per_node, _tasks_per_node(args), args.max_requeues,
                   args.signal_delay, _resources(args), args.resume_from)
    if args.dry_run:
        print(job.describe())
        return 0
    job_id = job.submit()
    print(f"submitted job {job_id}: {job.nodes} nodes × {job.tasks_per_node} tasks, run directory {job.run_dir}")
    print(f"log:    tail -f {sbatch.log_path(job.run_dir, job_id)}")
    print(f"status: python -m launch status {job.run_dir}")
    return 0


def slurm_data(args: argparse.Namespace, prepare_args: list[str]) -> int:
    from launch.data_array import DataJobs, pending_steps, summary

    jobs = DataJobs(prepare_args, args.array_parallelism, _resources(args), args.max_array_size)
    code = jobs.plan()
    if code:
        return code
    steps = pending_steps(jobs.out, jobs.output)
    if not steps:
        print(f"{jobs.out}: every stage is done; nothing to submit")
    elif args.dry_run:
        print(jobs.describe(steps))
    else:
        for step, name, tasks, job_id, first in jobs.submit(steps):
            print(f"submitted {summary(step, name, tasks)}: job {job_id}   log: tail -f {sbatch.log_path(jobs.out, first)}")
        print(f"status: python -m launch status {jobs.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from data_tools.common import DstrainError

    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    is_data = args.command == "slurm" and args.job == "data"
    if rest and not is_data:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "local":
            from launch.local import run

            return run(args.config, args.overrides, args.nproc, args.launcher, args.dry_run)
        if args.command == "status":
            from launch.status import status

            print("\n".join(status(args.directory)))
            return 0
        return slurm_data(args, rest) if is_data else slurm_train(args)
    except (sbatch.LaunchError, DstrainError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
