"""Samples: fixed-length windows of a token stream (in memory, or a token store read by
range), synthetic recall (MQAR), and weighted mixtures of datasets."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from hyla.models.hybrid import IGNORE_INDEX


class TokenSource(Protocol):
    """A token stream read by range: an `ArrayTokens` or a `TokenStore`."""

    def __len__(self) -> int: ...

    def tokens(self, begin: int, end: int) -> np.ndarray: ...


class ArrayTokens:
    """A token stream held in memory."""

    def __init__(self, stream: np.ndarray) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream)

    def tokens(self, begin: int, end: int) -> np.ndarray:
        return self.stream[begin:end].astype(np.int64)


class SizedDataset(Protocol):
    """What the loaders read: a map-style dataset of known length."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, Tensor]: ...


class PackedSequences(Dataset):
    """Sample i: tokens [start + i L, start + (i + 1) L] of the stream (L = seq_len), as
    input_ids and the next-token labels, read from the source when asked for. With
    `eos_id`, also `doc_start`: true where a document begins (the stream's first token and
    every token after an EOS)."""

    def __init__(
        self,
        source: TokenSource | np.ndarray,
        seq_len: int,
        eos_id: int | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        self.source = ArrayTokens(source) if isinstance(source, np.ndarray) else source
        self.seq_len, self.eos_id = seq_len, eos_id
        self.start, self.stop = start, len(self.source) if stop is None else stop

    def __len__(self) -> int:
        return max(0, (self.stop - self.start - 1) // self.seq_len)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        begin = self.start + i * self.seq_len
        before = 1 if begin > 0 and self.eos_id is not None else 0
        window = torch.from_numpy(self.source.tokens(begin - before, begin + self.seq_len + 1))
        sample = {"input_ids": window[before:-1], "labels": window[before + 1 :]}
        if self.eos_id is not None:
            starts = window[:-2] == self.eos_id if before else window[:-1] == self.eos_id
            if not before:  # the stream's first token begins a document
                starts = torch.cat([torch.ones(1, dtype=torch.bool), starts[:-1]])
            sample["doc_start"] = starts
        return sample


class MQAR(Dataset):
    """Multi-query associative recall: `pairs` key-value pairs, then the keys again in a
    shuffled order; the loss is only on recalling each key's value. Keys and values come
    from disjoint token ranges. Sample i depends only on (seed, i): resumes are exact."""

    def __init__(self, seq_len: int, pairs: int, samples: int, vocab_size: int, seed: int) -> None:
        need = 4 * pairs
        if seq_len < need:
            raise ValueError(
                f"data.seq_len must be >= 4 * data.mqar_pairs = {need} for MQAR, got {seq_len}"
            )
        if vocab_size < 2 * pairs + 2:
            raise ValueError(f"MQAR needs a vocabulary of >= {2 * pairs + 2}, got {vocab_size}")
        self.seq_len, self.pairs, self.samples = seq_len, pairs, samples
        self.half, self.seed = (vocab_size - 1) // 2, seed

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        n, half = self.pairs, self.half
        keys = torch.randperm(half, generator=gen)[:n] + 1
        values = torch.randint(half + 1, 2 * half + 1, (n,), generator=gen)
        order = torch.randperm(n, generator=gen)
        ids = torch.zeros(self.seq_len + 1, dtype=torch.int64)
        ids[0 : 2 * n : 2], ids[1 : 2 * n : 2] = keys, values
        ids[2 * n : 4 * n : 2], ids[2 * n + 1 : 4 * n : 2] = keys[order], values[order]
        labels = torch.full((self.seq_len,), IGNORE_INDEX, dtype=torch.int64)
        labels[2 * n : 4 * n : 2] = values[order]  # after each repeated key, its value
        return {"input_ids": ids[:-1], "labels": labels}


class Mixture(Dataset):
    """Datasets interleaved by weight: within every period of PERIOD samples, dataset j
    gives its share of weight, placed by largest remaining deficit, so sample i of the
    mixture is a fixed function of i. A dataset drawn past its end starts over (it is
    upsampled). The mixture is as long as its datasets together."""

    PERIOD = 4096

    def __init__(self, datasets: list[SizedDataset], weights: list[float]) -> None:
        self.datasets = datasets
        total = sum(weights)
        shares = [w / total for w in weights]
        self.owner = np.zeros(self.PERIOD, dtype=np.int32)  # which dataset gives sample i
        self.rank = np.zeros(self.PERIOD, dtype=np.int64)  # its index within the period
        counts = [0] * len(datasets)
        for i in range(self.PERIOD):
            j = max(range(len(datasets)), key=lambda d: (i + 1) * shares[d] - counts[d])
            self.owner[i], self.rank[i] = j, counts[j]
            counts[j] += 1
        self.per_period = counts
        self.length = sum(len(d) for d in datasets)
        if any(c == 0 for c in counts):
            small = [w for w, c in zip(weights, counts, strict=True) if c == 0]
            raise ValueError(
                f"data.weights {list(weights)}: the weights {small} are below one sample in "
                f"{self.PERIOD}; raise them or drop those sources"
            )

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        period, within = divmod(i, self.PERIOD)
        j = int(self.owner[within])
        local = period * self.per_period[j] + int(self.rank[within])
        return self.datasets[j][local % len(self.datasets[j])]
