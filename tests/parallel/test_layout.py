"""Sequence layouts on their own: which tokens each rank holds, the balance of causal
attention work, the convolution halo's sources, and the errors."""

from __future__ import annotations

import pytest
import torch

from hyla.parallel import SequenceLayout


@pytest.mark.parametrize("world", range(2, 9))
@pytest.mark.parametrize("length", [16_384, 65_537, 262_144, 1_048_579])
def test_zigzag_balances_causal_attention_within_one_percent(world: int, length: int):
    """Each rank's count of causal query-key pairs, from the layout alone: zigzag within 1%
    of the others for W = 2..8 (also when 2W does not divide T); contiguous leaves the last
    rank about 2W - 1 times the first's work."""
    zigzag = SequenceLayout.even("zigzag", length, world)
    pairs = [zigzag.causal_pairs(r) for r in range(world)]
    assert sum(pairs) == length * (length + 1) // 2
    assert max(pairs) <= 1.01 * min(pairs), pairs
    contiguous = SequenceLayout.even("contiguous", length, world)
    spread = [contiguous.causal_pairs(r) for r in range(world)]
    assert spread[-1] / spread[0] == pytest.approx(2 * world - 1, rel=0.01)


def test_pieces_positions_and_shards():
    layout = SequenceLayout.zigzag([3, 1, 2, 4])  # ranks 0: pieces 0, 3; 1: pieces 1, 2
    assert layout.kind == "zigzag" and layout.length == 10
    assert layout.runs(0) == [0, 3] and layout.runs(1) == [1, 2]
    assert layout.positions(0).tolist() == [0, 1, 2, 6, 7, 8, 9]
    assert layout.positions(1).tolist() == [3, 4, 5]
    x = torch.arange(10)[None] * 10
    assert layout.shard(x, 0).tolist() == [[0, 10, 20, 60, 70, 80, 90]]
    assert [layout.offset(p) for p in range(4)] == [0, 0, 1, 3]
    assert layout.order == ((0, 0), (1, 0), (1, 1), (0, 1))
    # Every token lands on exactly one rank.
    held = torch.cat([layout.positions(r) for r in range(2)]).sort().values
    assert held.tolist() == list(range(10))


def test_even_splits():
    assert SequenceLayout.even("contiguous", 10, 3).pieces == (4, 3, 3)
    zigzag = SequenceLayout.even("zigzag", 11, 2)  # 3 extra tokens: rank 0's pair, then rank 1
    assert zigzag.pieces == (3, 3, 2, 3)
    assert [zigzag.local_length(r) for r in range(2)] == [6, 5]


def test_halo_sources_cross_short_pieces():
    """Each halo slot points at the tail slot of the piece that holds the position before
    the run, also across pieces shorter than the halo and the rank's own other piece."""
    layout = SequenceLayout.zigzag([1, 2, 1, 3])  # positions: p0 [0], p1 [1, 3), p2 [3], p3 [4, 7)
    width = 3
    table = layout.halo_sources(width)
    runs = len(layout.runs(0))

    def source(rank: int, run: int, j: int):
        index = int(table[rank, run * width + j])
        if index == layout.world * runs * width:
            return None
        slot_index, p = divmod(index, width)
        owner, slot = divmod(slot_index, runs)
        piece = layout.runs(owner)[slot]
        end = layout.starts[piece] + layout.pieces[piece]
        return end - width + p  # the global position that slot holds

    for rank in range(2):
        for run, piece in enumerate(layout.runs(rank)):
            for j in range(width):
                want = layout.starts[piece] - width + j
                assert source(rank, run, j) == (want if want >= 0 else None)


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: SequenceLayout.zigzag([1, 2, 3]), "even number of pieces"),
        (lambda: SequenceLayout.contiguous([3, 0]), r"every piece needs >= 1 token"),
        (lambda: SequenceLayout((1, 1, 1), (0, 0, 1), 2), "same number of pieces"),
        (
            lambda: SequenceLayout.even("zigzag", 7, 4),
            r"^length must be >= the 8 pieces of a zigzag layout over world = 4 ranks, got 7$",
        ),
        (
            lambda: SequenceLayout.even("spiral", 8, 2),
            r"^kind must be one of \('contiguous', 'zigzag'\), got 'spiral'$",
        ),
    ],
)
def test_bad_layouts(build, message):
    with pytest.raises(ValueError, match=message):
        build()
