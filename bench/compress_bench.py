"""Compression on the sentiment task, measured in one run: accuracy, size on disk and CPU latency of

1. teacher     MiniLM finetuned (examples/finetune/run.sh sentiment → runs/finetune/sentiment-minilm)
2. student     half the depth: the teacher's blocks 0, 2, 4 (`compress prune --structured layers`),
               finetuned with distillation from the teacher (`distill.teacher`), one process
3. pruned      the teacher with 50% of its block weights zeroed by magnitude, no recovery finetune
4. recovered   the same, then a short recovery finetune (`--recover`, --recover-steps) and re-pruned
5. int8        the teacher through `compress quantize --method int8-dynamic`

Targets: int8 within 1 accuracy point of the teacher at <= 0.35x its size; the student >= 95% of
the teacher's accuracy. Latency is single-example forwards with one thread (the machine is shared;
one thread keeps the numbers comparable). Results: bench/out/compress/results.json.

    make bench-compress        (or: OMP_NUM_THREADS=2 .venv/bin/python bench/compress_bench.py [--steps 140] [--recover-steps 70])
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "runs/finetune/sentiment-minilm"
DATA = ROOT / "runs/finetune/data/sentiment"
OUT = ROOT / "bench/out/compress"
RECIPE = ROOT / "examples/finetune/sentiment-minilm.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=140, help="student training steps (global batch 32)")
    parser.add_argument("--recover-steps", type=int, default=70, help="recovery finetune steps of the pruned teacher")
    args = parser.parse_args()
    if not (TEACHER / "export" / "config.json").exists():
        sys.exit(f"no teacher at {TEACHER}/export; run examples/finetune/run.sh sentiment first")
    import torch

    torch.set_num_threads(1)
    from trainer.compress.evaluate import evaluate, table
    from trainer.compress.prune import prune
    from trainer.compress.quantize import quantize

    OUT.mkdir(parents=True, exist_ok=True)
    prune(TEACHER, OUT / "student-init", 0.5, "layers")
    train_student(args.steps)
    models = {
        "teacher": TEACHER,
        "student": OUT / "student" / "export",
        "pruned-50%": prune(TEACHER, OUT / "pruned", 0.5),
        "pruned-50%+recovery": prune(TEACHER, OUT / "recovered", 0.5, recover=RECIPE, recover_steps=args.recover_steps),
        "int8": quantize(TEACHER, OUT / "int8", "int8-dynamic"),
    }
    reports = {name: evaluate(path, DATA / "valid") for name, path in models.items()}
    print(table(reports))
    teacher = reports["teacher"]
    checks = {
        "int8 within 1 point": teacher.metrics["accuracy"] - reports["int8"].metrics["accuracy"] <= 0.01,
        "int8 <= 0.35x size": reports["int8"].size_bytes <= 0.35 * teacher.size_bytes,
        "student >= 95% of teacher": reports["student"].metrics["accuracy"] >= 0.95 * teacher.metrics["accuracy"],
    }
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    results = {name: {**report.row(), "size_ratio": report.size_bytes / teacher.size_bytes} for name, report in reports.items()}
    settings = {"student_steps": args.steps, "recover_steps": args.recover_steps}
    (OUT / "results.json").write_text(json.dumps({"models": results, "checks": checks, **settings}, indent=1) + "\n")
    return 0 if all(checks.values()) else 1


def train_student(steps: int) -> None:
    """The example sentiment run, started from the half-depth init and distilled from the teacher."""
    overrides = [
        "run.name=student", f"run.out_dir={OUT}", f"model.pretrained={OUT / 'student-init'}",
        f"distill.teacher={TEACHER}", "distill.temperature=2.0", "distill.alpha=0.5",
        f"train.max_steps={steps}", f"train.eval_every={steps}", f"train.ckpt_every={steps}", "schedule.warmup_steps=14",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    subprocess.run([sys.executable, "-m", "trainer", "--config", str(RECIPE), *overrides], cwd=ROOT, env=env, check=True)


if __name__ == "__main__":
    sys.exit(main())
