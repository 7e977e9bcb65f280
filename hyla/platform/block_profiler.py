"""Counting what one block of each mixer stores, per token, by running it: the measurement the
memory model (`hyla.platform.memory_plan`) builds its activation terms on.

`profile_blocks` runs one real block of each mixer letter forward and backward on CPU at two
short lengths, recording what it saves for backward (`saved_tensors_hooks`) and, through a
`TorchDispatchMode`, the bytes of every storage alive after each op (inside hyla's kernels
too, which are custom ops that a mode would otherwise see as one call). The slopes between
the two lengths are bytes per token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from hyla.kernels import python_implementation
from hyla.kernels.chunking import CHUNK
from hyla.models import WholeSequence
from hyla.models.config import ModelConfig
from hyla.platform.config import PRECISIONS

# Probe lengths for counting saved bytes per token: chunk multiples, so no padding.
PROBE_LENGTHS = (CHUNK, 2 * CHUNK)


@dataclass(frozen=True)
class BlockProfile:
    """Per mixer letter, bytes per token of one block: what it saves for backward (its input
    excluded) and the peak of everything alive during its forward and backward."""

    saved: dict[str, float]
    peak: dict[str, float]


class _LiveBytes(TorchDispatchMode):
    """Records, after every op, which storages that ops created are still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.alive: dict[int, tuple[StorageWeakRef, int]] = {}  # storage key -> (ref, uid)
        self.sizes: list[int] = []  # bytes of each storage, by uid
        self.timeline: list[list[int]] = []  # uids alive after each op

    def __torch_dispatch__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        inside = python_implementation(func)
        if inside is not None:  # one of hyla's kernels: record its own temporaries too
            with self:
                return inside(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        self.alive = {k: v for k, v in self.alive.items() if not v[0].expired()}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.alive:
                storage = t.untyped_storage()
                self.alive[storage._cdata] = (StorageWeakRef(storage), len(self.sizes))
                self.sizes.append(storage.nbytes())
        self.timeline.append([uid for _, uid in self.alive.values()])
        return out

    def peak(self, exclude: list[torch.Tensor]) -> int:
        """The most bytes alive at once, leaving out the storages of `exclude` (tensors
        still alive now)."""
        keys = {t.untyped_storage()._cdata for t in exclude}
        skip = {uid for key, (_, uid) in self.alive.items() if key in keys}
        return max(sum(self.sizes[u] for u in uids if u not in skip) for uids in self.timeline)


def _measure_block(
    block: torch.nn.Module, d_model: int, length: int, bf16: bool
) -> tuple[int, int]:
    """(bytes of the distinct storages one forward saves for backward, peak bytes alive
    during forward + backward); parameters, their gradients and the block input excluded
    (they do not grow with the length, and parameter gradients fill in while backward
    runs, so at short probe lengths they would decide when the peak falls)."""
    skip = {p.untyped_storage().data_ptr() for p in block.parameters()}
    x = torch.randn(1, length, d_model, requires_grad=True)
    skip.add(x.untyped_storage().data_ptr())
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    grad = torch.randn(1, length, d_model)
    with _LiveBytes() as live:
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            torch.autocast("cpu", torch.bfloat16, enabled=bf16),
        ):
            out, _ = block(x, WholeSequence().context(x.new_zeros(1, length).long(), None))
        out.backward(grad)
    peak = live.peak([p.grad for p in block.parameters() if p.grad is not None])
    block.zero_grad(set_to_none=True)
    return sum(storages.values()), peak


_PROFILES: dict[tuple, BlockProfile] = {}


# fields that do not change what one block stores
_NOT_IN_BLOCKS = ("name", "seed", "activation_checkpointing", "loss_chunk_size", "vocab_size")


def _config_key(cfg: ModelConfig) -> tuple:
    fields = dataclasses.asdict(cfg)
    return tuple(
        (k, tuple(v) if isinstance(v, list) else v)
        for k, v in fields.items()
        if k not in _NOT_IN_BLOCKS
    )


def profile_blocks(cfg: ModelConfig, precision: str) -> BlockProfile:
    """Count each letter's bytes per token by running one real block on CPU at two short
    lengths (the slope between them; what does not grow with T, such as parameter gradients
    and autocast's weight copies, cancels). Cached per config and precision.

    Peaks are those of the PyTorch chunkwise kernels; the Triton kernels keep fewer
    intermediates, so on a GPU the prediction errs high. Routers are zeroed so that
    Mixture-of-Memories routes deterministically (ties pick the first memories): the padded
    layout is the same as with any routing, as the shared memory's row spans the sequence."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    key = (_config_key(cfg), precision)
    if key not in _PROFILES:
        from hyla.models.hybrid import Block

        saved, peak = {}, {}
        short, long = PROBE_LENGTHS
        for letter in dict.fromkeys(cfg.pattern):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                block = Block(cfg, letter)
            with torch.no_grad():
                for name, module in block.named_modules():
                    if name.endswith("router"):
                        module.weight.zero_()
            bf16 = precision == "bf16"
            (s0, p0), (s1, p1) = (
                _measure_block(block, cfg.d_model, t, bf16) for t in (short, long)
            )
            saved[letter], peak[letter] = (s1 - s0) / (long - short), (p1 - p0) / (long - short)
        _PROFILES[key] = BlockProfile(saved, peak)
    return _PROFILES[key]
