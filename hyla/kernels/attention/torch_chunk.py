"""Softmax attention in PyTorch (the CPU path), forward and backward.

Without document ids (and with one head dim for q, k and v) it runs on aten's fused
flash-attention CPU kernels (vectorised, multi-threaded, O(T) memory); a query offset
splits the keys into a fully visible block and a causal square, whose partial results
combine exactly through their log-sum-exp. Otherwise it runs a tiled loop, forward and
hand-written backward, as follows.

The loop runs over query tiles; each tile meets all of its visible keys at once
(keys [0, q_offset + tile end) when causal), so its softmax is exact in one pass and the
fully masked key range above the diagonal is never touched. Peak extra memory is one
[B, Hq, QUERY_TILE, Tk] score block: O(B H T * tile), never T x T. Only the keys in the
diagonal band of a tile need a causal mask, built as a small [tile, band] boolean; document
ids add a [B, tile, keys] one.

GQA is folded into the rows: queries are laid out [B, Hkv, Tq, G, D] (G = Hq // Hkv), so a
tile of query tokens is a contiguous [B, Hkv, tile * G, D] block against one k/v head.
"""

from __future__ import annotations

import torch
from torch import Tensor

QUERY_TILE = 128


def _group_queries(x: Tensor, hkv: int) -> Tensor:
    """[B, T, Hq, D] -> fp32 contiguous [B, Hkv, T, G, D]."""
    b, t, hq, d = x.shape
    return x.float().reshape(b, t, hkv, hq // hkv, d).transpose(1, 2).contiguous()


def _ungroup_queries(x: Tensor) -> Tensor:
    """[B, Hkv, T, G, D] -> [B, T, Hkv * G, D]."""
    b, hkv, t, g, d = x.shape
    return x.transpose(1, 2).reshape(b, t, hkv * g, d)


def _heads_first(x: Tensor) -> Tensor:
    """[B, T, H, D] -> fp32 contiguous [B, H, T, D]."""
    return x.float().transpose(1, 2).contiguous()


def _visible_end(start: int, stop: int, tk: int, causal: bool, q_offset: int) -> int:
    """One past the last key that any query of the tile [start, stop) sees."""
    return min(tk, q_offset + stop) if causal else tk


def _mask_band(scores: Tensor, start: int, stop: int, end: int, group: int, q_offset: int) -> None:
    """Set to -inf, in place, the scores of keys j > q_offset + i in a causal tile.

    scores: [B, Hkv, (stop - start) * G, end]. Keys below q_offset + start + 1 are seen by
    every row of the tile, so only the band from there to `end` needs the mask.
    """
    band = q_offset + start + 1
    if band >= end:
        return
    b, hkv = scores.shape[:2]
    rows = torch.arange(start, stop, device=scores.device) + q_offset
    cols = torch.arange(band, end, device=scores.device)
    hidden = cols[None, :] > rows[:, None]
    scores.view(b, hkv, stop - start, group, end)[..., band:].masked_fill_(
        hidden[:, None, :], float("-inf")
    )


def _mask_docs(
    scores: Tensor, q_doc: Tensor | None, k_doc: Tensor | None, start: int, stop: int, group: int
) -> None:
    """Set to -inf, in place, the scores of keys in another document than their query."""
    if q_doc is None or k_doc is None:  # given together
        return
    b, hkv, _, end = scores.shape
    other = q_doc[:, start:stop, None] != k_doc[:, None, :end]  # [B, tile, end]
    scores.view(b, hkv, stop - start, group, end).masked_fill_(
        other[:, None, :, None, :], float("-inf")
    )


def _fused_applies(q: Tensor, v: Tensor, q_doc: Tensor | None) -> bool:
    """aten's fused kernel takes no document mask and needs one head dim for q, k and v."""
    return q_doc is None and q.shape[-1] == v.shape[-1]


def _fused_key_blocks(
    k: Tensor, v: Tensor, tq: int, causal: bool, q_offset: int
) -> list[tuple[Tensor, Tensor, bool]]:
    """(k, v, is_causal) blocks, heads first, whose union is what the queries see.

    aten's causal mask is aligned to the upper left, so a causal offset becomes the keys
    [0, q_offset) seen by every query plus the square [q_offset, q_offset + Tq).
    """
    if not causal:
        return [(k, v, False)]
    blocks = [(k[:, :, :q_offset], v[:, :, :q_offset], False)] if q_offset > 0 else []
    return [*blocks, (k[:, :, q_offset : q_offset + tq], v[:, :, q_offset : q_offset + tq], True)]


def _heads_first_view(x: Tensor) -> Tensor:
    """[B, T, H, D] -> fp32 [B, H, T, D], a view where it can be: aten's fused CPU kernels
    read the last dimension as dense (stride 1) without checking it, so any other layout
    (one torch.compile may pass in) is copied."""
    x = x.float().transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()


def _fused_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, q_offset: int, scale: float
) -> tuple[Tensor, Tensor]:
    """forward() without document ids, on aten's fused kernel (GQA native)."""
    qh, kh, vh = (_heads_first_view(x) for x in (q, k, v))
    parts = [
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qh, kb, vb, 0.0, is_causal, scale=scale
        )
        for kb, vb, is_causal in _fused_key_blocks(kh, vh, q.shape[1], causal, q_offset)
    ]
    if len(parts) == 1:
        o, lse = parts[0]
        return o.transpose(1, 2), lse
    lse = torch.logaddexp(parts[0][1], parts[1][1])
    o = sum(o_b * (lse_b - lse).exp_()[..., None] for o_b, lse_b in parts)
    return o.transpose(1, 2), lse


