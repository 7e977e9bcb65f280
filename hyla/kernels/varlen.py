"""Packed variable-length sequences (cu_seqlens) <-> a zero-padded batch, and how rows of
tokens are cut into such sequences.

The chunk kernels run on a padded batch [N, L, ...] with L the longest sequence. Padding
sits at the end of each row with zero keys, values, betas and log-gates, so every padded
step is the identity on the state: outputs and final states of the real tokens are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PackedLayout:
    """Where each of the T packed tokens lives in the padded [N, L] batch."""

    seq_ids: Tensor  # [T] sequence of each token
    positions: Tensor  # [T] position of each token inside its sequence
    lengths: Tensor  # [N]
    max_len: int
    uniform: bool  # every sequence is max_len long: padding is a reshape

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor) -> PackedLayout:
        cu = cu_seqlens.long()
        lengths = cu[1:] - cu[:-1]
        seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
        positions = torch.arange(seq_ids.numel(), device=cu.device) - cu[:-1][seq_ids]
        longest = max(int(lengths.max()), 1)
        uniform = bool((lengths == longest).all())
        return cls(seq_ids, positions, lengths, longest, uniform)

    @property
    def num_seqs(self) -> int:
        return self.lengths.numel()

    def pad(self, x: Tensor) -> Tensor:
        """[1, T, ...] -> [N, L, ...], zero padded at the end of each sequence."""
        if self.uniform:
            return x.reshape(self.num_seqs, self.max_len, *x.shape[2:])
        out = x.new_zeros((self.num_seqs, self.max_len, *x.shape[2:]))
        return out.index_put((self.seq_ids, self.positions), x[0])

    def unpad(self, y: Tensor) -> Tensor:
        """[N, L, ...] -> [1, T, ...]."""
        if self.uniform:
            return y.reshape(1, -1, *y.shape[2:])
        return y[self.seq_ids, self.positions].unsqueeze(0)

    def segment_sum(self, x: Tensor) -> Tensor:
        """[1, T, ...] -> [N, ...]: the sum over each sequence's tokens."""
        out = x.new_zeros((self.num_seqs, *x.shape[2:]))
        return out.index_add(0, self.seq_ids, x[0])


@dataclass(frozen=True)
class GroupedTokens:
    """Tokens of [B, T] rows packed group after group: packed token n is token time[n] of
    row row[n], in group group[n], sorted by (group, row, time). Mixture-of-Memories packs
    the tokens routed to each memory this way; one group of every token is a row-major
    flattening."""

    groups: int
    batch: int  # B, the number of rows
    group: Tensor  # [N] int64
    row: Tensor  # [N] int64
    time: Tensor  # [N] int64

    @classmethod
    def every_token(cls, batch: int, length: int, device: torch.device) -> GroupedTokens:
        """One group holding every token, in row-major order ([B, T] flattened)."""
        rows = torch.arange(batch, device=device).repeat_interleave(length)
        times = torch.arange(length, device=device).repeat(batch)
        return cls(1, batch, torch.zeros_like(rows), rows, times)

    def cu_seqlens(self) -> Tensor:
        """Offsets of the G * B packed sequences, one per (group, row), uncut."""
        counts = torch.bincount(
            self.group * self.batch + self.row, minlength=self.groups * self.batch
        )
        return F.pad(counts.cumsum(0), (1, 0))


@dataclass(frozen=True)
class Segmentation:
    """How [B, T] rows are cut into segments that each run their own recurrence.

    A row is a sequence of runs (consecutive spans of the given lengths, e.g. pieces of one
    longer sequence) and each run opens a segment; so does every token flagged in `starts`
    (a document start). A run's first segment holds its tokens before its first start: it
    is empty when a start falls on the run's first token.
    """

    seg_in_row: Tensor  # [B, T] int64: each token's segment, counted within its row
    row_segments: Tensor  # [B] segments per row
    run_first: Tensor  # [B, R] the first segment of each run, within its row
    run_count: Tensor  # [B, R] segments per run

    @classmethod
    def build(
        cls, runs: Sequence[int], starts: Tensor | None, batch: int, device: torch.device
    ) -> Segmentation:
        """runs: run lengths (>= 1) summing to T; starts: None or bool [B, T]."""
        if not runs or min(runs) < 1:
            raise ValueError(f"runs must be lengths >= 1, got {list(runs)}")
        t = sum(runs)
        if starts is not None and tuple(starts.shape) != (batch, t):
            raise ValueError(f"starts must be [B, T] = {(batch, t)}, got {tuple(starts.shape)}")
        first_token = torch.tensor([0, *runs[:-1]], device=device).cumsum(0)
        flags = torch.zeros(batch, t, dtype=torch.long, device=device)
        if starts is not None:
            flags = starts.long()
        opened = flags.index_add(
            1, first_token, torch.ones(batch, len(runs), dtype=torch.long, device=device)
        )
        inclusive = opened.cumsum(1)
        row_segments = inclusive[:, -1]
        run_first = inclusive[:, first_token] - opened[:, first_token]
        run_count = torch.diff(run_first, append=row_segments[:, None])
        return cls(inclusive - 1, row_segments, run_first, run_count)

    def pack(self, tokens: GroupedTokens) -> tuple[Tensor, Tensor, Tensor]:
        """(cu_seqlens, first, count) for grouped tokens: every (group, row) is cut as its
        row is, its segments packed in order (possibly empty: a group may get no token of a
        segment); first and count [G, B, R] locate each run's segments among them."""
        b = self.seg_in_row.shape[0]
        if tokens.batch != b:
            raise ValueError(f"tokens must come from the {b} segmented rows, got {tokens.batch}")
        per_row = self.row_segments.repeat(tokens.groups)  # [G * B]
        base = F.pad(per_row.cumsum(0), (1, 0))
        segment = base[tokens.group * b + tokens.row] + self.seg_in_row[tokens.row, tokens.time]
        lengths = torch.bincount(segment, minlength=int(base[-1]))
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))
        first = base[:-1].view(tokens.groups, b, 1) + self.run_first[None]
        return cu_seqlens, first, self.run_count.expand_as(first)
