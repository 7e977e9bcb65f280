"""Packed variable-length sequences (cu_seqlens) <-> a zero-padded batch.

The chunk kernels run on a padded batch [N, L, ...] with L the longest sequence. Padding
sits at the end of each row with zero keys, values, betas and log-gates, so every padded
step is the identity on the state: outputs and final states of the real tokens are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackedLayout:
    """Where each of the T packed tokens lives in the padded [N, L] batch."""

    seq_ids: Tensor  # [T] sequence of each token
    positions: Tensor  # [T] position of each token inside its sequence
    lengths: Tensor  # [N]
    max_len: int

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor) -> PackedLayout:
        cu = cu_seqlens.long()
        lengths = cu[1:] - cu[:-1]
        seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
        positions = torch.arange(seq_ids.numel(), device=cu.device) - cu[:-1][seq_ids]
        return cls(seq_ids, positions, lengths, max(int(lengths.max()), 1))

    @property
    def num_seqs(self) -> int:
        return self.lengths.numel()

    def pad(self, x: Tensor) -> Tensor:
        """[1, T, ...] -> [N, L, ...], zero padded at the end of each sequence."""
        out = x.new_zeros((self.num_seqs, self.max_len, *x.shape[2:]))
        return out.index_put((self.seq_ids, self.positions), x[0])

    def unpad(self, y: Tensor) -> Tensor:
        """[N, L, ...] -> [1, T, ...]."""
        return y[self.seq_ids, self.positions].unsqueeze(0)

    def segment_sum(self, x: Tensor) -> Tensor:
        """[1, T, ...] -> [N, ...]: the sum over each sequence's tokens."""
        out = x.new_zeros((self.num_seqs, *x.shape[2:]))
        return out.index_add(0, self.seq_ids, x[0])
