"""Sequence-parallel linear-recurrent ops: this rank's part of the sequence in, its output
out, autograd-correct, for any group size, any layout and pieces of >= 1 token.

`lasp2_*` are LASP-2 (`hyla.parallel.lasp2`); `lasp1_*` the LASP-1-style ring baseline
(`hyla.parallel.ring`, contiguous layouts only), same interface. The local inputs are the
rank's pieces concatenated in sequence order, [B, T_r, ...]. With `cu_seqlens` they are
packed instead, [1, N, ...], and packed sequence r * (S / R) + i holds the rank's r-th piece
of sequence i (S packed sequences, R pieces per rank); sequence i of one piece continues
sequence i of the piece before it.

`split_recurrence` also cuts at document starts and runs grouped tokens (Mixture-of-Memories'
memories); it checks its group, layout and method, and `recurrence_over` is the same on
arguments checked before, which the model-level context (`hyla.parallel.context`) calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from hyla.kernels import (
    ChunkCall,
    GroupedTokens,
    Segmentation,
    chunk_gated_delta_rule,
    chunk_gla,
    chunk_linear_attn,
    prepare_chunk,
)
from hyla.parallel.chains import Chains
from hyla.parallel.lasp2 import Lasp2Function, Order
from hyla.parallel.layout import SequenceLayout
from hyla.parallel.ring import RingFunction
from hyla.parallel.support import ArgumentError, check_split

RECURRENCE_METHODS = ("lasp2", "lasp1")  # Ulysses has none of its own: it runs whole layers


def _runs_per_rank(order: Order) -> int:
    return sum(owner == 0 for owner, _ in order)


def run_chains(method: str, call: ChunkCall, chains: Chains, group, order: Order) -> Tensor:
    """`call` over a split sequence whose local segments continue along `chains`: the output
    in the caller's layout. method: "lasp2" or "lasp1" (the ring), checked by the caller."""
    if method == "lasp2":
        o = Lasp2Function.apply(call, chains, group, order, *call.inputs)
    else:
        o = RingFunction.apply(call, chains, group, *call.inputs)
    return call.unpad(o)


@dataclass(frozen=True)
class RunCuts:
    """How a rank's local rows [B, T_r] are cut: at its runs (pieces) and document starts,
    and whether each run's first segment continues the piece before it."""

    segmentation: Segmentation
    carry_in: Tensor  # [B, R] bool

    @classmethod
    def build(
        cls, runs: list[int], starts: Tensor | None, batch: int, device: torch.device
    ) -> RunCuts:
        segmentation = Segmentation.build(runs, starts, batch, device)
        if starts is None:
            carry_in = torch.ones(batch, len(runs), dtype=torch.bool, device=device)
        else:
            first_token = torch.tensor([0, *runs[:-1]], device=device).cumsum(0)
            carry_in = ~starts[:, first_token]
        return cls(segmentation, carry_in)


def _one_row(x: Tensor) -> Tensor:
    """Rows [B, T, ...] -> one packed row [1, B * T, ...]; a constant [H] gate stays as it is."""
    return x if x.dim() == 1 else x.flatten(0, 1)[None]


