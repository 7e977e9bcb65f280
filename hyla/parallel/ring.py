"""LASP-1-style ring for linear layers: the baseline LASP-2 replaces.

Rank r waits for S(s_r) from rank r - 1, runs its shard from it and sends S(e_r) on;
backward passes dL/dS the other way: 2 (W - 1) sequential point-to-point hops per layer and
step, against LASP-2's two all-gathers. With packed segments the states passed are the
chains' (`hyla.parallel.chains`).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from hyla.kernels.backend import chunk_implementation, resolve_backend
from hyla.parallel.chains import Chains
from hyla.parallel.comm import TRACKER, CommRecord, remember_scope


def _p2p(op: str, tensor: Tensor, peer: int, group: dist.ProcessGroup) -> None:
    start = time.perf_counter()
    if op == "send":
        dist.send(tensor.contiguous(), group_dst=peer, group=group)
        sent = tensor.numel() * tensor.element_size()
    else:
        dist.recv(tensor, group_src=peer, group=group)
        sent = 0
    TRACKER.records.append(CommRecord(op, TRACKER.scope, sent, time.perf_counter() - start))


@remember_scope
class RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, family: str, group, scale: float, backend: str | None, chains: Chains, q, k, v, *gates
    ):
        impl = chunk_implementation(family, resolve_backend(backend, q.device))
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n, _, h, kd = q.shape
        chains.check(n)
        carry = q.new_zeros((chains.num_chains, h, kd, v.shape[-1]), dtype=torch.float32)
        if rank > 0:
            _p2p("recv", carry, rank - 1, group)
        state = chains.scatter_carry(carry, n)
        o, final = impl.forward(q, k, v, *gates, state, scale=scale)
        if rank < world - 1:
            _p2p("send", final[chains.last], rank + 1, group)
        ctx.impl, ctx.group, ctx.scale, ctx.chains = impl, group, scale, chains
        ctx.save_for_backward(q, k, v, *gates, state)
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do: Tensor):
        *inputs, state = ctx.saved_tensors
        chains = ctx.chains
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        d_end = state.new_zeros((chains.num_chains, *state.shape[1:]))
        if rank < world - 1:
            _p2p("recv", d_end, rank + 1, ctx.group)
        d_final = chains.scatter_last(d_end, state.shape[0])
        *grads, d_start = ctx.impl.backward(*inputs, state, do, d_final, scale=ctx.scale)
        if rank > 0:
            _p2p("send", chains.gather_carry(d_start), rank - 1, ctx.group)
        cast = [None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs, strict=True)]
        return (None, None, None, None, None, *cast)
