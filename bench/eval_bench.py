"""Seconds per in-loop downstream evaluation, against the optimizer step it interrupts, measured in one run.

What it measures, in one process, fp32 on the CPU, for the demo's model shape (Llama, hidden 128, 4 layers,
4 heads, 256 positions) with the GPT-2 tokenizer in the repo (50,257 ids: the logits dominate):

1. one optimizer step: a global batch of 16 rows × 256 tokens as 4 micro-batches of 4 (forward, backward, AdamW);
2. one downstream evaluation (`trainer.evaluate.Evaluator.evaluate`, what the loop runs at `train.eval_every`)
   of each committed task in examples/eval, its first --max-examples (`eval.max_examples`), at `eval.batch_size` 16.

Why: an evaluation is paid every eval_every steps; "steps" says what it costs in training time (an eval worth 30
steps at eval_every 1000 adds 3%). Each timing is the median of REPEATS after one warm-up run; the model and the
batches are the same for every row. Seconds scale with the examples (and the vocabulary: the log-softmax
over 50,257 ids is most of a forward here).

    .venv/bin/python bench/eval_bench.py [--repeats 3] [--threads 2] [--max-examples 100]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data_tools.tokenize import load_tokenizer
from trainer.config import load_config
from trainer.evaluate import Evaluator, LoadedModel

ROOT = Path(__file__).resolve().parents[1]
TASKS = sorted((ROOT / "examples" / "eval").glob("*.jsonl"))
SEQ_LEN, ROWS, MICRO = 256, 16, 4


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator growth, first-call setup
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-examples", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer(ROOT / "examples" / "corpora" / "tokenizers" / "gpt2").tokenizer
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50257, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                         num_attention_heads=4, max_position_embeddings=SEQ_LEN, eos_token_id=50256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = torch.randint(0, 50257, (ROWS, SEQ_LEN))

    def train_step() -> None:
        model.train()
        for micro in batch.split(MICRO):
            (model(input_ids=micro, labels=micro).loss / (ROWS // MICRO)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step_s = median_seconds(train_step, args.repeats)
    model.eval()
    rows = [("optimizer step (16 × 256 tokens)", "-", step_s)]
    for task in TASKS:
        config = load_config(None, ["data.train=unused", f"eval.tasks=[{task}]", f"eval.max_examples={args.max_examples}"])
        evaluator = Evaluator(config, tokenizer, 50256, SEQ_LEN, [])
        forwards = sum(len(s.batches) for s in evaluator.scorers)
        seconds = median_seconds(lambda: evaluator.evaluate(LoadedModel(model)), args.repeats)
        rows.append((f"{task.stem} eval ({forwards} forwards)", str(len(evaluator.scorers[0].task.examples)), seconds))
    print(f"{'what':<48} {'examples':>8} {'seconds':>8} {'steps':>6}")
    for what, examples, seconds in rows:
        print(f"{what:<48} {examples:>8} {seconds:>8.2f} {seconds / step_s:>6.1f}")


if __name__ == "__main__":
    main()
