"""The run's sample stream: which samples each data-parallel rank reads at each step, derived
from the position in the stream alone, so that a run resumes exactly at any scale.

Epoch e is a permutation of the dataset's N samples, seeded by (data.seed, e), or their order
without data.shuffle; the stream is the epochs one after another: stream position j holds
sample order_e[j mod N] with e = j div N. Step t of a run whose global batch is
G = dp x data.batch_size x trainer.grad_accum takes the positions [t G, (t + 1) G):
micro-batch m of them [t G + m dp b, t G + (m + 1) dp b), and dp rank r of those the b
starting at t G + m dp b + r b. Any dp, batch size and accumulation with the same G read the
same samples at every step, split otherwise among the ranks; and where a run stands is one
number, the samples it has consumed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class SampleStream:
    """Positions of the endless stream -> dataset indices (see the module docstring)."""

    def __init__(self, size: int, shuffle: bool, seed: int) -> None:
        if size < 1:
            raise ValueError(f"the dataset must hold at least one sample, got {size}")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def order(self, epoch: int) -> torch.Tensor:
        """The dataset indices of one epoch, in stream order."""
        if epoch != self._epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._order = torch.randperm(self.size, generator=gen)
            else:
                self._order = torch.arange(self.size)
            self._epoch = epoch
        return self._order

    def take(self, start: int, count: int) -> list[int]:
        """The dataset indices at stream positions [start, start + count)."""
        out: list[int] = []
        while count > 0:
            epoch, offset = divmod(start, self.size)
            n = min(count, self.size - offset)
            out += self.order(epoch)[offset : offset + n].tolist()
            start, count = start + n, count - n
        return out


class RankSampler(Sampler[int]):
    """The dataset indices one dp rank reads, micro-batch after micro-batch, from stream
    position `start` (the samples consumed so far, at a step boundary) on; endless."""

    def __init__(
        self,
        stream: SampleStream,
        *,
        dp: int,
        rank: int,
        batch_size: int,
        grad_accum: int,
        start: int = 0,
    ) -> None:
        self.stream, self.dp, self.rank = stream, dp, rank
        self.batch_size, self.grad_accum, self.start = batch_size, grad_accum, start

    @property
    def global_batch(self) -> int:
        return self.dp * self.batch_size * self.grad_accum

    def __iter__(self) -> Iterator[int]:
        step_start, b = self.start, self.batch_size
        while True:
            for micro in range(self.grad_accum):
                first = step_start + micro * self.dp * b + self.rank * b
                yield from self.stream.take(first, b)
            step_start += self.global_batch
