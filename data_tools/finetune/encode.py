"""Checked records → finetuning examples: input ids and targets, the rows the trainer reads.

A row is int32 [2, seq_len]: channel 0 the input ids padded with PAD, channel 1 the targets with
IGNORE wherever no loss is taken (padding included). Targets are not shifted: the Hugging Face
models shift causal-LM labels themselves.

    classification        input: the text with the tokenizer's special tokens; targets[0] = label id
    token_classification  input: the words, pretokenized; each word's first sub-token holds its tag id
    sft                   input: prompt then response (chat template when the tokenizer has one, else
                          prompt "\\n" response EOS); targets = the response's ids, IGNORE on the prompt
    seq2seq               channel 0: source ids (+ the tokenizer's special tokens, else + EOS);
                          channel 1: target ids + EOS

Nothing is cut silently: every truncation is counted per part, every drop per reason, and the
token lengths before cutting are summarised, so the summary shows what `--seq-len` cost.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding, Tokenizer

from data_tools.errors import DataError
from data_tools.finetune.records import Record
from data_tools.finetune.tokenizer import FinetuneTokenizer

PAD = -1
IGNORE = -100
CHANNELS = ["input_ids", "targets"]


@dataclass
class Example:
    record: dict  # the checked fields under their canonical keys, kept in the shard's json
    inputs: list[int]
    targets: list[int]  # from the example's start; IGNORE-padded to seq_len in the row (rows.array)


def _summary(lengths: list[int]) -> dict:
    values = np.asarray(lengths)
    return {
        "min": int(values.min()), "mean": round(float(values.mean()), 1), "p50": int(np.percentile(values, 50)),
        "p95": int(np.percentile(values, 95)), "max": int(values.max()),
    }


class Encoder:
    """Encodes chunks of records for one task, counting drops, cuts and lengths across chunks."""

    def __init__(self, task: str, tok: FinetuneTokenizer, seq_len: int, labels: list[str], too_long: str) -> None:
        self.task, self.chat, self.eos_id, self.seq_len, self.too_long = task, tok.chat, tok.eos_id, seq_len, too_long
        self.tokenizer = Tokenizer.from_str(tok.tokenizer.to_str())  # a copy: truncation is switched on and off
        self.label_ids = {label: i for i, label in enumerate(labels)}
        self.adds_special_tokens = bool(self.tokenizer.encode("", add_special_tokens=True).ids)
        self.dropped: Counter = Counter()
        self.truncated_parts: Counter = Counter()
        self.truncated = 0
        self.words_without_tokens = 0
        self.lengths: dict[str, list[int]] = {}

    def __call__(self, records: list[Record]) -> list[Example]:
        return getattr(self, f"_{self.task}")(records)

    def stats(self) -> dict:
        stats = {
            "dropped": dict(sorted(self.dropped.items())),
            "truncated": self.truncated,
            "truncated_parts": dict(sorted(self.truncated_parts.items())),
            "token_lengths": {part: _summary(lengths) for part, lengths in self.lengths.items() if lengths},
        }
        if self.task == "token_classification":
            stats["words_without_tokens"] = self.words_without_tokens
        return stats

    def _count(self, part: str, lengths: list[int]) -> None:
        self.lengths.setdefault(part, []).extend(lengths)

    def _cut(self, parts: list[str]) -> None:
        self.truncated += bool(parts)
        self.truncated_parts.update(parts)

    def _fit(self, inputs: list, limit: int, **kwargs) -> tuple[list[Encoding], list[int]]:
        """Encode a batch; re-encode the ones longer than `limit` truncated (the tokenizer keeps its
        special tokens when it cuts). Returns the encodings and the lengths before cutting."""
        encodings = self.tokenizer.encode_batch(inputs, **kwargs)
        lengths = [len(e) for e in encodings]
        long = [i for i, n in enumerate(lengths) if n > limit]
        if long:
            self.tokenizer.enable_truncation(limit)
            for i, encoding in zip(long, self.tokenizer.encode_batch([inputs[i] for i in long], **kwargs)):
                encodings[i] = encoding
            self.tokenizer.no_truncation()
        return encodings, lengths

    def _ended(self, texts: list[str], specials: bool) -> tuple[list[list[int]], list[int]]:
        """Ids that end the sequence: with the tokenizer's special tokens, or + EOS (the cut keeps it)."""
        if specials:
            encodings, lengths = self._fit(texts, self.seq_len)
            return [e.ids for e in encodings], lengths
        encodings, lengths = self._fit(texts, self.seq_len - 1, add_special_tokens=False)
        return [e.ids + [self.eos_id] for e in encodings], [n + 1 for n in lengths]

    def _classification(self, records: list[Record]) -> list[Example]:
        encodings, lengths = self._fit([r.values["text"] for r in records], self.seq_len)
        self._count("text", lengths)
        examples = []
        for record, encoding, length in zip(records, encodings, lengths):
            self._cut(["text"] if length > self.seq_len else [])
            examples.append(Example(record.values, encoding.ids, [self.label_ids[record.values["label"]]]))
        return examples

    def _token_classification(self, records: list[Record]) -> list[Example]:
        encodings, lengths = self._fit([r.values["tokens"] for r in records], self.seq_len, is_pretokenized=True)
        self._count("sentence", lengths)
        examples = []
        for record, encoding, length in zip(records, encodings, lengths):
            tags, targets, previous = record.values["tags"], [], None
            for word in encoding.word_ids:
                targets.append(self.label_ids[tags[word]] if word is not None and word != previous else IGNORE)
                previous = word
            cut = length > self.seq_len
            seen = {word for word in encoding.word_ids if word is not None}
            kept_words = max(seen) + 1 if cut and seen else len(tags)  # a cut sentence keeps a prefix of its words
            self.words_without_tokens += kept_words - len(seen)
            self._cut(["sentence"] if cut else [])
            examples.append(Example(record.values, encoding.ids, targets))
        return examples

    def _sft_texts(self, prompt: str, response: str) -> tuple[str, str]:
        """(prompt text, whole example text): the chat template's, or plain `prompt \\n response`."""
        if self.chat is None:
            return f"{prompt}\n", f"{prompt}\n{response}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return (
            self.chat.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True),
            self.chat.apply_chat_template(messages, tokenize=False),
        )

    def _sft(self, records: list[Record]) -> list[Example]:
        texts = [self._sft_texts(r.values["prompt"], r.values["response"]) for r in records]
        prompts = self.tokenizer.encode_batch([p for p, _ in texts], add_special_tokens=False)
        wholes = self.tokenizer.encode_batch([w for _, w in texts], add_special_tokens=False)
        examples = []
        for record, prompt, whole in zip(records, prompts, wholes):
            prompt_ids = prompt.ids
            if whole.ids[: len(prompt_ids)] != prompt_ids:
                raise DataError(
                    f"{record.where}: the prompt's tokens are not a prefix of the whole example's (tokens merge across "
                    "the boundary, or the chat template renders the prompt differently); the response cannot be masked exactly"
                )
            response = whole.ids[len(prompt_ids) :]
            if self.eos_id not in response:  # a chat template ends the turn itself
                response.append(self.eos_id)
            self._count("prompt", [len(prompt_ids)])
            self._count("response", [len(response)])
            cut = []
            if len(prompt_ids) >= self.seq_len:
                if self.too_long == "drop":
                    self.dropped["prompt_too_long"] += 1
                    continue
                prompt_ids, cut = prompt_ids[-(self.seq_len // 2) :], ["prompt"]  # half the row left for the response
            if len(prompt_ids) + len(response) > self.seq_len:
                response, cut = response[: self.seq_len - len(prompt_ids)], cut + ["response"]
            self._cut(cut)
            examples.append(Example(record.values, prompt_ids + response, [IGNORE] * len(prompt_ids) + response))
        return examples

    def _seq2seq(self, records: list[Record]) -> list[Example]:
        sources, source_lengths = self._ended([r.values["source"] for r in records], self.adds_special_tokens)
        targets, target_lengths = self._ended([r.values["target"] for r in records], False)
        self._count("source", source_lengths)
        self._count("target", target_lengths)
        examples = []
        columns = zip(records, sources, targets, source_lengths, target_lengths)
        for record, source, target, source_length, target_length in columns:
            self._cut([part for part, n in (("source", source_length), ("target", target_length)) if n > self.seq_len])
            examples.append(Example(record.values, source, target))
        return examples
