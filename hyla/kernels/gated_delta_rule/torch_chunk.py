"""Chunkwise gated delta rule in plain PyTorch (the CPU training path).

Each chunk of CHUNK tokens is put in WY form: with L the strictly lower part of
diag(beta) ((K K^T) * decay) and Tm = (I + L)^-1, the chunk's writes become
pseudo-values U = Tm diag(beta) V - Tm diag(beta e^Gamma) K S that depend linearly on the
entering state S. The tokens run in blocks of a few chunks (`hyla.kernels.blocked`);
everything except the chunk-to-chunk pass over S is batched over a block's chunks. Every
exponent is a difference of cumulative log-gates that is <= 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hyla.kernels import blocked
from hyla.kernels.chunking import CHUNK, decay_matrix


@dataclass
class _Chunks:
    """The per-chunk quantities that do not depend on the entering state."""

    q: Tensor  # [B, H, N, C, K]
    k: Tensor  # [B, H, N, C, K]
    v: Tensor  # [B, H, N, C, V]
    beta: Tensor  # [B, H, N, C]
    g_in: Tensor  # e^Gamma, Gamma the inclusive cumulative log-gate in the chunk
    g_last: Tensor  # e^Gamma_C, [B, H, N]
    g_end: Tensor  # e^(Gamma_C - Gamma), the decay from each token to the chunk's end
    decay: Tensor  # [B, H, N, C, C]: e^(Gamma_i - Gamma_j) for j <= i, 0 above
    kk: Tensor  # K K^T
    tm: Tensor  # (I + L)^-1, unit lower triangular
    bv: Tensor  # diag(beta) V
    bk: Tensor  # diag(beta e^Gamma) K
    w: Tensor  # Tm bk: U = u0 - w S
    u0: Tensor  # Tm bv
    kd: Tensor  # K * g_end: the keys as seen by the chunk's final state


def _build(qc: Tensor, kc: Tensor, vc: Tensor, bc: Tensor, gc: Tensor | None) -> _Chunks:
    """From chunk-layout inputs [rows, H, n, C, ...]."""
    gamma = bc.new_zeros(bc.shape) if gc is None else gc.cumsum(-1)
    decay = decay_matrix(gamma)
    kk = kc @ kc.transpose(-1, -2)
    lower = (kk * decay).tril(-1) * bc[..., :, None]
    eye = torch.eye(CHUNK, device=qc.device).expand_as(lower)
    # unitriangular=True reads only the strictly lower part, so `lower` stands for I + L.
    tm = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
    g_in = torch.exp(gamma)
    g_end = torch.exp(gamma[..., -1:] - gamma)
    bv = vc * bc[..., None]
    bk = kc * (bc * g_in)[..., None]
    return _Chunks(
        q=qc,
        k=kc,
        v=vc,
        beta=bc,
        g_in=g_in,
        g_last=g_in[..., -1],
        g_end=g_end,
        decay=decay,
        kk=kk,
        tm=tm,
        bv=bv,
        bk=bk,
        w=tm @ bk,
        u0=tm @ bv,
        kd=kc * g_end[..., None],
    )


def _state_pass(c: _Chunks, initial_state: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The sequential part: (state entering each chunk [B, H, N, K, V], pseudo-values U
    [B, H, N, C, V], final state)."""
    b, h, n, _, kd = c.k.shape
    vd = c.v.shape[-1]
    s = c.q.new_zeros(b, h, kd, vd) if initial_state is None else initial_state.float()
    states = c.q.new_empty(b, h, n, kd, vd)
    u = torch.empty_like(c.u0)
    for i in range(n):
        states[:, :, i] = s
        u_i = c.u0[:, :, i] - c.w[:, :, i] @ s
        u[:, :, i] = u_i
        s = c.g_last[:, :, i, None, None] * s + c.kd[:, :, i].transpose(-1, -2) @ u_i
    return states, u, s


def _block_final_state(
    qc: Tensor | None, kc: Tensor, vc: Tensor, bc: Tensor, gc: Tensor | None, state: Tensor | None
) -> Tensor:
    # The WY form reads q only through `q`; keys stand in for it here.
    return _state_pass(_build(kc, kc, vc, bc, gc), state)[2]


def _block_forward(
    qc: Tensor,
    kc: Tensor,
    vc: Tensor,
    bc: Tensor,
    gc: Tensor | None,
    state: Tensor | None,
    *,
    scale: float,
) -> tuple[Tensor, Tensor]:
    c = _build(qc, kc, vc, bc, gc)
    states, u, final = _state_pass(c, state)
    scores = (c.q @ c.k.transpose(-1, -2)) * c.decay
    o = scale * ((c.q * c.g_in[..., None]) @ states + scores @ u)
    return o, final


