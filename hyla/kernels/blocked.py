"""The PyTorch chunk paths run block by block, so that their working set stays in cache.

A chunkwise op does a few 64 x 64 matmuls per chunk and head. Batched over a whole span
at once ([B, H, N, C, C] scores, [B, H, N, K, V] states) every operand is tens of
megabytes: each matmul and each elementwise step streams it through main memory, and a
CPU then runs at its memory bandwidth, a small fraction of its matmul rate. Here the
tokens run in blocks of a few chunks (all heads, a group of batch rows), in order, with
the recurrent state carried from block to block (the same math: docs/design.md §1). A
block's inputs are copied once into the chunk layout [rows, H, n, CHUNK, ...] (fp32), its
temporaries are small enough to stay in the core's cache, and its results are copied
once into the token layout [B, T, H, ...].

Blocks of different batch rows or heads are independent. On CPU they run on a small pool
of Python threads, one per intra-op thread torch would use, each running torch with one
intra-op thread: a chain of small ops then never waits at a parallel region's barrier
(on a loaded machine such a wait can cost a scheduler time slice per op), and the ops
release the GIL while they compute.

A family supplies three functions on chunk-layout blocks (inputs None stay None):

    forward(*xs, state, scale) -> (o, state after the block)
    final_state(*xs, state) -> the state after the block (q and do are not needed)
    backward(*xs, state, do, dstate, scale) -> (*grads, dstate entering the block)

`state` is None for a zero state, and `grads` holds one chunk-layout tensor (or None) per
input. Backward walks the blocks twice: forward for the state entering each block, then
in reverse for the gradients.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from hyla.kernels.chunking import CHUNK, num_chunks

BLOCK_CHUNK_HEADS = 64  # chunk x head pairs per block: 1 MB per [.., C, 64] fp32 operand

Range = tuple[int, int]


@dataclass(frozen=True)
class Group:
    """Batch rows and heads whose tokens run block by block in order, the state carried."""

    rows: Range
    heads: Range
    spans: list[Range]  # token ranges of its blocks: whole chunks except the last

    def state(self, x: Tensor | None) -> Tensor | None:
        """This group's part of a state [B, H, K, V] (None stays None)."""
        return None if x is None else x[self.rows[0] : self.rows[1], self.heads[0] : self.heads[1]]

    def gather(self, x: Tensor | None, tokens: Range) -> Tensor | None:
        """This group's tokens of x [B, T, H, *rest] -> fp32 [rows, heads, n, CHUNK, *rest],
        zero padded to whole chunks (zero keys, values, betas and log-gates are identity
        steps)."""
        if x is None:
            return None
        part = x[self.rows[0] : self.rows[1], tokens[0] : tokens[1], self.heads[0] : self.heads[1]]
        r, t, h, *rest = part.shape
        n = num_chunks(t)
        if t == n * CHUNK:
            out = torch.empty((r, h, n, CHUNK, *rest), dtype=torch.float32, device=x.device)
            return out.copy_(part.unflatten(1, (n, CHUNK)).movedim(3, 1))
        out = part.new_zeros((r, h, n * CHUNK, *rest), dtype=torch.float32)
        out[:, :, :t] = part.transpose(1, 2)
        return out.unflatten(2, (n, CHUNK))

    def scatter(self, out: Tensor, x: Tensor, tokens: Range) -> None:
        """Write a chunk-layout block [rows, heads, n, CHUNK, *rest] into out [B, T, H, *rest]."""
        view = out[
            self.rows[0] : self.rows[1], tokens[0] : tokens[1], self.heads[0] : self.heads[1]
        ]
        view.copy_(x.flatten(2, 3)[:, :, : tokens[1] - tokens[0]].transpose(1, 2))


def _split(n: int, parts: int) -> list[Range]:
    """range(n) in `parts` (at most n) near-equal contiguous ranges."""
    parts = max(1, min(n, parts))
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]


