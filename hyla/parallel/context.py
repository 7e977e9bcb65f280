"""Where this rank's shard sits in the sequence, and the exchanges that need it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from hyla.parallel.comm import all_gather, all_reduce, remember_scope

SP_METHODS = ("lasp2", "lasp1", "ulysses")


@dataclass(frozen=True)
class SequenceParallel:
    """This rank holds tokens [start, end) of every sequence; ranks hold contiguous shards
    in rank order (never zigzag: the recurrences need them in order)."""

    group: dist.ProcessGroup
    shard_lengths: tuple[int, ...]
    method: str = "lasp2"  # lasp2 | lasp1 (ring baseline) | ulysses (all-to-all baseline)

    def __post_init__(self) -> None:
        if self.method not in SP_METHODS:
            raise ValueError(f"parallel.sp_method must be one of {SP_METHODS}, got {self.method!r}")
        world = dist.get_world_size(self.group)
        if len(self.shard_lengths) != world:
            raise ValueError(
                f"shard_lengths must have one entry per rank of the sequence-parallel group "
                f"({world}), got {list(self.shard_lengths)}"
            )
        if min(self.shard_lengths) < 1:
            raise ValueError(
                f"every shard needs >= 1 token, got shard_lengths {list(self.shard_lengths)}"
            )

    @classmethod
    def even(
        cls, total_len: int, group: dist.ProcessGroup, method: str = "lasp2"
    ) -> SequenceParallel:
        """Split a sequence of total_len tokens as evenly as possible (earlier ranks get the
        remainder)."""
        world = dist.get_world_size(group)
        if total_len < world:
            raise ValueError(
                f"the sequence length ({total_len}) must be >= the sequence-parallel degree "
                f"({world}): every rank needs at least one token"
            )
        base, extra = divmod(total_len, world)
        return cls(group, tuple(base + (r < extra) for r in range(world)), method)

    @classmethod
    def from_local_bounds(
        cls, start: int, end: int, group: dist.ProcessGroup, method: str = "lasp2"
    ) -> SequenceParallel:
        """Each rank states the tokens [start, end) it holds; they must tile the sequence in
        rank order from 0 (a zigzag or shuffled split would make the recurrences wrong)."""
        bounds = torch.tensor([start, end], dtype=torch.int64)
        everyone = all_gather(bounds, group).wait().tolist()
        expected = 0
        for rank, (s, e) in enumerate(everyone):
            if s != expected or e <= s:
                raise ValueError(
                    f"sequence shards must be contiguous, non-empty and in rank order: rank "
                    f"{rank} holds [{s}, {e}) but the next shard must start at {expected}; "
                    f"all shards: {everyone}"
                )
            expected = e
        return cls(group, tuple(e - s for s, e in everyone), method)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def start(self) -> int:
        return sum(self.shard_lengths[: self.rank])

    @property
    def end(self) -> int:
        return self.start + self.shard_lengths[self.rank]

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        """This rank's slice of a whole sequence."""
        if x.shape[dim] != sum(self.shard_lengths):
            raise ValueError(
                f"expected a whole sequence of {sum(self.shard_lengths)} tokens along dim "
                f"{dim}, got shape {tuple(x.shape)}"
            )
        return x.narrow(dim, self.start, self.shard_lengths[self.rank])

    def sum(self, x: Tensor) -> Tensor:
        """Sum over the group, not differentiable (for counts and statistics)."""
        return all_reduce(x.detach().clone(), self.group)

    def halo(self, x: Tensor, width: int) -> Tensor:
        """The `width` tokens just before this shard ([B, width, C], zeros before the start of
        the sequence); differentiable, so gradients flow back to the ranks that own them."""
        return HaloExchange.apply(x, width, self)


def _halo_sources(lengths: tuple[int, ...], width: int) -> list[list[tuple[int, int] | None]]:
    """For each rank r and halo slot i: (rank j, slot p in j's tail buffer) or None.

    Rank j sends its last `width` tokens (its tail buffer slot p holds global position
    end_j - width + p). The halo of rank r is global positions [start_r - width, start_r);
    each lies within the last `width` tokens of its owner, so the tails always suffice,
    even when shards are shorter than `width`.
    """
    ends = [sum(lengths[: j + 1]) for j in range(len(lengths))]
    table = []
    for r in range(len(lengths)):
        start = ends[r] - lengths[r]
        slots = []
        for i in range(width):
            pos = start - width + i
            if pos < 0:
                slots.append(None)
                continue
            j = next(j for j, e in enumerate(ends) if pos < e)
            slots.append((j, pos - (ends[j] - width)))
        table.append(slots)
    return table


@remember_scope
class HaloExchange(torch.autograd.Function):
    """One all-gather of every rank's tail forward, one of the halo gradients backward."""

    @staticmethod
    def forward(ctx, x: Tensor, width: int, sp: SequenceParallel) -> Tensor:
        b, t, c = x.shape
        tail = x.new_zeros(b, width, c)
        keep = min(t, width)
        tail[:, width - keep :] = x[:, t - keep :]
        tails = all_gather(tail, sp.group).wait()  # [W, B, width, C]
        table = _halo_sources(sp.shard_lengths, width)
        halo = x.new_zeros(b, width, c)
        for i, src in enumerate(table[sp.rank]):
            if src is not None:
                halo[:, i] = tails[src[0], :, src[1]]
        ctx.sp, ctx.width, ctx.table, ctx.t = sp, width, table, t
        return halo

    @staticmethod
    def backward(ctx, grad: Tensor):
        sp, width, rank = ctx.sp, ctx.width, ctx.sp.rank
        grads = all_gather(grad.contiguous(), sp.group).wait()  # [W, B, width, C]
        d_tail = grad.new_zeros(grad.shape)
        for r, slots in enumerate(ctx.table):
            for i, src in enumerate(slots):
                if src is not None and src[0] == rank:
                    d_tail[:, src[1]] += grads[r, :, i]
        dx = grad.new_zeros(grad.shape[0], ctx.t, grad.shape[2])
        keep = min(ctx.t, width)
        dx[:, ctx.t - keep :] = d_tail[:, width - keep :]
        return dx, None, None
