"""`python -m trainer`: train (default), `plan --config …` (memory and FLOPs before a run), `export CHECKPOINT OUT_DIR`,
`evaluate MODEL --data VALID_DIR` or `evaluate --checkpoint DIR | --export DIR [--tasks FILE …]` (the eval/… scalars a
run logs, trainer.evaluate), or `compress prune|quantize MODEL … --out DIR` (trainer.compress).

    python -m trainer --config examples/demo.yaml [--resume-from previous] [dotted.key=value …]
    deepspeed --num_gpus 2 -m trainer --config …      torchrun --nproc-per-node 2 -m trainer --config …
    python -m trainer plan --config examples/llama-8b-deepspeed.yaml --nodes 4 --gpus-per-node 8 --vocab-size 128256
    python -m trainer export runs/demo/checkpoints/step_000300 runs/demo/hf
    python -m trainer evaluate --checkpoint runs/demo/checkpoints/step_000300 --tasks examples/eval/*.jsonl
    python -m trainer compress quantize runs/finetune/sentiment-minilm --method int8-dynamic --out runs/int8 --data VALID_DIR
"""

from __future__ import annotations

import argparse
import os
import sys

from data_tools.common import DstrainError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "export":
            parser = argparse.ArgumentParser(prog="python -m trainer export", description="checkpoint → Hugging Face directory")
            parser.add_argument("checkpoint")
            parser.add_argument("out")
            args = parser.parse_args(argv[1:])
            from trainer.export import export

            print(f"exported {export(args.checkpoint, args.out)}")
            return 0
        if argv and argv[0] in ("evaluate", "compress"):
            from trainer.compress.cli import compress_main, evaluate_main

            return (evaluate_main if argv[0] == "evaluate" else compress_main)(argv[1:])
        if argv and argv[0] == "plan":
            from trainer.plan import main as plan

            return plan(argv[1:])
        parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--config", help="run config YAML (see examples/demo.yaml)")
        parser.add_argument("--local_rank", "--local-rank", type=int, help="set by the deepspeed launcher")
        parser.add_argument("--resume-from", default="latest", metavar="latest|previous|step_N",
                            help="checkpoint to continue from; `previous` skips a damaged newest one (the newer ones move to "
                                 "checkpoints/abandoned/)")
        parser.add_argument("overrides", nargs="*", help="dotted.key=value")
        args = parser.parse_args(argv)
        if args.local_rank is not None:
            os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
        from trainer.config import load_config
        from trainer.loop import train

        return train(load_config(args.config, args.overrides), args.resume_from)
    except DstrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
