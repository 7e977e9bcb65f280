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

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from hyla.kernels import ChunkCall
from hyla.parallel.chains import Chains
from hyla.parallel.comm import all_gather, remember_scope


def apply_transition(aa: Tensor, s: Tensor) -> Tensor:
    """AA S for AA of shape [N, H] (scalar), [N, H, K] (diagonal) or [N, H, K, K]."""
    if aa.dim() == 2:
        return aa[..., None, None] * s
    if aa.dim() == 3:
        return aa[..., None] * s
    return aa @ s


def apply_transition_transposed(aa: Tensor, g: Tensor) -> Tensor:
    """AA^T G: the backward counterpart of `apply_transition`."""
    return aa.transpose(-1, -2) @ g if aa.dim() == 4 else apply_transition(aa, g)


@dataclass
class PieceSummary:
    """What the local segments contribute: their transitions, states from zero, zero-state
    outputs, and qhat (the map from the initial state to the output: o = o_intra + qhat S)."""

    aa: Tensor
    bb: Tensor
    o_intra: Tensor
    qhat: Tensor


def _chain_aa(aa: Tensor, chains: Chains) -> Tensor:
    """Per-segment AA -> per-chain AA: the last segment's, or 0 when the carry stops."""
    return aa[chains.last] * chains.passes.view(-1, *[1] * (aa.dim() - 1))


def _gated_summary(call: ChunkCall, chains: Chains, group: dist.ProcessGroup):
    """Scalar-gated and GLA pieces: AA and BB in closed form, gathered while the intra-piece
    kernel runs. The log-decay input: None, [N, L, H] or [N, L, H, K]."""
    q, k, v, log_decay = call.inputs
    assert q is not None and k is not None and v is not None  # only gates may be None
    qf, kf, vf, scale = q.float(), k.float(), v.float(), call.scale
    if log_decay is None:
        n, _, h, _ = q.shape
        aa = q.new_ones((n, h), dtype=torch.float32)
        k_to_end, qhat = kf, scale * qf
    else:
        cum = log_decay.cumsum(1)
        total = cum[:, -1]
        aa = torch.exp(total)
        expand = (lambda x: x[..., None]) if log_decay.dim() == 3 else (lambda x: x)
        k_to_end = kf * expand(torch.exp(total[:, None] - cum))
        qhat = scale * qf * expand(torch.exp(cum))
    bb = torch.einsum("bthk,bthv->bhkv", k_to_end, vf)
    chain_aa = _chain_aa(aa, chains)
    pending = all_gather(torch.cat([chain_aa.flatten(), bb[chains.last].flatten()]), group, True)
    o_intra, _ = call.impl.forward(q, k, v, log_decay, None, scale=scale)
    return pending, PieceSummary(aa, bb, o_intra, qhat), chain_aa


def _delta_summary(call: ChunkCall) -> PieceSummary:
    """Gated delta rule: the state's columns evolve independently, so one kernel run with
    values [0 | v] from the initial state [I | 0] yields [AA | BB] as its final state and
    [qhat | o_intra] as its output."""
    q, k, v, beta, g = call.inputs
    assert q is not None and k is not None and v is not None  # only gates may be None
    n, t, h, kd = k.shape
    eye = torch.eye(kd, device=k.device, dtype=torch.float32).expand(n, h, kd, kd)
    init = torch.cat([eye, eye.new_zeros(n, h, kd, v.shape[-1])], dim=-1)
    values = torch.cat([v.new_zeros(n, t, h, kd), v], dim=-1)
    out, final = call.impl.forward(q, k, values, beta, g, init, scale=call.scale)
    return PieceSummary(final[..., :kd], final[..., kd:], out[..., kd:], out[..., :kd].float())


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
    @staticmethod
    def forward(ctx, call: ChunkCall, chains: Chains, group, order: Order, *inputs):
        rank = dist.get_rank(group)
        n, runs = inputs[0].shape[0], chains.runs
        chains.check(n)
        if call.family == "gated_delta_rule":
            summary = _delta_summary(call)
            chain_aa = _chain_aa(summary.aa, chains)
            buffer = torch.cat([chain_aa.flatten(), summary.bb[chains.last].flatten()])
            pending = all_gather(buffer, group)
        else:
            pending, summary, chain_aa = _gated_summary(call, chains, group)
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
        o = summary.o_intra + torch.einsum("bthk,bhkv->bthv", summary.qhat, state)
        ctx.call, ctx.group, ctx.chains, ctx.order = call, group, chains, order
        ctx.save_for_backward(*inputs, state, summary.qhat, chain_aa)
        return o.to(inputs[0].dtype)

    @staticmethod
    def backward(ctx, do: Tensor):
        *inputs, state, qhat, chain_aa = ctx.saved_tensors
        chains, order, call = ctx.chains, ctx.order, ctx.call
        local = chains.gather_carry(torch.einsum("bthk,bthv->bhkv", qhat, do.float()))
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
        grads = call.impl.backward(*inputs, state, do, d_final, scale=call.scale)
        cast = [
            None if g is None else g.to(x.dtype) for g, x in zip(grads[:-1], inputs, strict=True)
        ]
        return (None, None, None, None, *cast)
