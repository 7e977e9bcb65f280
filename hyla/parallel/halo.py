"""The tokens just before each of a rank's pieces: what a short causal convolution reads
across a piece boundary."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from hyla.parallel.comm import all_gather, remember_scope
from hyla.parallel.layout import SequenceLayout


def _tails(x: Tensor, lengths: list[int], width: int) -> Tensor:
    """[B, T_r, C] -> [R, B, width, C]: each run's last `width` tokens, right-aligned."""
    b, _, c = x.shape
    tails = x.new_zeros(len(lengths), b, width, c)
    for i, part in enumerate(x.split(lengths, dim=1)):
        keep = min(part.shape[1], width)
        tails[i, :, width - keep :] = part[:, part.shape[1] - keep :]
    return tails


def _by_slot(gathered: Tensor) -> Tensor:
    """[W, R, B, width, C] -> [W * R * width + 1, B, C] (tail slots, then a zero row)."""
    b, c = gathered.shape[2], gathered.shape[4]
    flat = gathered.permute(0, 1, 3, 2, 4).reshape(-1, b, c)
    return torch.cat([flat, flat.new_zeros(1, b, c)])


@remember_scope
class HaloExchange(torch.autograd.Function):
    """x [B, T_r, C] -> [R, B, width, C]: for each of this rank's runs, the `width` tokens
    before it in the sequence (zeros before its start). One all-gather of every run's tail
    forward, one of the halo gradients backward; differentiable, so gradients flow back to
    the ranks that own the tokens."""

    @staticmethod
    def forward(ctx, x: Tensor, width: int, layout: SequenceLayout, group) -> Tensor:
        rank = dist.get_rank(group)
        lengths = layout.run_lengths(rank)
        b, _, c = x.shape
        gathered = all_gather(_tails(x, lengths, width), group).wait()  # [W, R, B, width, C]
        sources = layout.halo_sources(width)[rank].to(x.device)
        halo = _by_slot(gathered)[sources].view(len(lengths), width, b, c).transpose(1, 2)
        ctx.width, ctx.layout, ctx.group, ctx.lengths = width, layout, group, lengths
        return halo.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        width, layout, lengths = ctx.width, ctx.layout, ctx.lengths
        rank, runs = dist.get_rank(ctx.group), len(lengths)
        grads = all_gather(grad.contiguous(), ctx.group).wait()  # [W, R, B, width, C]
        b, c = grad.shape[1], grad.shape[3]
        received = grads.permute(0, 1, 3, 2, 4).reshape(-1, b, c)
        sources = layout.halo_sources(width).flatten().to(grad.device)
        per_slot = grad.new_zeros(layout.world * runs * width + 1, b, c)
        per_slot.index_add_(0, sources, received)
        mine = per_slot[rank * runs * width : (rank + 1) * runs * width]
        mine = mine.view(runs, width, b, c).transpose(1, 2)  # [R, B, width, C]
        parts = []
        for i, n in enumerate(lengths):
            keep = min(n, width)
            part = grad.new_zeros(b, n, c)
            part[:, n - keep :] = mine[i, :, width - keep :]
            parts.append(part)
        return torch.cat(parts, dim=1), None, None, None
