"""LASP-2H: softmax attention layers under sequence parallelism, over any layout.

Each rank all-gathers K and V of every rank (one collective: they travel fused) and puts the
pieces in sequence order; each local query piece, at global positions [s, s + n), attends to
keys [0, s + n) with the causal mask aligned to its own position. Backward reduce-scatters
dK and dV back to their owners. Under the zigzag layout every rank's queries see the same
number of keys, so no rank waits for another at the collectives. The gathered K/V grow with
T; GQA keeps them small. With document masking the document starts travel in the same
all-gather (one more channel), and the gathered keys' document ids are counted from them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from hyla.kernels import flash_attention
from hyla.parallel.comm import all_gather, reduce_scatter, remember_scope
from hyla.parallel.layout import SequenceLayout
from hyla.parallel.support import check_group, check_layout


def exchanged_layout(local_len: int, group: dist.ProcessGroup, device) -> SequenceLayout:
    """The contiguous layout of the group's local lengths, in rank order (a tiny all-gather)."""
    mine = torch.tensor([local_len], dtype=torch.int64, device=device)
    return SequenceLayout.contiguous(all_gather(mine, group).wait().flatten().tolist())


@remember_scope
class GatherSequence(torch.autograd.Function):
    """Local [B, T_r, ...] -> the whole sequence [B, T, ...], in sequence order, on every
    rank; the backward sums each position's gradient over ranks and returns it to its owner
    (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, layout: SequenceLayout) -> Tensor:
        longest = max(layout.local_length(r) for r in range(layout.world))
        padded = x.new_zeros(x.shape[0], longest, *x.shape[2:])
        padded[:, : x.shape[1]] = x
        slots = all_gather(padded, group).wait()  # [W, B, longest, ...]
        ctx.group, ctx.layout, ctx.longest = group, layout, longest
        parts = []
        for piece, n in enumerate(layout.pieces):
            owner, offset = layout.owners[piece], layout.offset(piece)
            parts.append(slots[owner, :, offset : offset + n])
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        layout = ctx.layout
        slots = grad.new_zeros(layout.world, grad.shape[0], ctx.longest, *grad.shape[2:])
        for piece, part in enumerate(grad.split(list(layout.pieces), dim=1)):
            offset = layout.offset(piece)
            slots[layout.owners[piece], :, offset : offset + part.shape[1]] = part
        mine = reduce_scatter(slots, ctx.group)
        return mine[:, : layout.local_length(dist.get_rank(ctx.group))], None, None


def lasp2h_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup,
    layout: SequenceLayout | None = None,
    causal: bool = True,
    scale: float | None = None,
    backend: str | None = None,
    doc_start: Tensor | None = None,
) -> Tensor:
    """Softmax attention over a sequence split across `group`: this rank's local q
    [B, T_r, Hq, D], k and v [B, T_r, Hkv, D] in (its pieces of the sequence, concatenated
    in sequence order), its output out.

    layout: the `hyla.parallel.SequenceLayout` of the split; None means contiguous pieces
    in rank order, whose lengths are then exchanged first (one more, tiny, all-gather).
    doc_start: None, or this rank's [B, T_r] bool document starts: queries then see only
    keys of their own document (every row start is a document boundary).

    The door for callers with a bare group and layout: it checks them first. A
    `SequenceParallel`, checked when it was built, calls `attention_over` directly.
    """
    world = check_group(group)
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"q, k, v must be one rank's part of one sequence with equal [B, T_r], got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    rank = dist.get_rank(group)
    if layout is None:
        layout = exchanged_layout(q.shape[1], group, q.device)
    check_layout(layout, world)
    if layout.local_length(rank) != q.shape[1]:
        raise ValueError(
            f"layout must give this rank ({rank}) its q length {q.shape[1]}, got {layout}"
        )
    if doc_start is not None and (doc_start.dtype != torch.bool or doc_start.shape != q.shape[:2]):
        raise ValueError(
            f"doc_start must be a bool tensor [B, T_r] = {tuple(q.shape[:2])}, got "
            f"{doc_start.dtype} {tuple(doc_start.shape)}"
        )
    return attention_over(
        q,
        k,
        v,
        group=group,
        layout=layout,
        rank=rank,
        causal=causal,
        scale=scale,
        backend=backend,
        doc_start=doc_start,
    )


def attention_over(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup,
    layout: SequenceLayout,
    rank: int,
    causal: bool = True,
    scale: float | None = None,
    backend: str | None = None,
    doc_start: Tensor | None = None,
) -> Tensor:
    """`lasp2h_attention` on checked arguments: `rank` is this rank's in `group`."""
    parts = [k, v]
    if doc_start is not None:
        parts.append(doc_start[:, :, None, None].to(k.dtype).expand(-1, -1, k.shape[2], 1))
    widths = [x.shape[-1] for x in parts]
    gathered = GatherSequence.apply(torch.cat(parts, dim=-1), group, layout)
    k_all, v_all, *starts = gathered.split(widths, dim=-1)
    k_doc = (starts[0][..., 0, 0] > 0.5).cumsum(1) if starts else None
    if not causal:
        q_doc = None if k_doc is None else k_doc[:, layout.positions(rank, q.device)]
        return flash_attention(
            q, k_all, v_all, causal=False, scale=scale, backend=backend, q_doc=q_doc, k_doc=k_doc
        )
    outputs, first = [], 0
    for piece in layout.runs(rank):
        start, n = layout.starts[piece], layout.pieces[piece]
        end = start + n  # later keys are masked anyway
        outputs.append(
            flash_attention(
                q[:, first : first + n],
                k_all[:, :end],
                v_all[:, :end],
                causal=True,
                q_offset=start,
                scale=scale,
                backend=backend,
                q_doc=None if k_doc is None else k_doc[:, start:end],
                k_doc=None if k_doc is None else k_doc[:, :end],
            )
        )
        first += n
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