def split_recurrence(
    method: str,
    op: Callable,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *gates: Tensor | None,
    group: dist.ProcessGroup,
    layout: SequenceLayout | None = None,
    cuts: RunCuts | None = None,
    tokens: GroupedTokens | None = None,
    cu_seqlens: Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """`op` (a hyla.kernels chunk op) over a sequence split by `layout` (None: one piece per
    rank, in rank order), on this rank's local rows [B, T_r, ...]; or on packed tokens
    [1, N, ...]: grouped tokens of the rows (`tokens`, cut as the rows are), or sequences
    packed by the caller (`cu_seqlens`, see the module docstring). cuts: the local rows'
    `RunCuts`, built here (at the runs only) when not given.

    The door for callers with a bare group and layout: it checks them and the method (lasp2
    or lasp1) first. A `SequenceParallel`, checked when it was built, calls
    `recurrence_over` directly."""
    world = check_split(method, group, layout)
    if method not in RECURRENCE_METHODS:
        raise ArgumentError(
            "{method} must be one of {allowed} for a recurrence op, got {got!r} (Ulysses runs "
            "whole layers: use it through SequenceParallel)",
            allowed=RECURRENCE_METHODS,
            got=method,
        )
    order = tuple((r, 0) for r in range(world))
    if layout is not None:
        order = layout.order
        needs_cuts = tokens is not None or len(layout.runs(0)) > 1
        if cuts is None and cu_seqlens is None and needs_cuts:
            batch = q.shape[0] if tokens is None else tokens.batch
            cuts = RunCuts.build(layout.run_lengths(dist.get_rank(group)), None, batch, q.device)
    elif tokens is not None and cuts is None:
        raise ArgumentError("{tokens} need the {layout} or the {cuts} of their rows")
    return recurrence_over(
        method,
        group,
        order,
        op,
        q,
        k,
        v,
        *gates,
        cuts=cuts,
        tokens=tokens,
        cu_seqlens=cu_seqlens,
        scale=scale,
        backend=backend,
    )


def recurrence_over(
    method: str,
    group: dist.ProcessGroup,
    order: Order,
    op: Callable,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *gates: Tensor | None,
    cuts: RunCuts | None = None,
    tokens: GroupedTokens | None = None,
    cu_seqlens: Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """`split_recurrence` on checked arguments: the pieces in sequence `order`, and the
    rows' cuts whenever they hold more than one run or `tokens` are given."""
    if cu_seqlens is not None:
        call = prepare_chunk(
            op, q, k, v, *gates, scale=scale, cu_seqlens=cu_seqlens, backend=backend
        )
        sequences = cu_seqlens.numel() - 1  # the rows of the padded batch
        chains = Chains.one_per_segment(sequences, _runs_per_rank(order), q.device)
        return run_chains(method, call, chains, group, order)
    if cuts is None:
        call = prepare_chunk(op, q, k, v, *gates, scale=scale, backend=backend)
        chains = Chains.one_per_segment(q.shape[0], 1, q.device)
        return run_chains(method, call, chains, group, order)
    batch = q.shape[0] if tokens is None else tokens.batch
    length = cuts.segmentation.seg_in_row.shape[1]
    packed = tokens or GroupedTokens.every_token(batch, length, q.device)
    cu, first, count = cuts.segmentation.pack(packed)
    if tokens is None:
        q, k, v = _one_row(q), _one_row(k), _one_row(v)
        gates = tuple(None if x is None else _one_row(x) for x in gates)
    call = prepare_chunk(op, q, k, v, *gates, scale=scale, cu_seqlens=cu, backend=backend)
    o = run_chains(method, call, Chains.from_runs(first, count, cuts.carry_in), group, order)
    return o if tokens is not None else o[0].unflatten(0, (batch, length))


def lasp2_linear_attn(q, k, v, g=None, **kwargs) -> Tensor:
    """LASP-2 `chunk_linear_attn` (g: None, [H] or [B, T_r, H]); keywords: group, layout,
    scale, cu_seqlens, backend, as `split_recurrence` takes them."""
    return split_recurrence("lasp2", chunk_linear_attn, q, k, v, g, **kwargs)


def lasp2_gla(q, k, v, gk, **kwargs) -> Tensor:
    """LASP-2 `chunk_gla`; keywords as `lasp2_linear_attn`."""
    return split_recurrence("lasp2", chunk_gla, q, k, v, gk, **kwargs)


def lasp2_gated_delta_rule(q, k, v, beta, g=None, **kwargs) -> Tensor:
    """LASP-2 `chunk_gated_delta_rule`; keywords as `lasp2_linear_attn`."""
    return split_recurrence("lasp2", chunk_gated_delta_rule, q, k, v, beta, g, **kwargs)


def lasp1_linear_attn(q, k, v, g=None, **kwargs) -> Tensor:
    """LASP-1 ring baseline of `lasp2_linear_attn` (contiguous layouts only)."""
    return split_recurrence("lasp1", chunk_linear_attn, q, k, v, g, **kwargs)


def lasp1_gla(q, k, v, gk, **kwargs) -> Tensor:
    """LASP-1 ring baseline of `lasp2_gla` (contiguous layouts only)."""
    return split_recurrence("lasp1", chunk_gla, q, k, v, gk, **kwargs)


def lasp1_gated_delta_rule(q, k, v, beta, g=None, **kwargs) -> Tensor:
    """LASP-1 ring baseline of `lasp2_gated_delta_rule` (contiguous layouts only)."""
    return split_recurrence("lasp1", chunk_gated_delta_rule, q, k, v, beta, g, **kwargs)
