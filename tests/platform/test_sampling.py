"""The run's sample stream: the same samples at every step for any split of the global batch
over dp ranks, micro-batches and batch size."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hyla.platform.sampling import RankSampler, SampleStream


def _steps(size: int, dp: int, batch: int, accum: int, steps: int, start: int = 0):
    """[step] -> sorted sample indices read by all ranks in that step."""
    stream = SampleStream(size, shuffle=True, seed=5)
    per_rank = batch * accum
    reads = []
    for rank in range(dp):
        sampler = RankSampler(
            stream, dp=dp, rank=rank, batch_size=batch, grad_accum=accum, start=start
        )
        reads.append(list(itertools.islice(iter(sampler), per_rank * steps)))
    return [
        sorted(i for rank in reads for i in rank[s * per_rank : (s + 1) * per_rank])
        for s in range(steps)
    ]


@pytest.mark.parametrize("dp,batch,accum", [(1, 8, 1), (2, 4, 1), (4, 1, 2), (8, 1, 1), (1, 2, 4)])
def test_every_split_of_a_global_batch_reads_the_same_samples(dp, batch, accum):
    """Global batch 8 over 30 samples: 12 steps cross 3 epoch boundaries."""
    assert _steps(30, dp, batch, accum, 12) == _steps(30, 2, 2, 2, 12)


def test_a_resume_reads_on_from_the_position():
    whole = _steps(30, 2, 2, 2, 12)
    assert _steps(30, 4, 2, 1, 7, start=5 * 8) == whole[5:]


def test_epochs_are_permutations_of_the_data():
    stream = SampleStream(10, shuffle=True, seed=0)
    first, second = stream.take(0, 10), stream.take(10, 10)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert SampleStream(10, shuffle=False, seed=0).take(7, 6) == [7, 8, 9, 0, 1, 2]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 17, 1000, 4097])
def test_a_shuffled_epoch_is_a_permutation_at_any_size(size):
    """Sizes just above and below powers of 2 and 4 exercise the Feistel network's odd bit
    split and the cycle walk."""
    stream = SampleStream(size, shuffle=True, seed=7)
    for epoch in range(3):
        assert sorted(stream.take(epoch * size, size)) == list(range(size))


def test_shuffled_order_is_unrelated_to_position_and_keyed_by_seed_and_epoch():
    """For a uniformly random permutation of n = 20,000, the correlation of position and
    index has standard deviation 1 / sqrt(n - 1) = 0.007: 0.05 is 7 of them. Two epochs or
    two seeds agree at about one position in n by chance."""
    n = 20_000
    orders = [
        SampleStream(n, True, seed).take(epoch * n, n) for seed, epoch in ((0, 0), (0, 1), (1, 0))
    ]
    for order in orders:
        assert abs(np.corrcoef(np.arange(n), order)[0, 1]) < 0.05
    for a, b in itertools.combinations(orders, 2):
        assert np.count_nonzero(np.array(a) == np.array(b)) < 20


def test_the_stream_holds_no_per_sample_state():
    """A hundred billion samples: the order of any position is computed, not stored."""
    stream = SampleStream(10**11, shuffle=True, seed=3)
    read = stream.take(10**12 + 5, 1000)
    assert len(set(read)) == 1000 and all(0 <= i < 10**11 for i in read)
    assert all(not isinstance(v, np.ndarray) for v in vars(stream).values())
