"""How the data-job tests run `python -m data_tools prepare` on the shipped corpora and compare what it wrote."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from data_tools.manifest import file_sha256, load_manifest

WARCS = ["handbook-multilingual.warc.gz", "iana.warc.gz"]
ALL = WARCS + ["enwiki-sample.xml.bz2"]


def prepare_cmd(corpora: Path, out: Path, *extra: str, inputs=ALL) -> list[str]:
    args = [sys.executable, "-m", "data_tools", "prepare", "--output", str(out), "--seq-len", "256"]
    for name in inputs:
        args += ["--input", str(corpora / name)]
    return args + list(extra)


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def outputs(out: Path) -> dict[str, str]:
    """sha256 of every shard (token and document) and the tokenizer, by relative path."""
    found = {}
    for split in ("train", "valid"):
        for shard in load_manifest(out / "tokens" / split).shards:
            found[f"tokens/{split}/{shard.path}"] = shard.sha256
    for path in sorted((out / "docs").glob("*.tar")) + [out / "tokenizer" / "tokenizer.json"]:
        found[str(path.relative_to(out))] = file_sha256(path)
    return found
