"""Connected components sharded on disk (data_tools.components): the labels are exact whatever the shards,
so the cluster stage's keepers never depend on how its memory was bounded."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from data_tools.components import ShardedGraph


def reference_non_keepers(pairs: np.ndarray, n_nodes: int) -> np.ndarray:
    """Nodes (of those in a pair) that are not their component's smallest, by scipy in memory."""
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n_nodes, n_nodes))
    _, labels = connected_components(graph, directed=False)
    smallest = np.full(labels.max() + 1, n_nodes)
    np.minimum.at(smallest, labels, np.arange(n_nodes))
    present = np.zeros(n_nodes, bool)
    present[pairs.ravel()] = True
    return np.flatnonzero(present & (smallest[labels] < np.arange(n_nodes)))


def graph_pairs(rng: np.random.Generator, n_nodes: int) -> np.ndarray:
    """Random earlier-later pairs (stars and repeats, as buckets give) plus a chain that crosses every shard
    back and forth, the slowest case for label exchange."""
    a, b = rng.integers(0, n_nodes, 300), rng.integers(0, n_nodes, 300)
    random = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)[a != b]
    chain = rng.permutation(n_nodes)[:40]
    path = np.stack([chain[:-1], chain[1:]], axis=1)
    return np.concatenate([random, random[:50], np.sort(path, axis=1)])


@pytest.mark.parametrize("bounds", [[0, 1000], [0, 500, 1000], [0, 10, 11, 400, 999, 1000], list(range(0, 1001, 50))])
def test_non_keepers_are_exact_whatever_the_shards(tmp_path, bounds):
    rng = np.random.default_rng(5)
    pairs = graph_pairs(rng, 1000)
    graph = ShardedGraph(tmp_path / "graph", np.array(bounds))
    for part in np.array_split(pairs, 7):  # added in several calls, as the cluster stage adds bucket files
        graph.add(part)
    found = list(graph.non_keepers())
    assert len(found) == len(bounds) - 1
    assert all(((lo <= ids) & (ids < hi)).all() for ids, lo, hi in zip(found, bounds[:-1], bounds[1:]))
    assert np.array_equal(np.concatenate(found), reference_non_keepers(pairs, 1000))
    assert not (tmp_path / "graph").exists()  # its files are removed once read


def test_a_graph_without_pairs_has_no_non_keepers(tmp_path):
    graph = ShardedGraph(tmp_path / "graph", np.array([0, 5, 9]))
    assert [ids.tolist() for ids in graph.non_keepers()] == [[], []]


def test_files_left_by_an_interrupted_run_are_not_reused(tmp_path):
    """Pairs are appended: a cluster stage killed midway must start from an empty folder when rerun."""
    folder = tmp_path / "graph"
    ShardedGraph(folder, np.array([0, 10])).add(np.array([[1, 2]]))
    graph = ShardedGraph(folder, np.array([0, 10]))
    graph.add(np.array([[3, 4]]))
    assert [ids.tolist() for ids in graph.non_keepers()] == [[4]]
