"""Chunkwise linear attention with optional per-token scalar log-gates, in plain PyTorch.

Per row and head, with S the state entering a chunk, Γ the inclusive cumulative log-gate
inside the chunk (Γ_C its last entry) and D_ij = exp(Γ_i - Γ_j) for j <= i (0 above):

    O      = scale [(Q ⊙ e^Γ) S + ((Q K^T) ⊙ D) V]
    S_next = e^{Γ_C} S + (K ⊙ e^{Γ_C - Γ})^T V

All intra-chunk work is batched over every chunk as [B, H, N, C, D] tensors; only the
chunk-to-chunk state pass is sequential. Every exponent is a difference of cumulative
log-gates that is <= 0 (masked before exp), so strong gates underflow to 0 instead of
overflowing. The contract is in `hyla.kernels.autograd`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyla.kernels.chunking import CHUNK, from_chunks, to_chunks


def _decay_mask(gam: Tensor | None, like: Tensor) -> Tensor:
    """The causal [C, C] 0/1 mask, or with a gate the [B, H, N, C, C] decays exp(Γ_i - Γ_j)."""
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=like.device).tril()
    if gam is None:
        return causal.to(like.dtype)
    diff = gam[..., :, None] - gam[..., None, :]
    return torch.exp(diff.masked_fill(~causal, float("-inf")))


def _state_pass(
    updates: Tensor, decay: Tensor | None, start: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Scan S_{n+1} = decay_n S_n + updates_n over chunks n.

    updates [B, H, N, K, V], decay [B, H, N] (None: no decay), start [B, H, K, V] or None.
    Returns (the state entering each chunk [B, H, N, K, V], the state after the last chunk).
    A loop of cheap ops: torch's cumsum over a non-last dim is slower than this.
    """
    before = torch.empty_like(updates)
    state = updates.new_zeros(updates[:, :, 0].shape) if start is None else start
    for i in range(updates.shape[2]):
        before[:, :, i] = state
        if decay is None:
            state = state + updates[:, :, i]
        else:
            state = torch.addcmul(updates[:, :, i], state, decay[:, :, i, None, None])
    return before, state


def _reverse_state_pass(
    sources: Tensor, decay: Tensor | None, end: Tensor
) -> tuple[Tensor, Tensor]:
    """Scan dS_n = decay_n dS_{n+1} + sources_n backwards from dS_N = end.

    Returns (the gradient of the state leaving each chunk [B, H, N, K, V], dS_0).
    """
    after = torch.empty_like(sources)
    grad = end
    for i in range(sources.shape[2] - 1, -1, -1):
        after[:, :, i] = grad
        if decay is None:
            grad = grad + sources[:, :, i]
        else:
            grad = torch.addcmul(sources[:, :, i], grad, decay[:, :, i, None, None])
    return after, grad


def _gate_grad(carried: Tensor, q_inter: Tensor, k_state: Tensor, pairs: Tensor) -> Tensor:
    """dL/dg_t = <e^{g_t} S_{t-1}, dS_t> per token, from chunk-level quantities.

    Splitting e^{g_t} S_{t-1} (the entering state and the keys j < t) and dS_t (the leaving
    state's gradient and the queries i >= t) gives four sums of products that are all
    formed without cancellation, so a gate that cannot affect the loss gets exactly 0:
      carried [B, H, N]     e^{Γ_C} <S, dS_next>, shared by the whole chunk,
      q_inter [.., C, K]    row i: e^{Γ_i} q_i ⊙ (S do_i), summed over i >= t,
      k_state [.., C, K]    row j: e^{Γ_C - Γ_j} k_j ⊙ (dS_next v_j), summed over j < t,
      pairs   [.., C, C]    (i, j): e^{Γ_i - Γ_j} (q_i·k_j)(do_i·v_j), summed over j < t <= i.
    """
    a, c = q_inter.sum(-1), k_state.sum(-1)
    upper = torch.ones(CHUNK, CHUNK, dtype=a.dtype, device=a.device).triu()
    later = a.flip(-1).cumsum(-1).flip(-1)
    earlier = c.cumsum(-1) - c
    straddling = ((upper @ pairs) * (1 - upper)).sum(-1)
    return carried[..., None] + later + earlier + straddling


def _prepare(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Chunked fp32 inputs with the scale folded into q, and the gate factors.

    Returns qs, kc, vc, then Γ, e^Γ, e^{Γ_C - Γ} (both [..., C, 1]) and e^{Γ_C} [B, H, N],
    which are all None without a gate.
    """
    qs, kc, vc = to_chunks(q) * scale, to_chunks(k), to_chunks(v)
    if g is None:
        return qs, kc, vc, None, None, None, None
    gam = to_chunks(g).cumsum(-1)
    last = gam[..., -1:]
    return qs, kc, vc, gam, gam.exp()[..., None], (last - gam).exp()[..., None], last[..., 0].exp()


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    *,
    scale: float,
) -> tuple[Tensor, Tensor]:
    t = q.shape[1]
    qs, kc, vc, gam, q_decay, k_decay, chunk_decay = _prepare(q, k, v, g, scale)
    k_in = kc if k_decay is None else kc * k_decay
    states, final = _state_pass(k_in.transpose(-1, -2) @ vc, chunk_decay, initial_state)
    q_in = qs if q_decay is None else qs * q_decay
    scores = (qs @ kc.transpose(-1, -2)) * _decay_mask(gam, qs)
    o = scores @ vc + q_in @ states
    return from_chunks(o, t), final


def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    do: Tensor,
    dfinal: Tensor,
    *,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    t = q.shape[1]
    qs, kc, vc, gam, q_decay, k_decay, chunk_decay = _prepare(q, k, v, g, scale)
    doc = to_chunks(do)
    k_in = kc if k_decay is None else kc * k_decay
    q_in = qs if q_decay is None else qs * q_decay
    states, _ = _state_pass(k_in.transpose(-1, -2) @ vc, chunk_decay, initial_state)
    dstates, dinitial = _reverse_state_pass(
        q_in.transpose(-1, -2) @ doc, chunk_decay, dfinal.float()
    )

    mask = _decay_mask(gam, qs)
    scores = (qs @ kc.transpose(-1, -2)) * mask
    do_v = doc @ vc.transpose(-1, -2)
    dq_inter = doc @ states.transpose(-1, -2)
    dscores = do_v * mask
    dqs = dscores @ kc + (dq_inter if q_decay is None else dq_inter * q_decay)
    dk_state = vc @ dstates.transpose(-1, -2)
    dkc = dscores.transpose(-1, -2) @ qs + (dk_state if k_decay is None else dk_state * k_decay)
    dvc = scores.transpose(-1, -2) @ doc + k_in @ dstates

    dg = None
    if chunk_decay is not None:  # with a gate (gam)
        terms = (states * dstates).sum((-1, -2)) * chunk_decay, q_in * dq_inter, k_in * dk_state
        dg = _gate_grad(*terms, scores * do_v).flatten(2)[..., :t].transpose(1, 2).contiguous()
    dq = from_chunks(dqs, t) * scale
    return (
        dq,
        from_chunks(dkc, t),
        from_chunks(dvc, t),
        dg,
        None if initial_state is None else dinitial,
    )