def _fused_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    causal: bool,
    q_offset: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """backward() without document ids: each key block's backward with the combined o and
    lse is exactly its share of the gradients (softmax rows normalised over all blocks)."""
    qh, kh, vh, oh, doh = (_heads_first_view(x) for x in (q, k, v, o, do))
    lse = lse.contiguous()
    dq = torch.zeros_like(qh)
    dk, dv = kh.new_zeros(kh.shape), vh.new_zeros(vh.shape)
    start = 0
    for kb, vb, is_causal in _fused_key_blocks(kh, vh, q.shape[1], causal, q_offset):
        dq_b, dk_b, dv_b = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            doh, qh, kb, vb, oh, lse, 0.0, is_causal, scale=scale
        )
        stop = start + kb.shape[2]
        dq += dq_b
        dk[:, :, start:stop], dv[:, :, start:stop] = dk_b, dv_b
        start = stop
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    q_offset: int,
    scale: float,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(o fp32 [B, Tq, Hq, Dv], lse fp32 [B, Hq, Tq]); rows that see no key: o = 0,
    lse = +inf."""
    if _fused_applies(q, v, q_doc):
        return _fused_forward(q, k, v, causal, q_offset, scale)
    b, tq, hq, _ = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    qg = _group_queries(q, hkv) * scale
    kt = _heads_first(k).transpose(-1, -2)  # [B, Hkv, D, Tk]
    vh = _heads_first(v)
    o = qg.new_empty(b, hkv, tq, group, dv)
    lse = qg.new_empty(b, hkv, tq, group)
    for start in range(0, tq, QUERY_TILE):
        stop = min(start + QUERY_TILE, tq)
        rows = (stop - start) * group
        end = _visible_end(start, stop, tk, causal, q_offset)
        scores = torch.matmul(qg[:, :, start:stop].reshape(b, hkv, rows, -1), kt[..., :end])
        if causal:
            _mask_band(scores, start, stop, end, group, q_offset)
        _mask_docs(scores, q_doc, k_doc, start, stop, group)
        top = scores.amax(-1, keepdim=True)
        unseen = top == float("-inf")  # rows with no visible key
        probs = scores.sub_(top.masked_fill_(unseen, 0.0)).exp_()
        total = probs.sum(-1, keepdim=True)
        out = torch.matmul(probs, vh[:, :, :end]).div_(total.masked_fill(unseen, 1.0))
        o[:, :, start:stop] = out.view(b, hkv, stop - start, group, dv)
        row_lse = top.add_(total.log_()).masked_fill_(unseen, float("inf"))
        lse[:, :, start:stop] = row_lse.view(b, hkv, stop - start, group)
    return _ungroup_queries(o), lse.permute(0, 1, 3, 2).reshape(b, hq, tq)


def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    *,
    causal: bool,
    q_offset: int,
    scale: float,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in fp32, recomputing each tile's probabilities from lse.

    With P = softmax rows, dS = P * (dO V^T - delta) where delta_i = rowsum(dO_i * O_i);
    then dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO.
    """
    if _fused_applies(q, v, q_doc):
        return _fused_backward(q, k, v, o, lse, do, causal, q_offset, scale)
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    qg = _group_queries(q, hkv) * scale
    dog = _group_queries(do, hkv)
    delta = (do.float() * o.float()).sum(-1)  # [B, Tq, Hq]
    delta = delta.reshape(b, tq, hkv, group).transpose(1, 2).reshape(b, hkv, tq * group, 1)
    lse = lse.reshape(b, hkv, group, tq).transpose(2, 3).reshape(b, hkv, tq * group, 1)
    kh = _heads_first(k)
    vt = _heads_first(v).transpose(-1, -2)  # [B, Hkv, Dv, Tk]
    dq = torch.empty_like(qg)
    dk = kh.new_zeros(kh.shape)
    dv = kh.new_zeros(b, hkv, tk, v.shape[3])
    for start in range(0, tq, QUERY_TILE):
        stop = min(start + QUERY_TILE, tq)
        rows = (stop - start) * group
        end = _visible_end(start, stop, tk, causal, q_offset)
        q_tile = qg[:, :, start:stop].reshape(b, hkv, rows, d)
        do_tile = dog[:, :, start:stop].reshape(b, hkv, rows, -1)
        scores = torch.matmul(q_tile, kh[:, :, :end].transpose(-1, -2))
        if causal:
            _mask_band(scores, start, stop, end, group, q_offset)
        _mask_docs(scores, q_doc, k_doc, start, stop, group)
        probs = scores.sub_(lse[:, :, start * group : stop * group]).exp_()
        dv[:, :, :end] += torch.matmul(probs.transpose(-1, -2), do_tile)
        dscores = torch.matmul(do_tile, vt[..., :end])
        dscores.sub_(delta[:, :, start * group : stop * group]).mul_(probs)
        dq[:, :, start:stop] = torch.matmul(dscores, kh[:, :, :end]).view(
            b, hkv, stop - start, group, d
        )
        dk[:, :, :end] += torch.matmul(dscores.transpose(-1, -2), q_tile)
    return (
        _ungroup_queries(dq.mul_(scale)),
        dk.transpose(1, 2).contiguous(),
        dv.transpose(1, 2).contiguous(),
    )
