"""Argument parsing for `python -m trainer evaluate` and `python -m trainer compress prune|quantize`."""

from __future__ import annotations

import argparse

from trainer.compress.evaluate import evaluate, table
from trainer.compress.prune import STRUCTURES, prune
from trainer.compress.quantize import METHODS, quantize


def evaluate_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer evaluate",
        description="MODEL --data VALID: task metrics, size, parameters and CPU latency. --checkpoint/--export: the scalars a "
                    "run logs at eval (eval/…: valid losses, downstream tasks), as JSON")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("model", nargs="?", help="run directory, checkpoint, save_pretrained or quantized directory")
    which.add_argument("--checkpoint", help="a step_N checkpoint (or checkpoints/ for the latest): its run's valid sources "
                                            "and eval.tasks, as the loop scores them")
    which.add_argument("--export", help="a save_pretrained export: the downstream --tasks")
    parser.add_argument("--data", help="with MODEL: a valid split's manifest directory")
    parser.add_argument("--tasks", nargs="+", metavar="FILE", help="downstream JSONL task files (a checkpoint: instead of "
                                                                     "its run's eval.tasks)")
    parser.add_argument("--max-examples", type=int, help="score the first N examples of each task")
    args = parser.parse_args(argv)
    if args.model is None:
        from trainer.evaluate import main

        return main(args)
    if args.data is None:
        parser.error("MODEL needs --data VALID_DIR")
    print(table({args.model: evaluate(args.model, args.data)}))
    return 0


def compress_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer compress", description="prune or quantize a trained model")
    commands = parser.add_subparsers(dest="command", required=True)
    pruning = commands.add_parser("prune", help="magnitude or structured pruning")
    pruning.add_argument("model")
    pruning.add_argument("--sparsity", type=float, required=True,
                         help="share of weights (or channels, heads, blocks) removed, in (0, 1)")
    pruning.add_argument("--structured", choices=STRUCTURES, help="remove whole units; unset: unstructured magnitude pruning")
    pruning.add_argument("--recover", metavar="RUN_CONFIG",
                         help="finetune the pruned model briefly with this run config (its task data)")
    pruning.add_argument("--recover-steps", type=int, default=100, help="steps of the recovery finetune (default 100)")
    quantizing = commands.add_parser("quantize", help="torchao weight quantization")
    quantizing.add_argument("model")
    quantizing.add_argument("--method", choices=METHODS, required=True)
    for sub in (pruning, quantizing):
        sub.add_argument("--out", required=True)
        sub.add_argument("--data", help="a valid split: adds task metrics and latency to the before/after table")
    args = parser.parse_args(argv)
    if args.command == "prune":
        out = prune(args.model, args.out, args.sparsity, args.structured, args.recover, args.recover_steps)
    else:
        out = quantize(args.model, args.out, args.method)
    print(table({"before": evaluate(args.model, args.data), "after": evaluate(out, args.data)}))
    return 0
