"""BERT-style masked-LM pretraining on packed token rows.

Masking is dynamic (new positions every step, as RoBERTa does) yet reproducible: the positions of a
micro-batch are drawn from a generator seeded by (run seed, step, rank, micro-batch), so a resumed
run masks exactly what the uninterrupted one did. Of the selected tokens 80% become the mask
token, 10% a random token and 10% stay. With `whole_word_masking` a word's sub-tokens are selected
together. `task.sentence_task` adds BERT's next-sentence or ALBERT's sentence-order prediction
(RoBERTa found NSP does not help, hence off by default). A tokenizer without a mask token (a BPE
trained by `data_tools prepare`) gets one extra id past its vocabulary; the model has room for it.
With document attention (`data.doc_attention`, see trainer.tasks.causal_lm) positions restart at
each document and every token attends both ways within its own document only.
"""

from __future__ import annotations

import torch
from tokenizers.models import WordPiece

from trainer import distributed
from trainer.tasks.base import IGNORE, Evaluation, special_ids, step_generator, token_losses
from trainer.tasks.causal_lm import CausalLM, split_positions

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

    def row_inputs(self, rows: torch.Tensor, step: int, micro: int, rank: int) -> dict[str, torch.Tensor]:
        gen = step_generator(self.config.run.seed, step, micro, rank)
        positions = None
        if self.ctx.doc_attention:  # BERT attends within each document (bidirectional) and restarts its positions
            rows, positions = split_positions(rows)
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
        inputs = {"input_ids": masked, "labels": labels}
        if positions is not None:
            inputs["position_ids"] = positions
        if self.config.task.sentence_task != "none":
            inputs = sentence_pairs(inputs, self.config.task.sentence_task, gen)
        return {name: tensor.to(rows.device) for name, tensor in inputs.items()}

    def evaluate(self, engine) -> Evaluation:
        """Loss and accuracy over the masked tokens (and the sentence task's accuracy over the rows) of the same
        masked valid rows every time, summed exactly over micro-batches and ranks: the loss is the masked-token
        mean, so it does not depend on micro_batch or world size (the sentence task's loss is not in it)."""
        stats = torch.zeros(5, dtype=torch.float64)  # masked-token loss sum, masked tokens, correct tokens, pairs, rows
        with torch.no_grad():
            for inputs, real in self.valid_micro_batches(engine):
                output = engine.forward(**inputs)
                logits = output.logits if "logits" in output else output.prediction_logits
                losses, counted = token_losses(logits, inputs["labels"])
                correct = ((logits.argmax(-1) == inputs["labels"]) & counted).sum().item()
                pairs = 0
                if "next_sentence_label" in inputs:
                    pairs = (output.seq_relationship_logits.argmax(-1) == inputs["next_sentence_label"]).sum().item()
                stats += torch.tensor([losses.sum().item(), counted.sum().item(), correct, pairs, real.sum().item()],
                                      dtype=torch.float64)
        loss_sum, masked, correct, pairs, n_rows = distributed.all_reduce(stats).tolist()
        scalars = {"loss": loss_sum / max(masked, 1), "masked_accuracy": correct / max(masked, 1)}
        if self.config.task.sentence_task != "none":
            scalars[f"{self.config.task.sentence_task}_accuracy"] = pairs / n_rows
        return Evaluation(scalars)


def sentence_pairs(inputs: dict[str, torch.Tensor], kind: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Cut each row into halves A | B; label 1 rows get B from the next row (nsp) or become B | A (sop).

    Packed rows carry no sentence boundaries, so the halves are consecutive text spans, as ALBERT's
    segments are; token_type_ids mark the second span.
    """
    ids, labels = inputs["input_ids"], inputs["labels"]
    half = ids.shape[1] // 2
    flip = torch.rand(len(ids), generator=gen) < 0.5
    if kind == "nsp":
        other = torch.roll(torch.arange(len(ids)), -1)
        second = torch.where(flip[:, None], ids[other, half:], ids[:, half:])
        second_labels = torch.where(flip[:, None], labels[other, half:], labels[:, half:])
        ids, labels = torch.cat([ids[:, :half], second], 1), torch.cat([labels[:, :half], second_labels], 1)
    else:
        swapped = lambda t: torch.cat([t[:, half:], t[:, :half]], 1)  # noqa: E731
        ids = torch.where(flip[:, None], swapped(ids), ids)
        labels = torch.where(flip[:, None], swapped(labels), labels)
    first_len = torch.where(flip & (kind == "sop"), ids.shape[1] - half, half)
    token_type_ids = (torch.arange(ids.shape[1])[None] >= first_len[:, None]).long()
    return {"input_ids": ids, "labels": labels, "token_type_ids": token_type_ids, "next_sentence_label": flip.long()}
