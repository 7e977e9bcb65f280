"""Which packed segments of a rank carry recurrent state across rank boundaries.

A rank's shard is packed into N segments (cu_seqlens; each its own recurrence from its own
initial state). Segments are grouped into C chains, the same C on every rank, each chain
a run of consecutive segments first..last: chain c of rank r continues chain c of rank
r - 1. Its carried state enters its first segment, if `carry_in`, and leaves as the final
state of its last segment. So a chain of one segment that takes the carry passes it on
transformed (S_out = AA S_in + BB); any other chain resets it (AA = 0).

Plain sequences and Mixture-of-Memories without documents: one segment per chain, always
carried. Document masking: a chain per batch row (and memory), a segment per document
piece; the first piece takes the carry unless a document starts at the shard's first token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Chains:
    first: Tensor  # [C] int64: index of each chain's first segment
    last: Tensor  # [C] int64: index of each chain's last segment
    carry_in: Tensor  # [C] bool: the first segment starts from the carried state

    @classmethod
    def from_counts(cls, counts: Tensor, carry_in: Tensor) -> Chains:
        """Chains of counts[c] >= 1 consecutive segments each, in segment order."""
        if counts.dim() != 1 or counts.shape != carry_in.shape or bool((counts < 1).any()):
            raise ValueError(
                f"counts must be [C] segment counts >= 1 with carry_in [C] beside them, got "
                f"counts {counts.tolist()} and carry_in of shape {tuple(carry_in.shape)}"
            )
        ends = counts.long().cumsum(0)
        return cls(F.pad(ends[:-1], (1, 0)), ends - 1, carry_in.bool())

    @classmethod
    def one_per_segment(cls, n: int, device: torch.device) -> Chains:
        """Segment i of every rank continues segment i of the rank before."""
        ids = torch.arange(n, device=device)
        return cls(ids, ids, torch.ones(n, dtype=torch.bool, device=device))

    @property
    def num_chains(self) -> int:
        return self.first.numel()

    @property
    def passes(self) -> Tensor:
        """[C] bool: the chain is one segment that takes the carry, so the carry survives."""
        return (self.first == self.last) & self.carry_in

    def check(self, num_segments: int) -> None:
        """The chains must index the N packed segments."""
        if self.num_chains and int(self.last.max()) >= num_segments:
            raise ValueError(
                f"chains index segment {int(self.last.max())} but there are only "
                f"{num_segments} packed segments"
            )

    def scatter_carry(self, carry: Tensor, num_segments: int) -> Tensor:
        """[C, ...] chain states -> [N, ...] initial states of the segments (zero unless the
        segment is a chain's first and takes the carry)."""
        out = carry.new_zeros(num_segments, *carry.shape[1:])
        keep = self.carry_in.view(-1, *[1] * (carry.dim() - 1))
        return out.index_copy(0, self.first, carry * keep)

    def gather_carry(self, per_segment: Tensor) -> Tensor:
        """[N, ...] gradients w.r.t. segment initial states -> [C, ...] w.r.t. the carries
        (the adjoint of `scatter_carry`)."""
        keep = self.carry_in.view(-1, *[1] * (per_segment.dim() - 1))
        return per_segment[self.first] * keep

    def scatter_last(self, per_chain: Tensor, num_segments: int) -> Tensor:
        """[C, ...] -> [N, ...]: each chain's entry at its last segment, zeros elsewhere."""
        out = per_chain.new_zeros(num_segments, *per_chain.shape[1:])
        return out.index_copy(0, self.last, per_chain)
