"""LASP-1-style ring for linear layers: the baseline LASP-2 replaces (contiguous layouts only).

Rank r waits for S(s_r) from rank r - 1, runs its piece from it and sends S(e_r) on;
backward passes dL/dS the other way: 2 (W - 1) sequential point-to-point hops per layer and
step, against LASP-2's two all-gathers. With packed segments the states passed are the
chains' (`hyla.parallel.chains`).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from hyla.kernels import ChunkCall
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
    def forward(ctx, call: ChunkCall, chains: Chains, group, *inputs):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        q, v = inputs[0], inputs[2]
        n, _, h, kd = q.shape
        chains.check(n)
        carry = q.new_zeros((chains.num_chains, h, kd, v.shape[-1]), dtype=torch.float32)
        if rank > 0:
            _p2p("recv", carry, rank - 1, group)
        state = chains.scatter_carry(carry, n)
        o, final = call.forward(state)
        if rank < world - 1:
            _p2p("send", final[chains.last], rank + 1, group)
        ctx.kernel, ctx.group, ctx.chains = call.kernel, group, chains
        ctx.save_for_backward(*inputs, state)
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
        grads, d_start = ctx.kernel.backward(tuple(inputs), state, do, d_final)
        if rank > 0:
            _p2p("send", chains.gather_carry(d_start), rank - 1, ctx.group)
        return (None, None, None, *grads)
