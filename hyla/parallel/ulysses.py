"""Ulysses sequence parallelism (all-to-all over heads), for any layer: the baseline.

An all-to-all turns [B, T_r, H, D] shards into [B, T, H / W, D] head groups, the layer runs
on the whole sequence locally, and a second all-to-all returns the output; backward mirrors
it. Needs every head count to divide by W.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from hyla.parallel.comm import TRACKER, CommRecord, remember_scope


@remember_scope
class AllToAll(torch.autograd.Function):
    """[B, T_r, H, ...] sequence shards <-> [B, T, H / W, ...] head groups (`to_heads`)."""

    @staticmethod
    def forward(ctx, x: Tensor, group, lengths: list[int], to_heads: bool) -> Tensor:
        ctx.group, ctx.lengths, ctx.to_heads = group, lengths, to_heads
        return _all_to_all(x, group, lengths, to_heads)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.group, ctx.lengths, not ctx.to_heads), None, None, None


def _all_to_all(x: Tensor, group, lengths: list[int], to_heads: bool) -> Tensor:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if to_heads:  # send head group j of my tokens to rank j; receive my group of all tokens
        hw = x.shape[2] // world
        sends = list(x.split(hw, dim=2))
        recv_shapes = [(x.shape[0], n, hw, *x.shape[3:]) for n in lengths]
        join_dim = 1
    else:  # send rank j its tokens of my head group; receive my tokens of every group
        sends = list(x.split(lengths, dim=1))
        recv_shapes = [(x.shape[0], lengths[rank], *x.shape[2:])] * world
        join_dim = 2
    return torch.cat(_exchange(sends, recv_shapes, group), dim=join_dim)


def _exchange(sends: list[Tensor], recv_shapes: list[tuple[int, ...]], group) -> list[Tensor]:
    """One all_to_all_single: sends[j] goes to rank j; returns what each rank sent here."""
    send = torch.cat([part.reshape(-1) for part in sends])
    send_splits = [part.numel() for part in sends]
    recv_splits = [math.prod(shape) for shape in recv_shapes]
    out = send.new_empty(sum(recv_splits))
    start = time.perf_counter()
    dist.all_to_all_single(out, send, recv_splits, send_splits, group=group)
    sent = (send.numel() - send_splits[dist.get_rank(group)]) * send.element_size()
    TRACKER.records.append(
        CommRecord("all_to_all", TRACKER.scope, sent, time.perf_counter() - start)
    )
    return [
        part.view(shape) for part, shape in zip(out.split(recv_splits), recv_shapes, strict=True)
    ]


def ulysses(
    fn: Callable[..., Tensor],
    per_head: tuple[Tensor | None, ...],
    *,
    group: dist.ProcessGroup,
    lengths: list[int],
) -> Tensor:
    """Run fn(*whole-sequence head groups) -> [B, T, H/W, ...] and return this rank's shard
    of its output. Every non-None entry of per_head is [B, T_r, H_x, ...] with H_x
    divisible by the group size (`parallelize` checked the model's head counts)."""
    gathered = [None if x is None else AllToAll.apply(x, group, lengths, True) for x in per_head]
    return AllToAll.apply(fn(*gathered), group, lengths, False)
