"""BERT-style masked-LM pretraining on packed token rows.

Masking is dynamic (new positions every step, as RoBERTa does) yet reproducible: the positions of a
micro-batch are drawn from a generator seeded by (run seed, step, rank, micro-batch), so a resumed
run masks exactly what the uninterrupted one did. Of the selected tokens 80% become the mask
token, 10% a random token and 10% stay. With `whole_word_masking` a word's sub-tokens are selected
together. A tokenizer without a mask token (a BPE trained by `data_tools prepare`) gets one extra
id past its vocabulary; the model is built with room for it.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers.models import WordPiece

from trainer import distributed
from trainer.tasks.base import IGNORE, Evaluation, special_ids
from trainer.tasks.causal_lm import CausalLM

MASK_TOKENS = ("[MASK]", "<mask>")


class MaskedLM(CausalLM):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.vocab = ctx.tokenizer.get_vocab_size()
        found = ctx.token_id(*MASK_TOKENS)
        self.mask_id = found if found is not None else self.vocab  # the extra id `model_vocab_size` makes room for
        self.special = special_ids(ctx)
        self.word_start = self._word_starts() if self.config.task.whole_word_masking else None

    def _word_starts(self) -> torch.Tensor:
        """Which ids begin a word: WordPiece continues words with '##', byte-level BPE begins them with 'Ġ'."""
        vocab = self.ctx.tokenizer.get_vocab()
        wordpiece = isinstance(self.ctx.tokenizer.model, WordPiece)
        starts = torch.zeros(self.vocab + 1, dtype=torch.bool)
        for token, i in vocab.items():
            starts[i] = not token.startswith("##") if wordpiece else token.startswith(("Ġ", "▁"))
        starts[self.special] = True
        return starts

    def inputs(self, rows: torch.Tensor, step: int, micro: int = 0, train: bool = False) -> dict[str, torch.Tensor]:
        rank = distributed.dist.get_rank()
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.config.run.seed, step + 1, rank, micro]).generate_state(1)[0]))
        ids = rows.cpu()
        probs = torch.rand(ids.shape, generator=gen)
        if self.word_start is not None:  # one draw per word, shared by its sub-tokens
            word = torch.cumsum(self.word_start[ids].long(), dim=1)
            probs = torch.gather(probs, 1, (word - 1).clamp(min=0))
        selected = (probs < self.config.task.mlm_probability) & ~torch.isin(ids, self.special)
        labels = torch.where(selected, ids, IGNORE)
        action = torch.rand(ids.shape, generator=gen)
        random_ids = torch.randint(self.vocab, ids.shape, generator=gen)
        masked = torch.where(selected & (action < 0.8), self.mask_id, ids)
        masked = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, masked)
        device = rows.device
        return {"input_ids": masked.to(device), "labels": labels.to(device)}

    def evaluate(self, engine) -> Evaluation:
        """Loss and masked-token accuracy on the same masked valid batches every time."""
        stats = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, masked tokens
        with torch.no_grad():
            for i, rows in enumerate(self.valid_batches()):
                inputs = self.inputs(rows, -1, i)
                output = engine.forward(**inputs)
                labels = inputs["labels"]
                counted = labels != IGNORE
                n = counted.sum().item()
                correct = ((output.logits.argmax(-1) == labels) & counted).sum().item()
                stats += torch.tensor([output.loss.item() * n, correct, n], dtype=torch.float64)
        loss_sum, correct, n = distributed.all_reduce(stats).tolist()
        loss = loss_sum / max(n, 1)
        return Evaluation({"loss": loss, "masked_accuracy": correct / max(n, 1)})
