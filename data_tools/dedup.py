"""Deduplication across the whole job as independent tasks, so it scales out with bounded memory.

signatures (inside every extract task, `DedupSignatures` + `band_hashes`): the exact key (xxh3-128
    of the normalised text), a MinHash signature over word 5-gram shingles, and one 64-bit hash per
    LSH band (plus one for the exact key), stored beside the task's documents.
bucket (one task per (band, hash range), `bucket_pairs`): the documents whose band hash falls in
    the range, sorted by hash; documents sharing a hash become candidate pairs (each with the first
    of its bucket), kept only if confirmed: equal exact keys, or a Jaccard similarity estimated from
    the full signatures of at least `threshold`. Memory: the range's hashes, not the corpus.
cluster (once, `duplicates`): connected components over the confirmed pairs; the first document in
    input order is each cluster's keeper, every other member is dropped. Pairs are O(duplicates).
The result is a pure function of the documents in input order, never of how tasks were run.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import xxhash
from datasketch import MinHash

from data_tools.config import DedupConfig
from data_tools.doc import Doc, Step
from data_tools.stats import StageStats
from data_tools.taskfiles import TaskArrays

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


_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
PAIR_BATCH = 8192  # candidate pairs confirmed at once: bounds the signature rows gathered in memory


def band_hashes(exact: np.ndarray, minhash: np.ndarray, config: DedupConfig) -> np.ndarray:
    """[bands + 1, n] uint64: a hash of each band's rows (splitmix64 chain), then the exact key's first 8 bytes.

    Band-major, so a bucket task reads one contiguous row per extract task."""
    n = len(exact)
    values = minhash.reshape(n, config.bands, config.rows_per_band).astype(np.uint64)
    hashes = np.full((n, config.bands), np.uint64(config.seed)) + np.arange(config.bands, dtype=np.uint64) * _MIX[0]
    for column in range(config.rows_per_band):
        hashes = (hashes ^ values[:, :, column]) * _MIX[1]
        hashes ^= hashes >> np.uint64(31)
    hashes *= _MIX[2]
    hashes ^= hashes >> np.uint64(29)
    exact_prefix = np.ascontiguousarray(exact[:, :8]).view("<u8").reshape(n, 1).astype(np.uint64)
    return np.ascontiguousarray(np.concatenate([hashes, exact_prefix], axis=1).T)


def bucket_count(config: DedupConfig) -> int:
    """Bucket tasks: `buckets_per_band` hash ranges of every band and of the exact key."""
    return (config.bands + 1) * config.buckets_per_band


class RowLookup:
    """Rows of per-task arrays by global document index (offsets[t] = the first index of task t)."""

    def __init__(self, offsets: np.ndarray, load: Callable[[int], np.ndarray]) -> None:
        self.offsets, self.arrays = offsets, TaskArrays(load)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        tasks = np.searchsorted(self.offsets, ids, side="right") - 1
        out = None
        for task in np.unique(tasks):
            mask = tasks == task
            part = self.arrays[task][ids[mask] - self.offsets[task]]
            if out is None:
                out = np.empty((len(ids), *part.shape[1:]), part.dtype)
            out[mask] = part
        return out


def bucket_pairs(
    index: int, config: DedupConfig, band_rows: Iterable[np.ndarray], offsets: np.ndarray,
    exact_rows: RowLookup, minhash_rows: RowLookup,
) -> np.ndarray:
    """Confirmed duplicate pairs [k, 2] (earlier, later global index) of bucket task `index`.

    `band_rows` yields, per extract task in order, that task's hashes of this task's band."""
    band, part = divmod(index, config.buckets_per_band)
    is_exact = band == config.bands
    if not (config.exact if is_exact else config.near):
        return np.empty((0, 2), np.int64)
    hashes, ids = [], []
    for task, row in enumerate(band_rows):
        mine = np.flatnonzero(row % np.uint64(config.buckets_per_band) == np.uint64(part))
        hashes.append(np.asarray(row[mine]))
        ids.append(mine + offsets[task])
    hashes, ids = np.concatenate(hashes), np.concatenate(ids)
    order = np.lexsort((ids, hashes))
    hashes, ids = hashes[order], ids[order]
    opens = np.r_[True, hashes[1:] != hashes[:-1]] if len(hashes) else np.empty(0, bool)
    first = np.maximum.accumulate(np.where(opens, np.arange(len(hashes)), 0))
    candidates = np.stack([ids[first[~opens]], ids[~opens]], axis=1)
    confirmed = []
    for start in range(0, len(candidates), PAIR_BATCH):
        batch = candidates[start : start + PAIR_BATCH]
        if is_exact:
            keep = (exact_rows(batch[:, 0]) == exact_rows(batch[:, 1])).all(axis=1)
        else:
            keep = (minhash_rows(batch[:, 0]) == minhash_rows(batch[:, 1])).mean(axis=1) >= config.threshold
        confirmed.append(batch[keep])
    return np.concatenate(confirmed) if confirmed else np.empty((0, 2), np.int64)


def _non_keepers(pairs: np.ndarray) -> np.ndarray:
    """Global indices of every member of a connected component but its smallest (first in input order)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(pairs):
        return np.empty(0, np.int64)
    nodes, inverse = np.unique(pairs, return_inverse=True)
    inverse = inverse.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(inverse), np.int8), (inverse[:, 0], inverse[:, 1])), shape=(len(nodes), len(nodes)))
    _, labels = connected_components(graph, directed=False)
    keeper = np.zeros(len(nodes), bool)
    keeper[np.unique(labels, return_index=True)[1]] = True  # nodes are sorted: the first of each label is its minimum
    return nodes[~keeper]


