"""Which pieces of a sequence each rank of a sequence-parallel group holds.

A layout cuts a sequence of T tokens into pieces (consecutive spans, in sequence order) and
gives each piece to a rank; every rank holds the same number of pieces, and its local tensor
is its pieces concatenated in sequence order. Everything position-dependent follows the
global position of each piece: rotary positions, the convolution halo (the tokens before a
piece belong to the piece before it, wherever that is), document boundaries, the order in
which LASP-2 composes the pieces' state transitions, and the causal offset of each query
piece in LASP-2H.

- contiguous: W pieces, rank r holds piece r. The recurrences need nothing else, but causal
  attention is unbalanced: the last rank computes 2W - 1 times the query-key pairs of the
  first.
- zigzag: 2W pieces, rank r holds pieces r and 2W - 1 - r, so each rank has one early and
  one late piece and the causal pairs even out (Llama 3's context parallelism). LASP-2
  chains the pieces in sequence order, so the recurrences stay exact.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

from hyla.parallel.support import ArgumentError

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class SequenceLayout:
    """pieces: piece lengths in sequence order (each >= 1); owners: the rank of each piece."""

    pieces: tuple[int, ...]
    owners: tuple[int, ...]
    world: int

    def __post_init__(self) -> None:
        if isinstance(self.world, bool) or not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"world must be an integer >= 1, got {self.world!r}")
        if len(self.owners) != len(self.pieces) or not self.pieces:
            raise ValueError(
                f"pieces and owners must be non-empty and of equal length, got pieces "
                f"{list(self.pieces)} and owners {list(self.owners)}"
            )
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.pieces):
            raise ValueError(f"every piece needs >= 1 token, got pieces {list(self.pieces)}")
        counts = [self.owners.count(r) for r in range(self.world)]
        if any(not 0 <= o < self.world for o in self.owners) or len(set(counts)) != 1:
            raise ValueError(
                f"every rank 0..{self.world - 1} must hold the same number of pieces, got "
                f"owners {list(self.owners)}"
            )

    # ------------------------------------------------------------------ builders

    @classmethod
    def contiguous(cls, lengths: Sequence[int]) -> SequenceLayout:
        """Rank r holds one piece of lengths[r] tokens, in rank order."""
        return cls(tuple(lengths), tuple(range(len(lengths))), len(lengths))

    @classmethod
    def zigzag(cls, pieces: Sequence[int]) -> SequenceLayout:
        """2W pieces of the given lengths; rank r holds pieces r and 2W - 1 - r."""
        if len(pieces) % 2:
            raise ValueError(f"a zigzag layout needs an even number of pieces, got {len(pieces)}")
        world = len(pieces) // 2
        owners = tuple(p if p < world else 2 * world - 1 - p for p in range(2 * world))
        return cls(tuple(pieces), owners, world)

    @classmethod
    def even(cls, kind: str, length: int, world: int) -> SequenceLayout:
        """`length` tokens split as evenly as the layout allows. Contiguous: earlier ranks
        get the remainder. Zigzag: the extra tokens go to both pieces of the first ranks, one
        rank's pair after another, which keeps their causal work balanced."""
        if kind not in LAYOUTS:
            raise ArgumentError(
                "{kind} must be one of {allowed}, got {got!r}", allowed=LAYOUTS, got=kind
            )
        count = world if kind == "contiguous" else 2 * world
        if isinstance(length, bool) or not isinstance(length, int) or length < count:
            raise ArgumentError(  # every piece needs at least one token
                "{length} must be >= the {count} pieces of a {layout_kind} layout over {world} = "
                "{ranks} ranks, got {got!r}",
                count=count,
                layout_kind=kind,
                ranks=world,
                got=length,
            )
        base, extra = divmod(length, count)
        if kind == "contiguous":
            return cls.contiguous([base + (r < extra) for r in range(world)])
        order = [p for r in range(world) for p in (r, count - 1 - r)]  # pieces by rank
        extra_pieces = set(order[:extra])
        return cls.zigzag([base + (p in extra_pieces) for p in range(count)])

    # ------------------------------------------------------------------ geometry

    @property
    def length(self) -> int:
        return sum(self.pieces)

    @property
    def starts(self) -> tuple[int, ...]:
        """Each piece's first global position."""
        return (0, *accumulate(self.pieces))[:-1]

    @property
    def kind(self) -> str:
        if self.owners == tuple(range(self.world)):
            return "contiguous"
        if len(self.pieces) == 2 * self.world and self == SequenceLayout.zigzag(self.pieces):
            return "zigzag"
        return "custom"

    def runs(self, rank: int) -> list[int]:
        """The pieces `rank` holds, in sequence order (its local tensor's runs)."""
        self._check_rank(rank)
        return [p for p, owner in enumerate(self.owners) if owner == rank]

    def run_lengths(self, rank: int) -> list[int]:
        return [self.pieces[p] for p in self.runs(rank)]

    def local_length(self, rank: int) -> int:
        return sum(self.run_lengths(rank))

    @property
    def order(self) -> tuple[tuple[int, int], ...]:
        """(owner, slot) of every piece, in sequence order: all the LASP-2 fold needs."""
        return tuple(self.slot(p) for p in range(len(self.pieces)))

    def offset(self, piece: int) -> int:
        """Where the piece starts in its owner's local tensor."""
        owner, slot = self.slot(piece)
        return sum(self.pieces[p] for p in self.runs(owner)[:slot])

    def slot(self, piece: int) -> tuple[int, int]:
        """(owner rank, index of the piece among the owner's runs)."""
        owner = self.owners[piece]
        return owner, self.runs(owner).index(piece)

    def positions(self, rank: int, device: torch.device | str = "cpu") -> Tensor:
        """[T_r] int64: the global position of each local token."""
        starts = self.starts
        return torch.cat(
            [
                torch.arange(starts[p], starts[p] + self.pieces[p], device=device)
                for p in self.runs(rank)
            ]
        )

    def shard(self, x: Tensor, rank: int, dim: int = 1) -> Tensor:
        """This rank's local tensor from a whole sequence along `dim`."""
        if x.shape[dim] != self.length:
            raise ValueError(
                f"expected a whole sequence of {self.length} tokens along dim {dim}, got shape "
                f"{tuple(x.shape)}"
            )
        starts = self.starts
        parts = [x.narrow(dim, starts[p], self.pieces[p]) for p in self.runs(rank)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def causal_pairs(self, rank: int) -> int:
        """Query-key pairs this rank's queries see in causal attention over the sequence:
        sum over its tokens of (global position + 1)."""
        starts = self.starts
        return sum(
            n * starts[p] + n * (n + 1) // 2
            for p, n in ((p, self.pieces[p]) for p in self.runs(rank))
        )

    @functools.cache  # noqa: B019 (a frozen, hashable value: the cache lives with the class)
    def halo_sources(self, width: int) -> Tensor:
        """[W, R * width] int64: for halo slot j of run i of rank r (entry i * width + j),
        where global position start - width + j sits in the gathered tails: index
        (owner * R + slot) * width + p into the [W * R * width] tails, the owner's slot-th
        run's tail holding its last `width` positions right-aligned (p = position - (end -
        width)); W * R * width (a zero row) before the sequence's start.

        Every position before a piece lies within the last `width` tokens of the piece that
        holds it, even when pieces are shorter than `width`, so the tails suffice."""
        r_count = len(self.runs(0))
        starts, ends = self.starts, tuple(accumulate(self.pieces))
        zero = self.world * r_count * width
        table = torch.full((self.world, r_count * width), zero, dtype=torch.long)
        for rank in range(self.world):
            for i, piece in enumerate(self.runs(rank)):
                for j in range(width):
                    pos = starts[piece] - width + j
                    if pos < 0:
                        continue
                    q = next(q for q, e in enumerate(ends) if pos < e)
                    owner, slot = self.slot(q)
                    table[rank, i * width + j] = (
                        (owner * r_count + slot) * width + pos - (ends[q] - width)
                    )
        return table

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank must be in [0, {self.world}), got {rank}")