def _groups(b: int, t: int, h: int, workers: int) -> list[Group]:
    """At least `workers` groups where the shape allows, each of about BLOCK_CHUNK_HEADS
    chunk x head pairs per block: rows split first, then heads."""
    row_parts = max(workers, -(-b * h // BLOCK_CHUNK_HEADS))
    head_parts = 1 if b >= workers else -(-workers // b)
    groups = []
    for rows in _split(b, row_parts):
        for heads in _split(h, head_parts):
            pairs = (rows[1] - rows[0]) * (heads[1] - heads[0])
            span = CHUNK * max(1, min(num_chunks(t), BLOCK_CHUNK_HEADS // pairs))
            groups.append(Group(rows, heads, [(s, min(s + span, t)) for s in range(0, t, span)]))
    return groups


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (threads, pool)
_POOL_LOCK = threading.Lock()


def _forget_pool() -> None:
    """In a forked child (a DataLoader worker): the parent's pool threads do not exist."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _run(groups: list[Group], work: Callable[[Group], None], device: torch.device) -> None:
    """work(group) for every group: on CPU spread over a pool of torch.get_num_threads()
    Python threads with one intra-op thread each, else (or when another call holds the
    pool, or torch uses one thread) in order on this thread."""
    global _POOL
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2 or len(groups) < 2 or not _POOL_LOCK.acquire(False):
        for group in groups:
            work(group)
        return
    grad = torch.is_grad_enabled()

    def run_share(share: list[Group]) -> None:
        with torch.set_grad_enabled(grad):
            for group in share:
                work(group)

    try:
        if _POOL is None or _POOL[0] != threads:
            _POOL = (threads, ThreadPoolExecutor(threads, thread_name_prefix="hyla-blocks"))
        pool = _POOL[1]
        torch.set_num_threads(1)
        try:
            shares = [groups[i::threads] for i in range(threads)]
            for future in [pool.submit(run_share, share) for share in shares if share]:
                future.result()
        finally:
            torch.set_num_threads(threads)
    finally:
        _POOL_LOCK.release()


def _store(out: Tensor | None, state: Tensor | None) -> None:
    assert out is not None and state is not None  # every group has a block
    out.copy_(state)


def _zeros_state(q: Tensor, v: Tensor) -> Tensor:
    b, _, h, kd = q.shape
    return q.new_zeros((b, h, kd, v.shape[-1]), dtype=torch.float32)


def _plan(per_token: Sequence[Tensor | None]) -> tuple[Tensor, Tensor, list[Group]]:
    q, v = per_token[0], per_token[2]
    assert q is not None and v is not None  # q, k and v are always given
    b, t, h, _ = q.shape
    return q, v, _groups(b, t, h, torch.get_num_threads() if q.device.type == "cpu" else 1)


def forward(
    block_forward: Callable[..., tuple[Tensor, Tensor]],
    per_token: Sequence[Tensor | None],
    state: Tensor | None,
    *,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """(o [B, T, H, V] fp32, final state [B, H, K, V]) of per-token inputs (q, k, v, ...)."""
    q, v, groups = _plan(per_token)
    o = v.new_empty(v.shape, dtype=torch.float32)
    final = _zeros_state(q, v)

    def work(group: Group) -> None:
        s = group.state(state)
        for tokens in group.spans:
            o_block, s = block_forward(
                *(group.gather(x, tokens) for x in per_token), s, scale=scale
            )
            group.scatter(o, o_block, tokens)
        _store(group.state(final), s)

    _run(groups, work, q.device)
    return o, final


def _state_inputs(
    group: Group, per_token: Sequence[Tensor | None], tokens: Range, needed: Sequence[int]
) -> list[Tensor | None]:
    return [group.gather(x, tokens) if i in needed else None for i, x in enumerate(per_token)]


def final_state(
    block_state: Callable[..., Tensor],
    per_token: Sequence[Tensor | None],
    state: Tensor | None,
    *,
    needed: Sequence[int],
) -> Tensor:
    """The state after all tokens, from the inputs at indices `needed` (others pass None)."""
    q, v, groups = _plan(per_token)
    final = _zeros_state(q, v)

    def work(group: Group) -> None:
        s = group.state(state)
        for tokens in group.spans:
            s = block_state(*_state_inputs(group, per_token, tokens, needed), s)
        _store(group.state(final), s)

    _run(groups, work, q.device)
    return final


def final_state_function(
    block_state: Callable[..., Tensor], needed: Sequence[int]
) -> Callable[..., Tensor]:
    """A family's `final_state(*per_token, initial_state, scale=...)`: the state after the
    tokens, as its forward returns it, without computing the output."""

    def run(*inputs: Tensor | None, scale: float) -> Tensor:
        del scale  # the state does not depend on it
        *per_token, initial_state = inputs
        return final_state(block_state, per_token, initial_state, needed=needed)

    return run


def backward(
    block_state: Callable[..., Tensor],
    block_backward: Callable[..., tuple[Tensor | None, ...]],
    per_token: Sequence[Tensor | None],
    initial_state: Tensor | None,
    do: Tensor,
    dfinal: Tensor,
    *,
    scale: float,
    needed: Sequence[int],
) -> tuple[list[Tensor | None], Tensor]:
    """(fp32 gradient [B, T, H, ...] of each per-token input or None, gradient of the
    initial state); `needed` as in `final_state`."""
    q, _, groups = _plan(per_token)
    grads = [None if x is None else x.new_empty(x.shape, dtype=torch.float32) for x in per_token]
    dinitial = torch.empty_like(dfinal)

    def work(group: Group) -> None:
        entering, s = [], group.state(initial_state)
        for tokens in group.spans[:-1]:
            entering.append(s)
            s = block_state(*_state_inputs(group, per_token, tokens, needed), s)
        entering.append(s)
        ds = group.state(dfinal)
        for tokens, s in zip(reversed(group.spans), reversed(entering), strict=True):
            xs = [group.gather(x, tokens) for x in per_token]
            *block_grads, ds = block_backward(*xs, s, group.gather(do, tokens), ds, scale=scale)
            for out, g in zip(grads, block_grads, strict=True):
                if out is not None:
                    assert g is not None  # a gradient for every given input
                    group.scatter(out, g, tokens)
        _store(group.state(dinitial), ds)

    _run(groups, work, q.device)
    return grads, dinitial