def duplicates(exact_pairs: np.ndarray, near_pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exact, near) dropped global indices: a document is an exact duplicate if an earlier one has its
    exact key, else a near duplicate if it is in a cluster with an earlier document."""
    exact = _non_keepers(exact_pairs)
    return exact, np.setdiff1d(_non_keepers(np.concatenate([exact_pairs, near_pairs])), exact)


def dropped_per_task(dropped: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """Sorted global indices → each task's local indices."""
    bounds = np.searchsorted(dropped, offsets)
    return [dropped[a:b] - offsets[t] for t, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]


def count_stats(stats: StageStats, n_docs: int, exact: np.ndarray, near: np.ndarray) -> None:
    stats.docs_in += n_docs
    stats.docs_out += n_docs - len(exact) - len(near)
    for reason, ids in (("exact_duplicate", exact), ("near_duplicate", near)):
        if len(ids):
            stats.dropped[reason] += len(ids)


def find_duplicates(
    tasks: Sequence[tuple[np.ndarray, np.ndarray]], config: DedupConfig, stats: StageStats
) -> list[np.ndarray]:
    """All stages in one process over in-memory (exact keys [n,16] uint8, signatures [n,perm] uint32) per task:
    the indices to drop in each task. The job runs the same functions as separate tasks."""
    offsets = np.cumsum([0] + [len(exact) for exact, _ in tasks])
    hashes = [band_hashes(exact, minhash, config) for exact, minhash in tasks]
    exact_rows, minhash_rows = RowLookup(offsets, lambda t: tasks[t][0]), RowLookup(offsets, lambda t: tasks[t][1])
    pairs = {True: [], False: []}
    for index in range(bucket_count(config)):
        band = index // config.buckets_per_band
        found = bucket_pairs(index, config, (h[band] for h in hashes), offsets, exact_rows, minhash_rows)
        pairs[band == config.bands].append(found)
    exact, near = duplicates(np.concatenate(pairs[True]), np.concatenate(pairs[False]))
    count_stats(stats, int(offsets[-1]), exact, near)
    return dropped_per_task(np.sort(np.concatenate([exact, near])), offsets)
