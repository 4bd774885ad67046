"""The device mesh: how `world_size` processes split into pipeline, data, context and tensor parallel groups.

One mesh with named dimensions in torchtitan's order, outermost first:

    pp × dp_replicate × dp_shard × cp × tp = world size

so tensor-parallel peers (the innermost, chattiest dimension) are neighbouring ranks, on one node.
Rank r's coordinates follow from r alone (row-major over those sizes), which `Layout` computes
without a process group, for the unit tests and for `trainer plan`; `Mesh` builds the real
`DeviceMesh` (every dimension kept, size 1 included, so code never asks whether one exists).

The data-parallel coordinate is the position over dp_replicate × dp_shard: the lanes loader deals
lanes by it, and tensor/context/pipeline peers (same data coordinate) read the same rows.
FSDP shards over dp_shard and replicates over dp_replicate (HSDP when dp_replicate > 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.config import Config, ConfigError, ParallelConfig

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# pipeline schedules that run several stages per rank (parallel.pp_stages_per_rank > 1)
MULTI_STAGE = ("interleaved_1f1b", "looped_bfs")


@dataclass(frozen=True)
class DataCoordinate:
    """A process's place among the data-parallel ranks: the lanes loader reads by (rank, world), and
    `leader` marks one process per data rank for sums of per-row quantities (tokens, lane digests)."""

    rank: int
    world: int
    leader: bool


@dataclass(frozen=True)
class Layout:
    """Sizes of the mesh dimensions, dp_shard resolved; checked to multiply to the world size."""

    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    @classmethod
    def resolve(cls, parallel: ParallelConfig, world: int) -> Layout:
        """The layout `parallel` asks for at `world` processes (dp_shard -1: what the other dimensions leave)."""
        if parallel.cp > 1 and not _cuda():
            raise ConfigError(f"parallel.cp {parallel.cp}: context parallel (ring attention over SDPA) needs CUDA devices, "
                              "this run is on CPU; set parallel.cp=1")
        sizes = {dim: getattr(parallel, dim) for dim in DIMS}
        for dim, size in sizes.items():
            if size < 1 and not (dim == "dp_shard" and size == -1):
                raise ConfigError(f"parallel.{dim} must be a positive integer{' or -1' if dim == 'dp_shard' else ''}, got {size}")
        others = math.prod(size for dim, size in sizes.items() if dim != "dp_shard")
        if sizes["dp_shard"] == -1:
            if world % others:
                raise ConfigError(f"parallel: {_product(sizes, 'dp_shard')} = {others} does not divide the world size {world}; "
                                  "choose sizes whose product divides it")
            sizes["dp_shard"] = world // others
        if math.prod(sizes.values()) != world:
            raise ConfigError(f"parallel: {_product(sizes)} = {math.prod(sizes.values())}, but the world size is {world}; "
                              "make the product equal it (dp_shard=-1 takes the rest)")
        return cls(**sizes)

    @property
    def world(self) -> int:
        return math.prod(self.sizes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, dim) for dim in DIMS)

    @property
    def data_world(self) -> int:
        """Data-parallel ranks: how many different row sets one step reads."""
        return self.dp_replicate * self.dp_shard

    def coordinates(self, rank: int) -> dict[str, int]:
        """Rank `rank`'s coordinate on each dimension (row-major: tp varies fastest), as init_device_mesh lays them out."""
        coords = {}
        for dim, size in zip(reversed(DIMS), reversed(self.sizes)):
            rank, coords[dim] = divmod(rank, size)
        return {dim: coords[dim] for dim in DIMS}

    def data_coordinate(self, rank: int) -> DataCoordinate:
        """Rank `rank`'s position among the data-parallel ranks (dp_replicate major, dp_shard minor)."""
        coords = self.coordinates(rank)
        leader = all(coords[dim] == 0 for dim in ("pp", "cp", "tp"))
        return DataCoordinate(coords["dp_replicate"] * self.dp_shard + coords["dp_shard"], self.data_world, leader)

    def describe(self) -> str:
        """`dp_shard 2 × tp 2` for the log: the dimensions larger than 1."""
        return " × ".join(f"{dim} {size}" for dim, size in zip(DIMS, self.sizes) if size > 1) or "1 process"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _product(sizes: dict[str, int], leave_out: str = "") -> str:
    """`pp × dp_replicate × … = 1 × 2 × …`: the sizes named, for an error message."""
    named = {dim: size for dim, size in sizes.items() if dim != leave_out}
    return f"{' × '.join(named)} = {' × '.join(map(str, named.values()))}"


class Mesh:
    """The run's `DeviceMesh` over every dimension of a `Layout`, and the sub-meshes each kind of parallelism uses."""

    def __init__(self, layout: Layout, device_type: str, rank: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.layout = layout
        self.device_mesh = init_device_mesh(device_type, layout.sizes, mesh_dim_names=DIMS)
        self.coordinates = layout.coordinates(rank)
        self.data = layout.data_coordinate(rank)

    @property
    def dp(self):
        """The mesh FSDP shards over: 1-D dp_shard, or 2-D (dp_replicate, dp_shard) for HSDP."""
        if self.layout.dp_replicate > 1:
            return self.device_mesh["dp_replicate", "dp_shard"]
        return self.device_mesh["dp_shard"]

    @property
    def tp(self):
        """The tensor-parallel mesh (1-D)."""
        return self.device_mesh["tp"]

    @property
    def cp(self):
        """The context-parallel mesh (1-D)."""
        return self.device_mesh["cp"]

    @property
    def pp_group(self):
        """The process group of this rank's pipeline peers (same dp, cp, tp coordinates)."""
        return self.device_mesh.get_group("pp")

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage coordinate."""
        return self.coordinates["pp"]


def data_coordinate(config: Config, rank: int, world: int) -> DataCoordinate:
    """Process `rank`'s data coordinate: from the mesh under FSDP2, the process rank and world under DeepSpeed."""
    if config.engine.type != "fsdp2":
        return DataCoordinate(rank, world, True)
    return Layout.resolve(config.parallel, world).data_coordinate(rank)
