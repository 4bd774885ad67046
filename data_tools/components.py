"""Connected components of a graph larger than one process's memory: every node labelled on disk with the
smallest node of its component.

Why: dedup's cluster stage must find, over the duplicate pairs of the whole job, the document each duplicate
cluster keeps (its first in input order). At Common Crawl scale the pairs are ~1e9, more than a node holds as a
union-find. Here the node range (global document indices) is cut into shards; a shard's state, the adjacency of
its nodes (both directions of each pair), and for every node id of its range a label and a component within the
shard (dense arrays: no lookups), is in memory one shard at a time and lives in files under `folder` otherwise.
A process's peak therefore follows one shard's documents and pairs, which the caller bounds by choosing the
shards, not the corpus.

Label propagation: each node starts as the smallest node of its component inside its shard; each round, the
nodes whose label dropped send it along their edges that leave the shard, and each shard takes the smallest
label received per node and spreads it over its in-shard components. A round that changes nothing ends it:
then every edge joins equal labels, so each label is its component's minimum. Rounds ≈ the shard crossings on
a component's longest path (a few for duplicate clusters; one shard needs none). The labels are exact, so
nothing depends on the shard layout.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

NO_LABEL = np.iinfo(np.int64).max


def _append(path: Path, pairs: np.ndarray) -> None:
    with open(path, "ab") as f:
        f.write(np.ascontiguousarray(pairs, dtype=np.int64).tobytes())


def _read_pairs(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.int64).reshape(-1, 2) if path.exists() else np.empty((0, 2), np.int64)


def _grouped(pairs: np.ndarray, shards: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(shard, its rows of `pairs`) for each shard that occurs in `shards` (the shard of each row)."""
    order = np.argsort(shards, kind="stable")
    shards, pairs = shards[order], pairs[order]
    cuts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]]) if len(shards) else np.empty(0, np.int64)
    for start, stop in zip(cuts, np.r_[cuts[1:], len(shards)]):
        yield int(shards[start]), pairs[start:stop]


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """np.unique by sorting (numpy's hash-based unique is several times slower on these id arrays)."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def _component_minimum(component: np.ndarray, values: np.ndarray, n_components: int) -> np.ndarray:
    smallest = np.full(n_components, NO_LABEL, np.int64)
    np.minimum.at(smallest, component, values)
    return smallest[component]


class ShardedGraph:
    """An undirected graph over node ids in [bounds[0], bounds[-1]), shard k holding the nodes [bounds[k], bounds[k+1]).

    `add` pairs (any number of calls, any order), then `non_keepers` once."""

    def __init__(self, folder: Path, bounds: np.ndarray) -> None:
        self.folder, self.bounds = Path(folder), np.asarray(bounds, np.int64)
        shutil.rmtree(self.folder, ignore_errors=True)  # appended files of an interrupted run are not reusable
        self.folder.mkdir(parents=True)

    @property
    def n_shards(self) -> int:
        return len(self.bounds) - 1

    def shard_of(self, nodes: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.bounds, nodes, side="right") - 1

    def _file(self, kind: str, shard: int, suffix: str = ".bin") -> Path:
        """Raw pairs appended by many writers (`.bin`), or a shard's state as `.npy`."""
        return self.folder / f"{kind}-{shard:06d}{suffix}"

    def _load(self, kind: str, shard: int) -> np.ndarray:
        return np.load(self._file(kind, shard, ".npy"), allow_pickle=False)

    def _save(self, kind: str, shard: int, array: np.ndarray) -> None:
        """Not synced or renamed: the folder is scratch that a rerun starts afresh."""
        np.save(self._file(kind, shard, ".npy"), array, allow_pickle=False)

    def add(self, pairs: np.ndarray) -> None:
        """Both directions of each pair go to the shard of their first node."""
        directed = np.concatenate([pairs, pairs[:, ::-1]]).astype(np.int64, copy=False)
        for shard, part in _grouped(directed, self.shard_of(directed[:, 0])):
            _append(self._file("edges", shard), part)

    def non_keepers(self) -> Iterator[np.ndarray]:
        """Per shard, its nodes that are not the smallest of their component (sorted global ids)."""
        changed = [self._start(shard) for shard in range(self.n_shards)]
        while any(changed):
            for shard in range(self.n_shards):
                if changed[shard]:
                    self._send(shard)
            changed = [self._receive(shard) for shard in range(self.n_shards)]
        for shard in range(self.n_shards):
            ids = self._ids(shard)
            yield ids[self._load("labels", shard) < ids]
        shutil.rmtree(self.folder)

    def _ids(self, shard: int) -> np.ndarray:
        """Every node id of the shard: its state is held densely, indexed by id - shard start (no lookups)."""
        return np.arange(self.bounds[shard], self.bounds[shard + 1], dtype=np.int64)

    def _start(self, shard: int) -> bool:
        """Find the shard's in-shard components, label each node with its component's minimum, and keep its edges
        that leave the shard (as source positions and neighbours, by the neighbour's shard); whether it has any."""
        edges = self._unique(_read_pairs(self._file("edges", shard)), shard)
        ids, first = self._ids(shard), int(self.bounds[shard])
        target_shard = self.shard_of(edges[:, 1])
        inside = target_shard == shard
        local = edges[inside] - first
        graph = coo_matrix((np.ones(len(local), np.int8), (local[:, 0], local[:, 1])), shape=(len(ids), len(ids)))
        n_components, component = connected_components(graph, directed=False)
        leaving = np.flatnonzero(~inside)
        leaving = leaving[np.argsort(target_shard[leaving], kind="stable")]
        for kind, array in (("source", edges[leaving, 0] - first), ("target", edges[leaving, 1]), ("component", component),
                            ("labels", _component_minimum(component, ids, n_components)),
                            ("changed", np.ones(len(ids), bool))):
            self._save(kind, shard, array)
        self._file("edges", shard).unlink(missing_ok=True)
        return bool(len(leaving))

    def _unique(self, edges: np.ndarray, shard: int) -> np.ndarray:
        """The distinct edges: a pair found in several bands (or both ways) once. Through one int64 key per edge when
        (node - shard start) × the node count fits in one, else row by row."""
        first, total = int(self.bounds[shard]), max(int(self.bounds[-1]), 1)
        if (int(self.bounds[shard + 1]) - first) * total >= 2**63:
            return np.unique(edges, axis=0)
        keys = _sorted_unique((edges[:, 0] - first) * total + edges[:, 1])
        return np.stack([keys // total + first, keys % total], axis=1)

    def _send(self, shard: int) -> None:
        """Each edge leaving the shard from a node whose label dropped carries that label to its neighbour's shard."""
        source, target, labels, changed = (self._load(kind, shard) for kind in ("source", "target", "labels", "changed"))
        sending = changed[source]
        messages = np.stack([target[sending], labels[source[sending]]], axis=1)
        for target_shard, part in _grouped(messages, self.shard_of(messages[:, 0])):
            _append(self._file("messages", target_shard), part)

    def _receive(self, shard: int) -> bool:
        """Lower each node's label to the smallest received, spread over its in-shard component; whether any dropped."""
        path = self._file("messages", shard)
        if not path.exists():
            return False  # nothing arrived: its labels stand, and it sends nothing next round
        messages = _read_pairs(path)
        component, labels = self._load("component", shard), self._load("labels", shard)
        received = labels.copy()
        np.minimum.at(received, messages[:, 0] - self.bounds[shard], messages[:, 1])
        lowered = _component_minimum(component, received, int(component.max()) + 1)
        changed = lowered < labels
        self._save("labels", shard, lowered)
        self._save("changed", shard, changed)
        path.unlink()
        return bool(changed.any())
