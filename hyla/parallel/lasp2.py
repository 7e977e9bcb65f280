"""LASP-2 for linear-recurrent layers (ALGORITHMS.md §3).

Rank r of the sequence-parallel group holds tokens [s_r, e_r) of every sequence, in rank
order. Its shard acts on the recurrent state affinely, S(e_r) = AA_r S(s_r) + BB_r, where
AA_r is the product of the shard's transitions (a scalar, a K-vector or a K x K matrix per
head) and BB_r the shard's final state from zero.

Forward: ONE all-gather of (AA, BB) — fused into one buffer, its size independent of the
sequence length — then each rank folds the pairs of the ranks before it into its initial
state, and o = o_intra (from zero, no communication) + qhat S(s_r), where
qhat_t = scale (A_t ... A_1)^T q_t. For the additive and gated variants BB is one matmul,
so its all-gather overlaps the intra-shard kernel.

Backward: ONE all-gather of local_r = qhat^T dO (the gradient that the shard's own outputs
send into S(s_r)); folding from the last rank backwards gives dL/dS(e_r), and the
unchanged kernel backward, run from S(s_r) with that as the final-state gradient, gives
every input gradient.

Packed segments (`hyla.parallel.chains`): the pairs are per chain, not per segment, so the
collectives keep their size when documents split a shard into more segments. A chain's
pair is (AA of its single carried segment, or 0 when it resets; BB of its last segment),
its carried state enters only its first segment, and the gradient that flows back to the
carry is that segment's local_r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from hyla.kernels.backend import chunk_implementation, resolve_backend
from hyla.kernels.segments import Segmented
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
class ShardSummary:
    """What one shard contributes: its transition, its state from zero, its zero-state
    output, and qhat (the map from S(s_r) to the output: o = o_intra + qhat S(s_r))."""

    aa: Tensor
    bb: Tensor
    o_intra: Tensor
    qhat: Tensor


def _chain_pairs(aa: Tensor, bb: Tensor, chains: Chains) -> Tensor:
    """Per-segment (AA, BB) -> the flat buffer of per-chain pairs that ranks exchange."""
    passes = chains.passes.view(-1, *[1] * (aa.dim() - 1))
    chain_aa = aa[chains.last] * passes
    return torch.cat([chain_aa.flatten(), bb[chains.last].flatten()])


def _gated_summary(
    impl: Segmented,
    scale: float,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None,
    group: dist.ProcessGroup,
    chains: Chains,
):
    """Scalar-gated and GLA shards: AA and BB in closed form, gathered while the
    intra-shard kernel runs. log_decay: None, [B, T, H] or [B, T, H, K]."""
    qf, kf, vf = q.float(), k.float(), v.float()
    if log_decay is None:
        b, _, h, _ = q.shape
        aa = q.new_ones((b, h), dtype=torch.float32)
        k_to_end, qhat = kf, scale * qf
    else:
        cum = log_decay.cumsum(1)
        total = cum[:, -1]
        aa = torch.exp(total)
        expand = (lambda x: x[..., None]) if log_decay.dim() == 3 else (lambda x: x)
        k_to_end = kf * expand(torch.exp(total[:, None] - cum))
        qhat = scale * qf * expand(torch.exp(cum))
    bb = torch.einsum("bthk,bthv->bhkv", k_to_end, vf)
    pending = all_gather(_chain_pairs(aa, bb, chains), group, async_op=True)
    o_intra, _ = impl.forward(q, k, v, log_decay, None, scale=scale)
    return pending, ShardSummary(aa, bb, o_intra, qhat)


def _delta_summary(
    impl: Segmented,
    scale: float,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
) -> ShardSummary:
    """Gated delta rule: the state's columns evolve independently, so one kernel run with
    values [0 | v] from the initial state [I | 0] yields [AA | BB] as its final state and
    [qhat | o_intra] as its output."""
    b, t, h, kd = k.shape
    eye = torch.eye(kd, device=k.device, dtype=torch.float32).expand(b, h, kd, kd)
    init = torch.cat([eye, eye.new_zeros(b, h, kd, v.shape[-1])], dim=-1)
    values = torch.cat([v.new_zeros(b, t, h, kd), v], dim=-1)
    out, final = impl.forward(q, k, values, beta, g, init, scale=scale)
    return ShardSummary(final[..., :kd], final[..., kd:], out[..., kd:], out[..., :kd].float())


@remember_scope
class Lasp2Function(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, family: str, group, scale: float, backend: str | None, chains: Chains, q, k, v, *gates
    ):
        impl = chunk_implementation(family, resolve_backend(backend, q.device))
        n = q.shape[0]
        chains.check(n)
        if family == "gated_delta_rule":
            summary = _delta_summary(impl, scale, q, k, v, *gates)
            pending = all_gather(_chain_pairs(summary.aa, summary.bb, chains), group)
        else:
            pending, summary = _gated_summary(impl, scale, q, k, v, gates[0], group, chains)
        gathered = pending.wait()
        c = chains.num_chains
        n_aa = c * summary.aa[0].numel()
        aa_all = gathered[:, :n_aa].view(-1, c, *summary.aa.shape[1:])
        bb_all = gathered[:, n_aa:].view(-1, c, *summary.bb.shape[1:])
        rank = dist.get_rank(group)
        carry = bb_all.new_zeros(bb_all.shape[1:])
        for j in range(rank):
            carry = apply_transition(aa_all[j], carry) + bb_all[j]
        state = chains.scatter_carry(carry, n)  # each segment's initial state
        o = summary.o_intra + torch.einsum("bthk,bhkv->bthv", summary.qhat, state)
        ctx.impl, ctx.group, ctx.scale, ctx.chains = impl, group, scale, chains
        ctx.save_for_backward(q, k, v, *gates, state, summary.qhat, aa_all)
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do: Tensor):
        *inputs, state, qhat, aa_all = ctx.saved_tensors
        chains = ctx.chains
        local = chains.gather_carry(torch.einsum("bthk,bthv->bhkv", qhat, do.float()))
        local_all = all_gather(local, ctx.group).wait()
        rank = dist.get_rank(ctx.group)
        d_end = torch.zeros_like(local)  # dL/d(carry out of this rank), per chain
        for j in range(local_all.shape[0] - 1, rank, -1):
            d_end = local_all[j] + apply_transition_transposed(aa_all[j], d_end)
        d_final = chains.scatter_last(d_end, state.shape[0])
        grads = ctx.impl.backward(*inputs, state, do, d_final, scale=ctx.scale)
        cast = [
            None if g is None else g.to(x.dtype) for g, x in zip(grads[:-1], inputs, strict=True)
        ]
        return (None, None, None, None, None, *cast)
