"""Document masking for packed rows: what every layer needs, built once per forward.

A training row holds several documents back to back. With `doc_start` [B, T] (True at the
first token of each document) no token may see another document: recurrent states restart
at each start, short convolutions do not reach across one, attention keys of other
documents are masked. Every row start is a boundary too: rows are independent sequences.

Under sequence parallelism each rank holds a slice of every row. Its first document piece
may continue a document from the rank before (unless a document starts at its first
token); that is what the LASP-2 chains (`hyla.parallel.chains`) carry. Local document
indices count from 0 = that continuing piece (empty when a document starts at the first
token). Rotary positions stay global (row positions, `sp.start` onwards): scores depend
only on position differences, and those are equal within a document either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hyla.parallel.chains import Chains
from hyla.parallel.comm import comm_scope
from hyla.parallel.context import SequenceParallel

DOC_MASK_METHODS = ("lasp2", "lasp1")  # sequence-parallel methods that support doc_start


@dataclass(frozen=True)
class Documents:
    start: Tensor  # [B, T] bool: a document starts at this token
    local_doc: Tensor  # [B, T] int64: document index within this row (slice), from 0
    pieces: Tensor  # [B] int64: documents (pieces) per row, the first possibly empty
    carry_in: Tensor  # [B] bool: the row's first piece continues the previous rank's
    conv_reach: Tensor  # [B, T] int64: how far back (<= conv width) a token's document goes
    cu_seqlens: Tensor  # the pieces of the rows flattened to [1, B * T]
    chains: Chains  # one chain per row over its pieces (used under sequence parallelism)

    @classmethod
    def build(
        cls, doc_start: Tensor, input_ids: Tensor, sp: SequenceParallel | None, conv_width: int
    ) -> Documents:
        """doc_start [B, T] bool, beside input_ids (this rank's slice under `sp`).

        conv_width: how many past tokens a short convolution reads (0: none). Under `sp`
        that needs the starts among the previous ranks' last conv_width tokens: one
        all-gather of fixed size (scope "documents"), and none when conv_width is 0."""
        if not isinstance(doc_start, Tensor) or doc_start.dtype != torch.bool:
            raise ValueError(
                f"doc_start must be a bool tensor [B, T], got "
                f"{getattr(doc_start, 'dtype', type(doc_start).__name__)}"
            )
        if doc_start.shape != input_ids.shape or doc_start.device != input_ids.device:
            raise ValueError(
                f"doc_start must have input_ids' shape {tuple(input_ids.shape)} and device "
                f"{input_ids.device}, got {tuple(doc_start.shape)} on {doc_start.device}"
            )
        if sp is not None and sp.method not in DOC_MASK_METHODS:
            raise ValueError(
                f"parallel.sp_method={sp.method!r} does not support document masking "
                f"(doc_start); use one of {DOC_MASK_METHODS}"
            )
        local_doc = doc_start.long().cumsum(1)
        pieces = local_doc[:, -1] + 1
        carry_in = ~doc_start[:, 0]
        b, t = doc_start.shape
        rows = torch.arange(b, device=doc_start.device).repeat_interleave(t)
        times = torch.arange(t, device=doc_start.device).repeat(b)
        return cls(
            doc_start,
            local_doc,
            pieces,
            carry_in,
            _conv_reach(doc_start, sp, conv_width),
            *_pack(pieces, carry_in, local_doc, 1, torch.zeros_like(rows), rows, times),
        )

    def pack(self, groups: int, g_idx: Tensor, b_idx: Tensor, t_idx: Tensor):
        """(cu_seqlens, chains) for tokens of `groups` groups (e.g. MoM memories) at
        (g_idx, b_idx, t_idx), sorted by (group, row, time): chain g * B + b runs over row
        b's document pieces, each packed sequence being the group's tokens of one piece."""
        return _pack(self.pieces, self.carry_in, self.local_doc, groups, g_idx, b_idx, t_idx)


def _pack(
    pieces: Tensor,
    carry_in: Tensor,
    local_doc: Tensor,
    groups: int,
    g_idx: Tensor,
    b_idx: Tensor,
    t_idx: Tensor,
) -> tuple[Tensor, Chains]:
    per_chain = pieces.repeat(groups)  # [G * B]
    first_piece = F.pad(per_chain.cumsum(0), (1, 0))
    piece = first_piece[g_idx * pieces.numel() + b_idx] + local_doc[b_idx, t_idx]
    lengths = torch.bincount(piece, minlength=int(first_piece[-1]))
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))
    return cu_seqlens, Chains.from_counts(per_chain, carry_in.repeat(groups))


def _conv_reach(doc_start: Tensor, sp: SequenceParallel | None, width: int) -> Tensor:
    """[B, T]: min(width, tokens since the token's document started). Starts among the
    `width` tokens before this slice come from the previous ranks (zeros before a row)."""
    b, t = doc_start.shape
    before = doc_start.new_zeros(b, width)
    if sp is not None and width > 0:
        with comm_scope("documents"):
            before = sp.halo(doc_start[..., None].float(), width)[..., 0] > 0.5
    flags = torch.cat([before, doc_start], dim=1)
    reach = torch.full_like(doc_start, width, dtype=torch.long)
    for back in range(width, -1, -1):  # the nearest start wins
        reach = reach.masked_fill(flags[:, width - back : width - back + t], back)
    return reach
