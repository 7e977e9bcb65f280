"""LASP-2 for linear-recurrent layers, over the pieces of a sequence layout.

Each piece p of the sequence (`hyla.parallel.layout`) acts on the recurrent state affinely,
S(end_p) = AA_p S(start_p) + BB_p, where AA_p is the product of the piece's transitions (a
scalar, a K-vector or a K x K matrix per head) and BB_p the piece's final state from zero.
A rank holds R pieces (1 contiguous, 2 zigzag) and computes their pairs locally.

Forward: ONE all-gather of every rank's pairs (R per chain, fused into one buffer whose size
does not depend on the sequence length); each rank then folds the pairs of all pieces before
each of its own, in sequence order, into that piece's initial state, and
o = o_intra (from zero, no communication) + qhat S(start), where
qhat_t = scale (A_t ... A_1)^T q_t. For the additive and gated variants BB is one matmul, so
its all-gather overlaps the intra-piece kernel.

Backward: ONE all-gather of (AA_p, local_p) for every piece, local_p = qhat^T dO being the
gradient that the piece's own outputs send into S(start_p). Folding from the last piece
backwards, G_p = local_p + AA_p^T G_{p+1}, gives dL/dS(end_p) for each own piece, and the
unchanged kernel backward, run from S(start) with that as the final-state gradient, gives
every input gradient. A rank keeps for backward only its own pieces' transitions: the others'
arrive with the backward gather, so the memory kept does not grow with the group's size.

Packed segments (`hyla.parallel.chains`): the pairs are per chain, not per segment, so the
collectives keep their size when documents split a piece into more segments.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from hyla.kernels import (
    ChunkCall,
    apply_transition,
    apply_transition_transposed,
    initial_state_grad,
    output_from,
)
from hyla.parallel.chains import Chains
from hyla.parallel.comm import all_gather, remember_scope


def _chain_aa(aa: Tensor, chains: Chains) -> Tensor:
    """Per-segment AA -> per-chain AA: the last segment's, or 0 when the carry stops."""
    return aa[chains.last] * chains.passes.view(-1, *[1] * (aa.dim() - 1))


# (owner rank, slot among the owner's pieces) of every piece, in sequence order
Order = tuple[tuple[int, int], ...]


def _own_pieces(order: Order, rank: int) -> list[int]:
    return [piece for piece, (owner, _) in enumerate(order) if owner == rank]


def _per_piece(gathered: Tensor, widths: list[int], shapes: list[torch.Size], runs: int):
    """[W, sum(widths)] -> per buffer part, [W, R, C, *shape]."""
    return [
        part.reshape(gathered.shape[0], runs, -1, *shape)
        for part, shape in zip(gathered.split(widths, dim=1), shapes, strict=True)
    ]


@remember_scope
class Lasp2Function(torch.autograd.Function):
    """LASP-2 over one call of a kernel (module docstring); `inputs` are `call.inputs`,
    passed again so that autograd sees them. Every kernel call goes through the call's
    kernel (`hyla.kernels.ChunkKernel`), which is family-blind from here."""

    @staticmethod
    def forward(ctx, call: ChunkCall, chains: Chains, group, order: Order, *inputs):
        rank = dist.get_rank(group)
        n, runs = inputs[0].shape[0], chains.runs
        chains.check(n)
        summary = call.summary()
        chain_aa = _chain_aa(summary.aa, chains)
        buffer = torch.cat([chain_aa.flatten(), summary.bb[chains.last].flatten()])
        pending = all_gather(buffer, group, True)  # overlaps a closed-form summary's kernel
        o_intra = summary.intra_output()
        shapes = [summary.aa.shape[1:], summary.bb.shape[1:]]
        widths = [chain_aa.numel(), chains.first.numel() * summary.bb[0].numel()]
        aa_all, bb_all = _per_piece(pending.wait(), widths, shapes, runs)
        mine = _own_pieces(order, rank)
        carry = bb_all.new_zeros(bb_all.shape[2:])  # entering piece 0: nothing before it
        entering = {}
        for piece in range(max(mine) + 1):
            if piece in mine:
                entering[piece] = carry
            owner, slot = order[piece]
            carry = apply_transition(aa_all[owner, slot], carry) + bb_all[owner, slot]
        carries = torch.cat([entering[piece] for piece in mine])  # [R * C, ...], run-major
        state = chains.scatter_carry(carries, n)  # each segment's initial state
        o = output_from(o_intra, summary.qhat, state)
        ctx.kernel, ctx.group, ctx.chains, ctx.order = call.kernel, group, chains, order
        ctx.save_for_backward(*inputs, state, summary.qhat, chain_aa)
        return o.to(inputs[0].dtype)

    @staticmethod
    def backward(ctx, do: Tensor):
        *inputs, state, qhat, chain_aa = ctx.saved_tensors
        chains, order = ctx.chains, ctx.order
        local = chains.gather_carry(initial_state_grad(qhat, do))
        buffer = torch.cat([chain_aa.flatten(), local.flatten()])
        gathered = all_gather(buffer, ctx.group).wait()
        widths, shapes = [chain_aa.numel(), local.numel()], [chain_aa.shape[1:], local.shape[1:]]
        aa_all, local_all = _per_piece(gathered, widths, shapes, chains.runs)
        mine = _own_pieces(order, dist.get_rank(ctx.group))
        d_end = torch.zeros_like(local_all[0, 0])  # dL/d(state leaving the last piece)
        leaving = {}
        for piece in range(len(order) - 1, min(mine) - 1, -1):
            if piece in mine:
                leaving[piece] = d_end
            owner, slot = order[piece]
            d_end = local_all[owner, slot] + apply_transition_transposed(aa_all[owner, slot], d_end)
        d_final = chains.scatter_last(torch.cat([leaving[p] for p in mine]), state.shape[0])
        grads, _ = ctx.kernel.backward(tuple(inputs), state, do, d_final)
        return (None, None, None, None, *grads)
