"""The finetuning tokenizer: load it from any of the accepted places, save it beside the shards.

`--tokenizer` takes what `data_tools.tokenize.load_tokenizer` takes (a tokenizer.json, a tokenizer
directory, vocab.json + merges.txt), a `.gguf` file, or `package:<module>/<path>`. Transformers is
loaded only where it is needed: to read GGUF, and to apply a chat template (SFT). Encode-time
padding and truncation stored in a tokenizer.json are cleared: rows are padded and cut here, and
the saved tokenizer must encode a text the same way wherever it is used later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from data_tools.common import PACKAGE_PREFIX, DataError, first_line, resolve
from data_tools.manifest import TokenizerInfo, file_sha256
from data_tools.tokenize import load_tokenizer

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class FinetuneTokenizer:
    tokenizer: Tokenizer
    name: str
    eos_id: int
    chat: object | None = None  # the transformers tokenizer, when it has a chat template

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def save(self, directory: Path) -> TokenizerInfo:
        """Write tokenizer.json (and tokenizer_config.json holding the chat template, if any)."""
        if self.chat is not None:
            self.chat.save_pretrained(str(directory), save_jinja_files=False)  # the template inside tokenizer_config.json
        else:
            self.tokenizer.save(str(directory / TOKENIZER_FILE))
        return TokenizerInfo(self.name, self.vocab_size, self.eos_id, file_sha256(directory / TOKENIZER_FILE), TOKENIZER_FILE)


def _has_chat_template(directory: Path) -> bool:
    if (directory / "chat_template.jinja").exists():
        return True
    config = directory / "tokenizer_config.json"
    return config.exists() and "chat_template" in json.loads(config.read_text())


def _from_transformers(path: Path, spec: str, name: str) -> FinetuneTokenizer:
    from transformers import AutoTokenizer

    try:
        if path.suffix == ".gguf":
            hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            hf = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise DataError(f"--tokenizer {spec}: transformers cannot load it ({first_line(err)})") from None
    if hf.eos_token_id is None:
        raise DataError(f"--tokenizer {spec}: the tokenizer defines no eos_token; add one to its tokenizer_config.json")
    return FinetuneTokenizer(hf.backend_tokenizer, name, hf.eos_token_id, hf if hf.chat_template else None)


def locate(spec: str) -> Path:
    """The tokenizer's path, checked before any input is read (GGUF loading takes seconds)."""
    path = resolve(spec)
    if not path.exists():
        raise DataError(f"--tokenizer {spec}: no such file or directory")
    return path


def load(spec: str) -> FinetuneTokenizer:
    """Load `--tokenizer spec`; a package spec is named after its package path."""
    path = locate(spec)
    name = spec[len(PACKAGE_PREFIX) :] if spec.startswith(PACKAGE_PREFIX) else None
    if path.suffix == ".gguf" or (path.is_dir() and _has_chat_template(path)):
        tok = _from_transformers(path, spec, name or (path.stem if path.is_file() else path.name))
    else:
        base = load_tokenizer(path)
        tok = FinetuneTokenizer(base.tokenizer, name or base.name, base.eos_id)
    tok.tokenizer.no_padding()
    tok.tokenizer.no_truncation()
    return tok
