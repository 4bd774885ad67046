"""Deduplication across the whole job as independent tasks, so it scales out with bounded memory.

signatures (inside every extract task, `DedupSignatures` + `band_hashes`): the exact key (xxh3-128
    of the normalised text), a MinHash signature over word 5-gram shingles, and one 64-bit hash per
    LSH band (plus one for the exact key; of the document's language too by default), stored beside
    the task's documents.
bucket (one task per (band, hash range), `bucket_pairs`): the documents whose band hash falls in
    the range, sorted by hash; documents sharing a hash become candidate pairs (each with the first
    of its bucket), kept only if confirmed: equal exact keys, or a Jaccard similarity estimated from
    the full signatures of at least `threshold`. Memory: the range's hashes, not the corpus.
cluster (once, `cluster_duplicates`): connected components over the confirmed pairs; the first document
    in input order is each cluster's keeper, every other member is dropped. Components are found shard by
    shard on disk (data_tools.components), so memory follows `tasks_per_cluster_shard` tasks' pairs.
The result is a pure function of the documents in input order, never of how tasks were run.
"""

from __future__ import annotations

import re
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

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


def language_keys(langs: Iterable[str]) -> np.ndarray:
    """uint64 per document: a hash of its detected language, which `dedup.same_language` mixes into the band hashes."""
    return np.fromiter((xxhash.xxh64_intdigest(lang.encode()) for lang in langs), np.uint64)


def band_hashes(exact: np.ndarray, minhash: np.ndarray, langs: np.ndarray, config: DedupConfig) -> np.ndarray:
    """[bands + 1, n] uint64: a hash of each band's rows (splitmix64 chain), then the exact key's first 8 bytes.

    With `config.same_language` each band hash starts from the document's language key (`language_keys`), so
    documents of different languages never share a band bucket: translations that share code listings or command
    lines are never near-duplicate candidates. Exact keys stay language-blind. Band-major, so a bucket task reads
    one contiguous row per extract task."""
    n = len(exact)
    values = minhash.reshape(n, config.bands, config.rows_per_band).astype(np.uint64)
    hashes = np.full((n, config.bands), np.uint64(config.seed)) + np.arange(config.bands, dtype=np.uint64) * _MIX[0]
    if config.same_language:
        hashes += np.asarray(langs, np.uint64).reshape(n, 1)
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


CLUSTER_CHUNK = 1 << 18  # pairs added to the graphs at once


def cluster_bounds(offsets: np.ndarray, tasks_per_shard: int) -> np.ndarray:
    """The global document index where each cluster shard (`tasks_per_shard` consecutive extract tasks) begins, and the end."""
    n_tasks = len(offsets) - 1
    return offsets[np.r_[np.arange(0, n_tasks, tasks_per_shard), n_tasks]]


def dropped_per_task(dropped: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    """Sorted global indices → each task's local indices."""
    bounds = np.searchsorted(dropped, offsets)
    return [dropped[a:b] - offsets[t] for t, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]


def cluster_duplicates(
    folder: Path, offsets: np.ndarray, config: DedupConfig, pairs: Iterable[tuple[bool, np.ndarray]], stats: StageStats
) -> Iterator[np.ndarray]:
    """The dropped local indices of each extract task, in task order, from confirmed (is exact, pairs [k, 2]) arrays.

    A document is dropped if its cluster holds an earlier one: an exact duplicate if its cluster of exact pairs
    does, else a near duplicate. Clusters are the connected components of a `ShardedGraph` per kind (exact pairs;
    all pairs) under `folder`, sharded by `config.tasks_per_cluster_shard` extract tasks, so memory follows one
    shard's pairs. `stats` is counted once the last task's indices are taken."""
    from data_tools.components import ShardedGraph

    per_shard = config.tasks_per_cluster_shard
    bounds = cluster_bounds(offsets, per_shard)
    exact_graph, all_graph = ShardedGraph(folder / "exact", bounds), ShardedGraph(folder / "all", bounds)
    for is_exact, found in pairs:
        for start in range(0, len(found), CLUSTER_CHUNK):
            chunk = np.asarray(found[start : start + CLUSTER_CHUNK])
            all_graph.add(chunk)
            if is_exact:
                exact_graph.add(chunk)
    n_exact = sum(len(ids) for ids in exact_graph.non_keepers())
    n_dropped = 0
    for shard, dropped in enumerate(all_graph.non_keepers()):  # the exact duplicates are among them
        n_dropped += len(dropped)
        yield from dropped_per_task(dropped, offsets[shard * per_shard : (shard + 1) * per_shard + 1])
    count_stats(stats, int(offsets[-1]), n_exact, n_dropped - n_exact)


def count_stats(stats: StageStats, n_docs: int, n_exact: int, n_near: int) -> None:
    stats.docs_in += n_docs
    stats.docs_out += n_docs - n_exact - n_near
    for reason, count in (("exact_duplicate", n_exact), ("near_duplicate", n_near)):
        if count:
            stats.dropped[reason] += count


def find_duplicates(
    tasks: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], config: DedupConfig, stats: StageStats
) -> list[np.ndarray]:
    """All stages in one process over in-memory (exact keys [n,16] uint8, signatures [n,perm] uint32, language keys
    [n] uint64) per task: the indices to drop in each task. The job runs the same functions as separate tasks."""
    offsets = np.cumsum([0] + [len(exact) for exact, _, _ in tasks])
    hashes = [band_hashes(exact, minhash, langs, config) for exact, minhash, langs in tasks]
    exact_rows, minhash_rows = RowLookup(offsets, lambda t: tasks[t][0]), RowLookup(offsets, lambda t: tasks[t][1])

    def pairs() -> Iterator[tuple[bool, np.ndarray]]:
        for index in range(bucket_count(config)):
            band = index // config.buckets_per_band
            yield band == config.bands, bucket_pairs(index, config, (h[band] for h in hashes), offsets, exact_rows, minhash_rows)

    with tempfile.TemporaryDirectory(prefix="dstrain-cluster-") as folder:
        return list(cluster_duplicates(Path(folder), offsets, config, pairs(), stats))
