"""The run's sample stream: which samples each data-parallel rank reads at each step, derived
from the position in the stream alone, so that a run resumes exactly at any scale.

Epoch e is a permutation of the dataset's N samples, keyed by (data.seed, e), or their order
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

import numpy as np
from torch.utils.data import Sampler

FEISTEL_ROUNDS = 6
# Names how an epoch is ordered; a checkpoint records it with its position (a position in
# another order names other samples).
ORDER = f"feistel-{FEISTEL_ROUNDS}-splitmix64"
_MASK64 = np.uint64(2**64 - 1)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a 64-bit integer hash, elementwise (uint64 wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class KeyedPermutation:
    """A pseudo-random permutation of [0, size), computed per position in O(1) memory: a
    Feistel network over the smallest even number of bits that holds size, keyed by `key`,
    applied again to any output outside [0, size) ("cycle walking") until it falls inside.
    The network is a bijection of its 2^bits values, so the walk is a bijection of [0, size);
    as 2^bits < 4 size, a position takes fewer than 4 applications on average. An epoch of a
    10B-token corpus has tens of millions of samples: a stored permutation of them would cost
    every rank 8 bytes a sample."""

    def __init__(self, size: int, key: int) -> None:
        self.size = size
        bits = max(2, (size - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.low = (np.uint64(1) << self.half) - np.uint64(1)
        seeds = np.arange(FEISTEL_ROUNDS, dtype=np.uint64) + np.uint64(key % 2**64) * np.uint64(
            FEISTEL_ROUNDS
        )
        self.round_keys = _mix(seeds)

    def _network(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.low
        for k in self.round_keys:
            left, right = right, left ^ (_mix(right ^ k) & self.low)
        return (left << self.half) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        out = self._network(positions.astype(np.uint64))
        outside = out >= self.size
        while outside.any():
            out[outside] = self._network(out[outside])
            outside = out >= self.size
        return out.astype(np.int64)


class SampleStream:
    """Positions of the endless stream -> dataset indices (see the module docstring). Holds
    no per-sample state: each epoch's order is a `KeyedPermutation` keyed by (seed, epoch)."""

    def __init__(self, size: int, shuffle: bool, seed: int) -> None:
        if size < 1:
            raise ValueError(f"the dataset must hold at least one sample, got {size}")
        self.size, self.shuffle, self.seed = size, shuffle, seed

    def take(self, start: int, count: int) -> list[int]:
        """The dataset indices at stream positions [start, start + count)."""
        out: list[int] = []
        while count > 0:
            epoch, offset = divmod(start, self.size)
            n = min(count, self.size - offset)
            positions = np.arange(offset, offset + n, dtype=np.int64)
            if self.shuffle:
                positions = KeyedPermutation(self.size, self.seed * 1_000_003 + epoch)(positions)
            out += positions.tolist()
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
