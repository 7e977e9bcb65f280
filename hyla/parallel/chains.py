"""Which packed segments of a rank carry recurrent state from one piece of the sequence to
the next.

A rank's local tokens are packed into N segments (cu_seqlens; each runs its own recurrence
from its own initial state). For each of the rank's R runs (its pieces of the sequence, see
`hyla.parallel.layout`) the segments are grouped into C chains, the same C on every rank,
each chain a run of consecutive segments first..last; chain c of a piece continues chain c
of the piece before it in the sequence, wherever that piece is. The carried state enters the
chain's first segment, if `carry_in`, and leaves as the final state of its last segment. So
a chain of one segment that takes the carry passes it on transformed (S_out = AA S_in + BB);
any other chain resets it (AA = 0). Chains are numbered run-major: chain r * C + c.

Plain rows and Mixture-of-Memories without documents: one segment per chain, always carried.
Document masking: a segment per document piece; a chain's first segment takes the carry
unless a document starts at the piece's first token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Chains:
    first: Tensor  # [R * C] int64: index of each chain's first segment
    last: Tensor  # [R * C] int64: index of each chain's last segment
    carry_in: Tensor  # [R * C] bool: the first segment starts from the carried state
    runs: int  # R

    @classmethod
    def from_runs(cls, first: Tensor, count: Tensor, carry_in: Tensor) -> Chains:
        """first, count [G, B, R] (as `hyla.kernels.Segmentation.pack` gives them) and
        carry_in [B, R]: one chain per (run, group, row)."""
        g, b, r = first.shape
        run_major = first.permute(2, 0, 1).reshape(-1)
        last = (first + count - 1).permute(2, 0, 1).reshape(-1)
        carry = carry_in.bool()[None].expand(g, b, r).permute(2, 0, 1).reshape(-1)
        return cls(run_major, last, carry, r)

    @classmethod
    def one_per_segment(cls, n: int, runs: int, device: torch.device) -> Chains:
        """Segment i is chain i: segment r * (n / R) + c continues chain c."""
        ids = torch.arange(n, device=device)
        return cls(ids, ids, torch.ones(n, dtype=torch.bool, device=device), runs)

    @property
    def num_chains(self) -> int:
        """C, the chains of one run."""
        return self.first.numel() // self.runs

    @property
    def passes(self) -> Tensor:
        """[R * C] bool: the chain is one segment that takes the carry, so the carry survives."""
        return (self.first == self.last) & self.carry_in

    def check(self, num_segments: int) -> None:
        """The chains must index the N packed segments, C per run."""
        if self.first.numel() % self.runs:
            raise ValueError(
                f"the {self.first.numel()} chains must split evenly over the {self.runs} runs"
            )
        if self.first.numel() and int(self.last.max()) >= num_segments:
            raise ValueError(
                f"chains index segment {int(self.last.max())} but there are only "
                f"{num_segments} packed segments"
            )

    def scatter_carry(self, carry: Tensor, num_segments: int) -> Tensor:
        """[R * C, ...] chain states -> [N, ...] initial states of the segments (zero unless
        the segment is a chain's first and takes the carry)."""
        out = carry.new_zeros(num_segments, *carry.shape[1:])
        keep = self.carry_in.view(-1, *[1] * (carry.dim() - 1))
        return out.index_copy(0, self.first, carry * keep)

    def gather_carry(self, per_segment: Tensor) -> Tensor:
        """[N, ...] gradients w.r.t. segment initial states -> [R * C, ...] w.r.t. the
        carries (the adjoint of `scatter_carry`)."""
        keep = self.carry_in.view(-1, *[1] * (per_segment.dim() - 1))
        return per_segment[self.first] * keep

    def scatter_last(self, per_chain: Tensor, num_segments: int) -> Tensor:
        """[R * C, ...] -> [N, ...]: each chain's entry at its last segment, zeros elsewhere."""
        out = per_chain.new_zeros(num_segments, *per_chain.shape[1:])
        return out.index_copy(0, self.last, per_chain)
