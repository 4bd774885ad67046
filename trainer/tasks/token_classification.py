"""Token classification (NER with BIO tags); the data labels only each word's first sub-token.

The metric is entity-level precision / recall / F1 as `seqeval` computes them (CoNLL scoring: an
entity counts only when its type and both boundaries are right), over the whole valid split.
"""

from __future__ import annotations

from seqeval.metrics import f1_score, precision_score, recall_score

from trainer.tasks.base import IGNORE, Evaluation, FinetuneTask, LossMeter, gather, valid_outputs


class TokenClassification(FinetuneTask):
    def evaluate(self, engine) -> Evaluation:
        names = self.ctx.labels
        truth, guess, loss = [], [], LossMeter()
        for real, inputs, output in valid_outputs(engine, self, self.config.train.micro_batch):
            labels = inputs["labels"]
            loss.add(output, labels, real)
            predicted = output.logits.argmax(-1)
            for i in real.nonzero()[0]:
                words = labels[i] != IGNORE
                truth.append([names[t] for t in labels[i][words].tolist()])
                guess.append([names[p] for p in predicted[i][words].tolist()])
        truth, guess = gather(truth), gather(guess)
        return Evaluation({
            "loss": loss.mean(),
            "precision": precision_score(truth, guess, zero_division=0),
            "recall": recall_score(truth, guess, zero_division=0),
            "f1": f1_score(truth, guess, zero_division=0),
        })
