"""Run a function on W real gloo processes (spawned, rendezvous through a file store)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, store: str, fn: Callable, args: tuple) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world: int, tmp_path: Path, *args) -> None:
    """fn(rank, world, *args) on `world` processes; raises if any of them fails."""
    store = tmp_path / f"store-{world}"
    mp.spawn(_entry, args=(world, str(store), fn, args), nprocs=world, join=True)


def even_split(total: int, world: int) -> list[int]:
    """Unequal shard lengths on purpose: the first ranks get one token more, and ragged
    against every chunk size."""
    base, extra = divmod(total, world)
    return [base + (r < extra) for r in range(world)]


def whole_sequence(layout, parts: list, dim: int = 1):
    """The ranks' local tensors (each its pieces in sequence order) -> the whole sequence."""
    import torch

    pieces = []
    for piece, n in enumerate(layout.pieces):
        owner, offset = layout.owners[piece], layout.offset(piece)
        pieces.append(parts[owner].narrow(dim, offset, n))
    return torch.cat(pieces, dim=dim)
