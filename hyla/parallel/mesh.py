"""The device mesh: data parallel (dp) x sequence parallel (sp), sp innermost."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hyla.parallel.support import ArgumentError


@dataclass(frozen=True)
class ParallelDims:
    """How the world's ranks are laid out.

    dp: data-parallel replicas; each sees different samples and gradients are summed across.
    sp: sequence-parallel ranks; each holds a contiguous slice of the same sample (LASP-2).
    Ranks of one sp group are consecutive (rank = dp_rank * sp + sp_rank), so the
    per-layer collectives of sequence parallelism stay on neighbouring devices.
    """

    dp: int
    sp: int
    world_size: int

    def __post_init__(self) -> None:
        for name in ("dp", "sp", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                template = "{" + name + "} must be an integer >= 1, got {got!r}"
                raise ArgumentError(template, got=value)
        if self.dp * self.sp != self.world_size:
            raise ArgumentError(
                "{world_size} must equal {dp} x {sp} = {d} x {s} = {want}, got {got}",
                d=self.dp,
                s=self.sp,
                want=self.dp * self.sp,
                got=self.world_size,
            )

    @classmethod
    def from_world(cls, world_size: int, sp: int) -> ParallelDims:
        """dp inferred from the world size; sp must divide it."""
        if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1 or world_size % sp:
            raise ArgumentError(
                "{sp} must be an integer >= 1 that divides {world_size} = {size}, got {got!r}",
                size=world_size,
                got=sp,
            )
        return cls(dp=world_size // sp, sp=sp, world_size=world_size)

    def build_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        if not dist.is_initialized():
            raise ValueError("build_mesh needs torch.distributed to be initialised first")
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"ParallelDims.world_size={self.world_size} but the process group has "
                f"{dist.get_world_size()} ranks"
            )
        return init_device_mesh(device_type, (self.dp, self.sp), mesh_dim_names=("dp", "sp"))
