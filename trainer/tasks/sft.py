"""Supervised finetuning of a causal LM on prompt → response pairs; the loss is on the response only.

The data marks prompt tokens with IGNORE targets (and applied the tokenizer's chat template when it
has one), so the model's own shifted loss is the response loss. Evaluation: response loss and
perplexity over the valid split, and a few valid prompts answered greedily, logged as text.
"""

from __future__ import annotations

import math

import torch

from trainer import distributed
from trainer.tasks.base import IGNORE, Evaluation, FinetuneTask, LossMeter, decode, generate, valid_outputs


class SFT(FinetuneTask):
    def evaluate(self, engine) -> Evaluation:
        loss = LossMeter(shift=True)
        for real, inputs, output in valid_outputs(engine, self, self.config.train.micro_batch):
            loss.add(output.logits, inputs["labels"], real)
        mean = loss.mean()
        return Evaluation({"loss": mean, "perplexity": math.exp(min(mean, 50))}, {"samples": self.samples(engine)})

    def samples(self, engine) -> str:
        """The first `task.generate_samples` valid prompts, answered on every rank alike (a collective)."""
        parts = []
        with torch.no_grad():
            for row in self.valid.rows[: self.config.task.generate_samples]:
                prompt_len = int((row[1] != IGNORE).argmax())
                prompt = torch.from_numpy(row[0, :prompt_len][None]).to(distributed.device())
                answer = generate(engine, self.ctx, prompt, torch.ones_like(prompt))
                prompt_text, reference = decode(self.ctx, row[0, :prompt_len]), decode(self.ctx, row[0, prompt_len:])
                generated = decode(self.ctx, answer[0])
                parts.append(f"**prompt** {prompt_text}\n\n**reference** {reference}\n\n**generated** {generated}")
        return "\n\n---\n\n".join(parts)