def _block_backward(
    qc: Tensor,
    kc: Tensor,
    vc: Tensor,
    bc: Tensor,
    gc: Tensor | None,
    state: Tensor | None,
    doc: Tensor,
    dstate: Tensor,
    *,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """Recomputes the entering states and pseudo-values, runs the reverse pass for the
    state gradients, then all per-chunk gradients batched."""
    c = _build(qc, kc, vc, bc, gc)
    states, u, _ = _state_pass(c, state)
    n = c.q.shape[2]
    qg = c.q * c.g_in[..., None]
    scores = (c.q @ c.k.transpose(-1, -2)) * c.decay
    du_out = scale * (scores.transpose(-1, -2) @ doc)
    ds_out = scale * (qg.transpose(-1, -2) @ doc)

    # Reverse pass: ds_after[:, :, i] is the gradient of the state leaving chunk i.
    ds = dstate
    ds_after = torch.empty_like(states)
    du = torch.empty_like(u)
    for i in range(n - 1, -1, -1):
        ds_after[:, :, i] = ds
        du_i = du_out[:, :, i] + c.kd[:, :, i] @ ds
        du[:, :, i] = du_i
        ds = (
            ds_out[:, :, i]
            + c.g_last[:, :, i, None, None] * ds
            - c.w[:, :, i].transpose(-1, -2) @ du_i
        )

    dscores = scale * (doc @ u.transpose(-1, -2))
    dqk = dscores * c.decay
    dqg = scale * (doc @ states.transpose(-1, -2))
    dkd = u @ ds_after.transpose(-1, -2)
    dq = dqk @ c.k + dqg * c.g_in[..., None]
    dk = dqk.transpose(-1, -2) @ c.q + dkd * c.g_end[..., None]
    dw = -(du @ states.transpose(-1, -2))
    tm_t = c.tm.transpose(-1, -2)
    dbv = tm_t @ du
    dbk = tm_t @ dw
    dtm = du @ c.bv.transpose(-1, -2) + dw @ c.bk.transpose(-1, -2)
    dl = -(tm_t @ dtm @ tm_t).tril(-1) * c.decay
    dv = dbv * c.beta[..., None]
    dbeta = (c.v * dbv).sum(-1) + (c.k * dbk).sum(-1) * c.g_in + (dl * c.kk).sum(-1)
    dkk = dl * c.beta[..., :, None]
    dk = dk + dbk * (c.beta * c.g_in)[..., None] + (dkk + dkk.transpose(-1, -2)) @ c.k

    dg = None
    if gc is not None:
        # Gradient w.r.t. each Gamma_i (a cumulative log-gate), then a reverse cumsum in the
        # chunk. Each decay e^(Gamma_i - Gamma_j) with gradient r contributes r x decay to
        # Gamma_i and minus that to Gamma_j, so terms that must cancel cancel exactly.
        rel = dscores * scores + dkk * c.kk
        kd_term = (c.kd * dkd).sum(-1)
        dgamma = rel.sum(-1) - rel.sum(-2) + (qg * dqg).sum(-1) + (c.bk * dbk).sum(-1) - kd_term
        carry = (states * ds_after).sum((-1, -2)) * c.g_last
        dgamma[..., -1] += kd_term.sum(-1) + carry
        dg = dgamma.flip(-1).cumsum(-1).flip(-1)
    return dq, dk, dv, dbeta, dg, ds


STATE_INPUTS = (1, 2, 3, 4)  # k, v, beta and the gate: all that the state pass reads


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    *,
    scale: float,
) -> tuple[Tensor, Tensor]:
    return blocked.forward(_block_forward, (q, k, v, beta, g), initial_state, scale=scale)


final_state = blocked.final_state_function(_block_final_state, STATE_INPUTS)


def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    do: Tensor,
    dfinal: Tensor,
    *,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    (dq, dk, dv, dbeta, dg), dinitial = blocked.backward(
        _block_final_state,
        _block_backward,
        (q, k, v, beta, g),
        initial_state,
        do,
        dfinal.float(),
        scale=scale,
        needed=STATE_INPUTS,
    )
    assert dq is not None and dk is not None and dv is not None and dbeta is not None
    return dq, dk, dv, dbeta, dg, None if initial_state is None else dinitial
