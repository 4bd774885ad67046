"""Deduplication across the whole job, in two passes so it scales out.

Pass 1 (`DedupSignatures`, inside every task): the exact key (xxh3-128 of the normalised text)
and a MinHash signature over word 5-gram shingles, stored beside the task's documents.
Pass 2 (`find_duplicates`, once per job): walks all signatures in task order, drops a document
whose exact key was seen or whose signature collides in the LSH index with a kept one. The first
occurrence wins, so the result depends only on the input order, never on how tasks were run.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator

import numpy as np
import xxhash
from datasketch import LeanMinHash, MinHash, MinHashLSH

from data_tools.config import DedupConfig
from data_tools.doc import Doc
from data_tools.stats import StageStats, Step

SCHEME = "affine32"  # datasketch's default permutation scheme: 32-bit hash values
SIGNATURE_DTYPE = np.uint32
_NON_WORD = re.compile(r"[^\w\s]+")
_DIGITS = re.compile(r"\d")


def normalize(text: str) -> str:
    """Lowercase, NFKC, punctuation removed, digits as 0, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_DIGITS.sub("0", _NON_WORD.sub(" ", text)).split())


def exact_key(normalized: str) -> bytes:
    return xxhash.xxh3_128_digest(normalized.encode())


def _hash32(data: bytes) -> int:
    return xxhash.xxh32_intdigest(data)


class DedupSignatures(Step):
    """Attaches `doc.meta["exact"]` and `doc.meta["minhash"]`; drops nothing."""

    name = "dedup_signatures"

    def __init__(self, config: DedupConfig, unspaced_langs: Iterable[str]) -> None:
        super().__init__()
        self.config = config
        self.unspaced = set(unspaced_langs)
        self.template = MinHash(num_perm=config.bands * config.rows_per_band, seed=config.seed, hashfunc=_hash32, scheme=SCHEME)

    def shingles(self, normalized: str, lang: str) -> set[bytes]:
        n = self.config.ngram
        if lang in self.unspaced:
            chars = normalized.replace(" ", "")
            return {chars[i : i + n].encode() for i in range(max(1, len(chars) - n + 1))}
        words = normalized.split()
        return {" ".join(words[i : i + n]).encode() for i in range(max(1, len(words) - n + 1))}

    def apply(self, doc: Doc) -> str | None:
        normalized = normalize(doc.text)
        doc.meta["exact"] = exact_key(normalized)
        signature = MinHash(
            num_perm=len(self.template.hashvalues), seed=self.config.seed, hashfunc=_hash32,
            permutations=self.template.permutations,
            scheme=SCHEME,
        )
        signature.update_batch(list(self.shingles(normalized, doc.lang)))
        doc.meta["minhash"] = signature.hashvalues
        return None


def find_duplicates(
    tasks: Iterable[tuple[np.ndarray, np.ndarray]], config: DedupConfig, stats: StageStats
) -> Iterator[np.ndarray]:
    """For each task's (exact keys [n,16] uint8, signatures [n,perm] uint32), yield the indices to drop."""
    seen_exact: set[bytes] = set()
    lsh = MinHashLSH(num_perm=config.bands * config.rows_per_band, params=(config.bands, config.rows_per_band))
    next_key = 0
    for exact, signatures in tasks:
        dropped = []
        for index, (key, hashvalues) in enumerate(zip(exact, signatures)):
            stats.docs_in += 1
            key = key.tobytes()
            if config.exact and key in seen_exact:
                stats.dropped["exact_duplicate"] += 1
                dropped.append(index)
                continue
            seen_exact.add(key)
            if config.near:
                signature = LeanMinHash(seed=config.seed, hashvalues=hashvalues, scheme=SCHEME)
                if lsh.query(signature):
                    stats.dropped["near_duplicate"] += 1
                    dropped.append(index)
                    continue
                lsh.insert(next_key, signature, check_duplication=False)
                next_key += 1
            stats.docs_out += 1
        yield np.asarray(dropped, dtype=np.int64)
