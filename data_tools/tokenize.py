"""Tokenizers: load a local one, or train a byte-level BPE on the cleaned corpus; encode with EOS.

Accepted: a `tokenizer.json`, a Hugging Face tokenizer directory (holding `tokenizer.json` or
`vocab.json` + `merges.txt`), or a `vocab.json` whose `merges.txt` lies beside it. Whatever was
given, the job saves it as `tokenizer/tokenizer.json`; the manifest records that file's sha256.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_tools.common import DataError, first_line

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")
TRAINED_EOS = "<|endoftext|>"


@dataclass
class LoadedTokenizer:
    tokenizer: Tokenizer
    name: str
    eos_id: int

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def _find_eos(tokenizer: Tokenizer, where: str) -> int:
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataError(f"{where}: tokenizer has none of the end-of-text tokens {', '.join(EOS_CANDIDATES)}; add one")


def load_tokenizer(path: str | Path) -> LoadedTokenizer:
    path = Path(path)
    if not path.exists():
        raise DataError(f"--tokenizer {path}: no such file or directory")
    name = path.name if path.is_dir() else path.parent.name
    if path.is_dir() and (path / "tokenizer.json").exists():
        path = path / "tokenizer.json"
    if path.is_dir() or path.name == "vocab.json":
        folder = path if path.is_dir() else path.parent
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if not (vocab.exists() and merges.exists()):
            raise DataError(f"--tokenizer {path}: expected tokenizer.json, or vocab.json with merges.txt beside it")
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        eos_id = _find_eos(tokenizer, str(path))
        tokenizer.add_special_tokens([tokenizer.id_to_token(eos_id)])
        return LoadedTokenizer(tokenizer, name, eos_id)
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for bad JSON
        raise DataError(f"--tokenizer {path}: not a tokenizers JSON file ({first_line(err)})") from None
    return LoadedTokenizer(tokenizer, name, _find_eos(tokenizer, str(path)))


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> LoadedTokenizer:
    """Byte-level BPE as GPT-2 uses it, with `<|endoftext|>` as the only special token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TRAINED_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return LoadedTokenizer(tokenizer, f"bpe-{vocab_size}", tokenizer.token_to_id(TRAINED_EOS))


def encode_documents(tok: LoadedTokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch of documents, EOS after each; return (tokens uint32, per-document lengths)."""
    encode = getattr(tok.tokenizer, "encode_batch_fast", tok.tokenizer.encode_batch)
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
    ends = np.cumsum(lengths)
    for doc_ids, end, length in zip(ids, ends, lengths):
        tokens[end - length : end - 1] = doc_ids
    tokens[ends - 1] = tok.eos_id
    return tokens, lengths
