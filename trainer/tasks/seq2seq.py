"""Sequence-to-sequence (translation) with an encoder-decoder model.

Channel 0 holds the source ids, channel 1 the target ids; the model builds its decoder inputs by
shifting the labels right. Evaluation generates a greedy translation of every valid example
(each rank its share) and scores the corpus with sacrebleu's BLEU and chrF.
"""

from __future__ import annotations

import sacrebleu
import torch

from trainer.tasks.base import (
    IGNORE, PAD, Evaluation, FinetuneTask, LossMeter, decode, encoder_inputs, gather, generate, trim, valid_outputs,
)


class Seq2Seq(FinetuneTask):
    def tokens(self, rows) -> int:
        return int((rows[:, 0] != PAD).sum() + (rows[:, 1] != IGNORE).sum())

    def inputs(self, rows: torch.Tensor, step: int, micro: int = 0, train: bool = False) -> dict[str, torch.Tensor]:
        return {**encoder_inputs(rows[:, 0], self.ctx.pad_id), "labels": trim(rows[:, 1], IGNORE).contiguous()}

    def evaluate(self, engine) -> Evaluation:
        loss, hypotheses, references = LossMeter(), [], []
        with torch.no_grad():
            for real, inputs, output in valid_outputs(engine, self, self.config.train.micro_batch):
                loss.add(output.logits, inputs["labels"], real)
                generated = generate(engine, self.ctx, inputs["input_ids"], inputs["attention_mask"])
                for i in real.nonzero()[0]:
                    hypotheses.append(decode(self.ctx, generated[i]))
                    references.append(decode(self.ctx, inputs["labels"][i]))
        hypotheses, references = gather(hypotheses), gather(references)
        shown = list(zip(hypotheses, references))[: self.config.task.generate_samples]
        samples = "\n\n---\n\n".join(f"**reference** {r}\n\n**generated** {h}" for h, r in shown)
        return Evaluation(
            {"loss": loss.mean(), "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
             "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score},
            {"samples": samples},
        )
