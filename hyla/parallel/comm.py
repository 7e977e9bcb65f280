"""Collectives used by sequence parallelism, and their accounting.

Every collective goes through here, so the tracker sees each one: its kind, the layer that
issued it (`comm_scope`), the bytes this rank sends, and the seconds this rank spent blocked
in it (issuing it, and waiting for it: an asynchronous all-gather's overlap with compute is
not counted). Bytes sent per rank assume the direct algorithm: an all-gather sends the local
buffer to each of the W - 1 others; a reduce-scatter and an all-to-all send (W - 1) / W of
their input; a point-to-point send sends its buffer once.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class CommRecord:
    op: str
    scope: str
    bytes_sent: int
    seconds: float


@dataclass
class CommTracker:
    records: list[CommRecord] = field(default_factory=list)
    scope: str = "-"

    def reset(self) -> None:
        self.records.clear()

    def summary(self, by_scope: bool = False) -> dict[str, dict[str, float]]:
        """{op: {count, bytes, seconds}} over the records so far; keys are "scope/op"
        (e.g. "layer3.A/all_gather") with by_scope."""
        out: dict[str, dict[str, float]] = defaultdict(
            lambda: {"count": 0, "bytes": 0, "seconds": 0.0}
        )
        for r in self.records:
            entry = out[f"{r.scope}/{r.op}" if by_scope else r.op]
            entry["count"] += 1
            entry["bytes"] += r.bytes_sent
            entry["seconds"] += r.seconds
        return dict(out)


TRACKER = CommTracker()


@contextmanager
def comm_scope(name: str) -> Iterator[None]:
    """Attribute the collectives issued inside to `name` (e.g. a layer)."""
    previous, TRACKER.scope = TRACKER.scope, name
    try:
        yield
    finally:
        TRACKER.scope = previous


def remember_scope(function: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Class decorator for autograd Functions that communicate: the collectives of their
    backward are attributed to the scope their forward ran in."""
    forward, backward = function.forward, function.backward

    def scoped_forward(ctx, *args):
        ctx.comm_scope = TRACKER.scope
        return forward(ctx, *args)

    def scoped_backward(ctx, *grads):
        with comm_scope(ctx.comm_scope):
            return backward(ctx, *grads)

    # wrapping the Function's static methods in place is the point of this decorator
    function.forward, function.backward = (  # type: ignore[method-assign]
        staticmethod(scoped_forward),
        staticmethod(scoped_backward),
    )
    return function


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class PendingGather:
    """An all-gather in flight; `wait()` returns the [W, *shape] result."""

    def __init__(self, out: Tensor, handle, shape: torch.Size, sent: int, issued: float) -> None:
        self._out, self._handle, self._shape = out, handle, shape
        self._sent, self._issued, self._scope = sent, issued, TRACKER.scope

    def wait(self) -> Tensor:
        start = time.perf_counter()
        if self._handle is not None:
            self._handle.wait()
        blocked = self._issued + time.perf_counter() - start
        TRACKER.records.append(CommRecord("all_gather", self._scope, self._sent, blocked))
        return self._out.view(-1, *self._shape)


def all_gather(tensor: Tensor, group: dist.ProcessGroup, async_op: bool = False) -> PendingGather:
    """Gather equal-shaped tensors from every rank of `group` in rank order."""
    world = dist.get_world_size(group)
    local = tensor.contiguous()
    out = local.new_empty((world * local.numel(),))
    start = time.perf_counter()
    handle = dist.all_gather_single(out, local.view(-1), group=group, async_op=async_op)
    issued = time.perf_counter() - start
    return PendingGather(out, handle, local.shape, _nbytes(local) * (world - 1), issued)


def reduce_scatter(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum [W, *shape] over ranks; rank r keeps slot r."""
    world = dist.get_world_size(group)
    full = tensor.contiguous()
    out = full.new_empty(full.shape[1:])
    start = time.perf_counter()
    dist.reduce_scatter_single(out.view(-1), full.view(-1), group=group)
    sent = _nbytes(full) * (world - 1) // world
    TRACKER.records.append(
        CommRecord("reduce_scatter", TRACKER.scope, sent, time.perf_counter() - start)
    )
    return out


def all_reduce(tensor: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum over the group, in place; returns the tensor."""
    world = dist.get_world_size(group)
    start = time.perf_counter()
    dist.all_reduce(tensor, group=group)
    sent = 2 * _nbytes(tensor) * (world - 1) // world
    TRACKER.records.append(
        CommRecord("all_reduce", TRACKER.scope, sent, time.perf_counter() - start)
    )
    return tensor
