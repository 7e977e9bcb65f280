"""LASP-2H: softmax attention layers under sequence parallelism (ALGORITHMS.md §4).

Each rank all-gathers K and V of every shard (one collective: they travel fused), attends
its queries — global positions [s_r, e_r) — to keys [0, e_r) with the causal mask aligned
to the lower right, and in backward reduce-scatters dK and dV back to their owners. The
gathered K/V grow with T; GQA keeps them small. With document masking the shards' document
starts travel in the same all-gather (one more channel), and the gathered keys' document
ids are counted from them: no extra collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from hyla.kernels.attention import flash_attention
from hyla.parallel.comm import all_gather, reduce_scatter, remember_scope


def shard_lengths_of(local_len: int, group: dist.ProcessGroup, device: torch.device) -> list[int]:
    """Every rank's shard length, in rank order (a tiny all-gather)."""
    mine = torch.tensor([local_len], dtype=torch.int64, device=device)
    return all_gather(mine, group).wait().flatten().tolist()


@remember_scope
class GatherSequence(torch.autograd.Function):
    """[B, T_r, ...] shards -> the whole [B, sum T_r, ...] on every rank; the backward sums
    each position's gradient over ranks and returns it to its owner (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, lengths: list[int]) -> Tensor:
        rank, longest = dist.get_rank(group), max(lengths)
        padded = x.new_zeros(x.shape[0], longest, *x.shape[2:])
        padded[:, : lengths[rank]] = x
        slots = all_gather(padded, group).wait()  # [W, B, longest, ...]
        ctx.group, ctx.lengths = group, lengths
        return torch.cat([slots[r, :, :n] for r, n in enumerate(lengths)], dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        longest = max(ctx.lengths)
        slots = grad.new_zeros(len(ctx.lengths), grad.shape[0], longest, *grad.shape[2:])
        for r, part in enumerate(grad.split(ctx.lengths, dim=1)):
            slots[r, :, : part.shape[1]] = part
        mine = reduce_scatter(slots, ctx.group)
        return mine[:, : ctx.lengths[dist.get_rank(ctx.group)]], None, None


def lasp2h_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup,
    causal: bool = True,
    scale: float | None = None,
    shard_lengths: list[int] | None = None,
    backend: str | None = None,
    doc_start: Tensor | None = None,
) -> Tensor:
    """Softmax attention over a sequence split across `group`: this rank's contiguous
    shards q [B, T_r, Hq, D], k and v [B, T_r, Hkv, D] in, its output shard out.

    shard_lengths: every rank's T_r in rank order, if the caller knows them; otherwise
    they are exchanged first (one more, tiny, all-gather).
    doc_start: None, or this shard's [B, T_r] bool document starts: queries then see only
    keys of their own document (every row start is a document boundary).
    """
    if group is None:
        raise ValueError("group must be the sequence-parallel process group, got None")
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"q, k, v must be shards of one sequence with equal [B, T_r], got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if shard_lengths is None:
        shard_lengths = shard_lengths_of(q.shape[1], group, q.device)
    if len(shard_lengths) != world or shard_lengths[rank] != q.shape[1]:
        raise ValueError(
            f"shard_lengths must list the {world} ranks' shard lengths with this rank's "
            f"({rank}) equal to its q length {q.shape[1]}, got {shard_lengths}"
        )
    parts = [k, v]
    if doc_start is not None:
        if doc_start.dtype != torch.bool or doc_start.shape != q.shape[:2]:
            raise ValueError(
                f"doc_start must be a bool tensor [B, T_r] = {tuple(q.shape[:2])}, got "
                f"{doc_start.dtype} {tuple(doc_start.shape)}"
            )
        parts.append(doc_start[:, :, None, None].to(k.dtype).expand(-1, -1, k.shape[2], 1))
    widths = [x.shape[-1] for x in parts]
    gathered = GatherSequence.apply(torch.cat(parts, dim=-1), group, list(shard_lengths))
    k_all, v_all, *starts = gathered.split(widths, dim=-1)
    start = sum(shard_lengths[:rank])
    end = start + q.shape[1] if causal else k_all.shape[1]
    k_all, v_all = k_all[:, :end], v_all[:, :end]  # causal: later keys are masked anyway
    q_doc = k_doc = None
    if starts:
        k_doc = (starts[0][:, :end, 0, 0] > 0.5).cumsum(1)
        q_doc = k_doc[:, start : start + q.shape[1]]
    return flash_attention(
        q,
        k_all,
        v_all,
        causal=causal,
        q_offset=start if causal else 0,
        scale=scale,
        backend=backend,
        q_doc=q_doc,
        k_doc=k_doc,
    )
