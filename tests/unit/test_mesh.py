"""The device-mesh arithmetic (trainer.parallel.mesh): sizes, rank coordinates, data coordinates, errors."""

from __future__ import annotations

import pytest
import torch

from trainer.config import ConfigError, ParallelConfig, load_config
from trainer.parallel.mesh import DIMS, Layout, data_coordinate


def layout(world: int, **sizes) -> Layout:
    return Layout.resolve(ParallelConfig(**sizes), world)


def test_dp_shard_takes_the_rest():
    assert layout(8, tp=2).sizes == (1, 1, 4, 1, 2)
    assert layout(16, dp_replicate=2, tp=2, pp=2).sizes == (2, 2, 2, 1, 2)
    assert layout(4, dp_shard=2, tp=2).dp_shard == 2


def test_coordinates_are_row_major_with_tp_fastest():
    grid = layout(8, dp_replicate=2, tp=2)  # pp 1 × dp_replicate 2 × dp_shard 2 × cp 1 × tp 2
    assert [grid.coordinates(r)["tp"] for r in range(8)] == [0, 1] * 4
    assert [grid.coordinates(r)["dp_shard"] for r in range(8)] == [0, 0, 1, 1] * 2
    assert [grid.coordinates(r)["dp_replicate"] for r in range(8)] == [0] * 4 + [1] * 4
    assert list(grid.coordinates(5)) == list(DIMS)


def test_data_coordinate_is_shared_by_tensor_and_pipeline_peers():
    grid = layout(8, tp=2, pp=2)  # data world 2
    coords = [grid.data_coordinate(r) for r in range(8)]
    assert [c.rank for c in coords] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert {c.world for c in coords} == {2}
    assert [c.leader for c in coords] == [True, False, True, False, False, False, False, False]
    hsdp = layout(4, dp_replicate=2)
    assert [hsdp.data_coordinate(r).rank for r in range(4)] == [0, 1, 2, 3]


def test_deepspeed_data_coordinate_is_the_process_rank(tmp_path):
    config = load_config(None, ["data.train=x", "engine.type=deepspeed"])
    assert data_coordinate(config, 3, 4).rank == 3 and data_coordinate(config, 3, 4).world == 4
    config = load_config(None, ["data.train=x", "engine.type=fsdp2", "parallel.tp=2"])  # dotted overrides as for every key
    assert (data_coordinate(config, 3, 4).rank, data_coordinate(config, 3, 4).world) == (1, 2)


def test_a_product_that_is_not_the_world_size_is_one_line():
    product = r"pp × dp_replicate × dp_shard × cp × tp = 1 × 1 × 3 × 1 × 2 = 6, but the world size is 4"
    with pytest.raises(ConfigError, match=product):
        layout(4, dp_shard=3, tp=2)
    with pytest.raises(ConfigError, match=r"pp × dp_replicate × cp × tp = 1 × 1 × 1 × 3 = 3 does not divide"):
        layout(4, tp=3)
    with pytest.raises(ConfigError, match="parallel.tp must be a positive integer, got 0"):
        layout(4, tp=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_context_parallel_on_cpu_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"parallel.cp 2: context parallel \(ring attention over SDPA\) needs CUDA devices"):
        layout(4, cp=2)
