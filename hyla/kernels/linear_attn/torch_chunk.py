"""Chunkwise linear attention with optional per-token scalar log-gates, in plain PyTorch.

Per row and head, with S the state entering a chunk, Γ the inclusive cumulative log-gate
inside the chunk (Γ_C its last entry) and D_ij = exp(Γ_i - Γ_j) for j <= i (0 above):

    O      = scale [(Q ⊙ e^Γ) S + ((Q K^T) ⊙ D) V]
    S_next = e^{Γ_C} S + (K ⊙ e^{Γ_C - Γ})^T V

The tokens run in blocks of a few chunks (`hyla.kernels.blocked`); within a block the
intra-chunk work is batched over its chunks as [rows, H, n, C, D] tensors and only the
chunk-to-chunk state pass is sequential. Every exponent is a difference of cumulative
log-gates that is <= 0 (masked before exp), so strong gates underflow to 0 instead of
overflowing. The contract is in `hyla.kernels.autograd`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyla.kernels import blocked
from hyla.kernels.chunking import CHUNK, decay_matrix, state_scan


def _decay_mask(gam: Tensor | None, like: Tensor) -> Tensor:
    """The causal [C, C] 0/1 mask, or with a gate the [B, H, N, C, C] decays exp(Γ_i - Γ_j)."""
    if gam is None:
        return torch.ones(CHUNK, CHUNK, dtype=like.dtype, device=like.device).tril_()
    return decay_matrix(gam)


def _state_pass(
    updates: Tensor, decay: Tensor | None, start: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Scan S_{n+1} = decay_n S_n + updates_n over chunks n.

    updates [B, H, N, K, V], decay [B, H, N] (None: no decay), start [B, H, K, V] or None.
    Returns (the state entering each chunk [B, H, N, K, V], the state after the last chunk).
    """
    return state_scan(updates, None if decay is None else decay[..., None, None], start)


def _reverse_state_pass(
    sources: Tensor, decay: Tensor | None, end: Tensor
) -> tuple[Tensor, Tensor]:
    """Scan dS_n = decay_n dS_{n+1} + sources_n backwards from dS_N = end.

    Returns (the gradient of the state leaving each chunk [B, H, N, K, V], dS_0).
    """
    factor = None if decay is None else decay[..., None, None]
    return state_scan(sources, factor, end, reverse=True)


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


def _gate_factors(
    g: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Chunked log-gates [.., n, C] -> Γ, e^Γ, e^{Γ_C - Γ} (both [..., C, 1]) and e^{Γ_C}
    [.., n]; all None without a gate."""
    if g is None:
        return None, None, None, None
    gam = g.cumsum(-1)
    last = gam[..., -1:]
    return gam, gam.exp()[..., None], (last - gam).exp()[..., None], last[..., 0].exp()


def _block_final_state(
    qc: Tensor | None, kc: Tensor, vc: Tensor, gc: Tensor | None, state: Tensor | None
) -> Tensor:
    _, _, k_decay, chunk_decay = _gate_factors(gc)
    k_in = kc if k_decay is None else kc * k_decay
    return _state_pass(k_in.transpose(-1, -2) @ vc, chunk_decay, state)[1]


def _block_forward(
    qc: Tensor, kc: Tensor, vc: Tensor, gc: Tensor | None, state: Tensor | None, *, scale: float
) -> tuple[Tensor, Tensor]:
    gam, q_decay, k_decay, chunk_decay = _gate_factors(gc)
    k_in = kc if k_decay is None else kc * k_decay
    states, final = _state_pass(k_in.transpose(-1, -2) @ vc, chunk_decay, state)
    q_in = qc if q_decay is None else qc * q_decay
    scores = (qc @ kc.transpose(-1, -2)).mul_(_decay_mask(gam, qc))
    o = _flat(q_in @ states).baddbmm_(_flat(scores), _flat(vc)).mul_(scale)
    return o.view(vc.shape), final


def _flat(x: Tensor) -> Tensor:
    """[rows, H, n, A, B] -> the [rows * H * n, A, B] batch of matrices (a view)."""
    return x.flatten(0, 2)


def _block_backward(
    qc: Tensor,
    kc: Tensor,
    vc: Tensor,
    gc: Tensor | None,
    state: Tensor | None,
    doc: Tensor,
    dstate: Tensor,
    *,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    gam, q_decay, k_decay, chunk_decay = _gate_factors(gc)
    qs = qc * scale
    k_in = kc if k_decay is None else kc * k_decay
    q_in = qs if q_decay is None else qs * q_decay
    states, _ = _state_pass(k_in.transpose(-1, -2) @ vc, chunk_decay, state)
    dstates, dentering = _reverse_state_pass(q_in.transpose(-1, -2) @ doc, chunk_decay, dstate)

    mask = _decay_mask(gam, qs)
    scores = (qs @ kc.transpose(-1, -2)).mul_(mask)
    do_v = doc @ vc.transpose(-1, -2)
    dq_inter = doc @ states.transpose(-1, -2)
    dscores = do_v * mask
    dk_state = vc @ dstates.transpose(-1, -2)
    if q_decay is None:
        dqs = _flat(dq_inter).baddbmm_(_flat(dscores), _flat(kc))  # nothing reads dq_inter again
    else:
        dqs = _flat(dq_inter * q_decay).baddbmm_(_flat(dscores), _flat(kc))
    k_part = (
        dk_state if k_decay is None else dk_state * k_decay
    )  # in place below: read again only with a gate
    dkc = _flat(k_part).baddbmm_(_flat(dscores).transpose(-1, -2), _flat(qs))
    dvc = _flat(k_in @ dstates).baddbmm_(_flat(scores).transpose(-1, -2), _flat(doc))

    dg = None
    if chunk_decay is not None:  # with a gate
        terms = (states * dstates).sum((-1, -2)) * chunk_decay, q_in * dq_inter, k_in * dk_state
        dg = _gate_grad(*terms, scores * do_v)
    return dqs.mul_(scale).view(qc.shape), dkc.view(kc.shape), dvc.view(vc.shape), dg, dentering


STATE_INPUTS = (1, 2, 3)  # k, v and the gate: all that the state pass reads


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    *,
    scale: float,
) -> tuple[Tensor, Tensor]:
    return blocked.forward(_block_forward, (q, k, v, g), initial_state, scale=scale)


final_state = blocked.final_state_function(_block_final_state, STATE_INPUTS)


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
    (dq, dk, dv, dg), dinitial = blocked.backward(
        _block_final_state,
        _block_backward,
        (q, k, v, g),
        initial_state,
        do,
        dfinal.float(),
        scale=scale,
        needed=STATE_INPUTS,
    )
    assert dq is not None and dk is not None and dv is not None
    return dq, dk, dv, dg, None if initial_state is None else dinitial
