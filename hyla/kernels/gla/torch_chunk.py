"""GLA chunkwise in pure PyTorch: the CPU training path (contract in `hyla.kernels.autograd`).

Per batch row and head, a chunk of C tokens with entering state S and inclusive cumulative
log-gates G [C, K] (per key channel) gives

    O      = scale [(Q * e^G) S + A V],   A_ij = sum_k q_ik k_jk e^(G_ik - G_jk)  (j <= i)
    S_next = e^(G_C) * S + (K * e^(G_C - G))^T V.

A is factorised as (Q e^G)(K e^-G)^T only where every cumulative log-gate of the block is
above -FACTOR_RANGE (`hyla.kernels.chunking`): with strong gates e^-G overflows. The chunk
is then split into sub-chunks of SUB tokens. A block of A between sub-chunk a and an earlier one b
is a matmul of Q_a * e^(G_a - G_r) and K_b * e^(G_r - G_b), with r the last token of b, so
both exponents are <= 0. The diagonal blocks are summed pair by pair, one offset at a time.

The tokens run in blocks of a few chunks (`hyla.kernels.blocked`); within a block the
intra-chunk work is batched over its chunks ([rows, H, n, C, D] tensors) and only the
state pass loops over chunks. The backward recomputes the chunk states and gets the gate gradient
from dL/db_t = q_t dq_t - k_t dk_t (b the cumulative log-gate of the row), summed over t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hyla.kernels import blocked
from hyla.kernels.chunking import CHUNK, factorable, state_scan

SUB = 16


def _decays(g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chunked log-gates -> (inclusive cumulative G, e^G, e^(G_C - G)); all exponents <= 0.

    The sums over a chunk's tokens run as a matmul with a lower triangle of ones: cumsum
    along a strided dimension is several times slower on CPU."""
    cum = torch.ones(CHUNK, CHUNK, dtype=g.dtype, device=g.device).tril_() @ g
    last = cum[..., -1:, :]
    return cum, cum.exp(), (last - cum).exp()


def _sub_chunks(x: Tensor) -> Tensor:
    """[..., C, D] -> [..., C/SUB, SUB, D]: the chunk split into sub-chunks."""
    return x.unflatten(-2, (CHUNK // SUB, SUB))


def _diagonal_blocks(scores: Tensor) -> Tensor:
    """View [..., SUB, SUB, C/SUB] of the diagonal SUB x SUB blocks of [..., C, C] scores."""
    blocks = scores.unflatten(-1, (-1, SUB)).unflatten(-3, (-1, SUB))
    return torch.diagonal(blocks, 0, -4, -2)


def _intra_factored(
    q: Tensor, k: Tensor, cum: Tensor, dscores: Tensor | None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`_intra` when every cumulative log-gate is within FACTOR_RANGE of 0: then e^-G stays
    finite and A = tril((Q e^G) (K e^-G)^T), one matmul per chunk."""
    up, down = cum.exp(), (-cum).exp()
    rows, cols = q * up, k * down
    scores = (rows @ cols.transpose(-1, -2)).tril_()
    if dscores is None:
        return scores, None, None
    return scores, (dscores @ cols) * up, (dscores.transpose(-1, -2) @ rows) * down


def _intra(
    q: Tensor, k: Tensor, cum: Tensor, dscores: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """A [B, H, N, C, C], the causal gate-decayed scores q_i . k_j of each chunk, and, given
    dA (zero above the diagonal), the gradients of q and k through A (else None)."""
    if factorable(cum):
        return _intra_factored(q, k, cum, dscores)
    scores = q.new_zeros((*q.shape[:-1], CHUNK))
    dq = dk = None
    if dscores is not None:
        dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    for start in range(SUB, CHUNK, SUB):
        ref = cum[..., start - 1 : start, :]
        row_decay = (cum[..., start:, :] - ref).exp()
        col_decay = (ref - cum[..., start - SUB : start, :]).exp()
        rows = q[..., start:, :] * row_decay
        cols = k[..., start - SUB : start, :] * col_decay
        scores[..., start:, start - SUB : start] = rows @ cols.transpose(-1, -2)
        if dscores is not None:
            assert dq is not None and dk is not None  # allocated with dscores
            block = dscores[..., start:, start - SUB : start]
            dq[..., start:, :] += (block @ cols) * row_decay
            dk[..., start - SUB : start, :] += (block.transpose(-1, -2) @ rows) * col_decay

    # Diagonal blocks [..., C/SUB, SUB, SUB], one offset i - j = d at a time.
    qs, ks, gs = _sub_chunks(q), _sub_chunks(k), _sub_chunks(cum)
    diag = q.new_zeros((*qs.shape[:-1], SUB))
    if dscores is not None:
        assert dq is not None and dk is not None
        ddiag = _diagonal_blocks(dscores).movedim(-1, -3)
        dqs, dks = _sub_chunks(dq), _sub_chunks(dk)
    for d in range(SUB):
        decay = (gs[..., d:, :] - gs[..., : SUB - d, :]).exp()
        pair = qs[..., d:, :] * ks[..., : SUB - d, :] * decay
        torch.diagonal(diag, -d, -2, -1).copy_(pair.sum(-1))
        if dscores is not None:
            weight = torch.diagonal(ddiag, -d, -2, -1).unsqueeze(-1) * decay
            dqs[..., d:, :] += weight * ks[..., : SUB - d, :]
            dks[..., : SUB - d, :] += weight * qs[..., d:, :]
    _diagonal_blocks(scores).copy_(diag.movedim(-3, -1))
    return scores, dq, dk


def _chunk_states(
    k: Tensor, v: Tensor, decay: Tensor, to_end: Tensor, initial_state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(states entering each chunk [B, H, N, K, V], final state [B, H, K, V])."""
    updates = (k * to_end).transpose(-1, -2) @ v
    return state_scan(updates, decay[..., -1, :, None], initial_state)


def _block_final_state(
    qc: Tensor | None, kc: Tensor, vc: Tensor, gc: Tensor, state: Tensor | None
) -> Tensor:
    _, decay, to_end = _decays(gc)
    return _chunk_states(kc, vc, decay, to_end, state)[1]


def _block_forward(
    qc: Tensor, kc: Tensor, vc: Tensor, gc: Tensor, state: Tensor | None, *, scale: float
) -> tuple[Tensor, Tensor]:
    qc = qc * scale
    cum, decay, to_end = _decays(gc)
    states, final = _chunk_states(kc, vc, decay, to_end, state)
    o = (qc * decay) @ states
    o.view(-1, CHUNK, o.shape[-1]).baddbmm_(_intra(qc, kc, cum)[0].flatten(0, 2), vc.flatten(0, 2))
    return o, final


def _block_backward(
    qc: Tensor,
    kc: Tensor,
    vc: Tensor,
    gc: Tensor,
    state: Tensor | None,
    doc: Tensor,
    dstate: Tensor,
    *,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v, then in the gate's place dL/db (b the cumulative log-gate of
    the row, see `backward`), and of the entering state."""
    qc = qc * scale
    cum, decay, to_end = _decays(gc)
    states, _ = _chunk_states(kc, vc, decay, to_end, state)

    # dL/d(state leaving chunk i), passed backwards over chunks.
    local = (qc * decay).transpose(-1, -2) @ doc
    dstates, dstate = state_scan(local, decay[..., -1, :, None], dstate, reverse=True)

    scores, dq, dk = _intra(qc, kc, cum, (doc @ vc.transpose(-1, -2)).tril())
    assert dq is not None and dk is not None  # given dA
    dq += (doc @ states.transpose(-1, -2)) * decay
    dk += (vc @ dstates.transpose(-1, -2)) * to_end
    dv = (kc * to_end) @ dstates + scores.transpose(-1, -2) @ doc
    return dq * scale, dk, dv, qc * dq - kc * dk, dstate


STATE_INPUTS = (1, 2, 3)  # k, v and the gate: all that the state pass reads


def forward(
    q: Tensor, k: Tensor, v: Tensor, gk: Tensor, initial_state: Tensor | None, *, scale: float
) -> tuple[Tensor, Tensor]:
    return blocked.forward(_block_forward, (q, k, v, gk), initial_state, scale=scale)


final_state = blocked.final_state_function(_block_final_state, STATE_INPUTS)


def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    initial_state: Tensor | None,
    do: Tensor,
    dfinal: Tensor,
    *,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    (dq, dk, dv, db), dstate = blocked.backward(
        _block_final_state,
        _block_backward,
        (q, k, v, gk),
        initial_state,
        do,
        dfinal.float(),
        scale=scale,
        needed=STATE_INPUTS,
    )
    assert dq is not None and dk is not None and dv is not None and db is not None
    # Gate gradient: dg_t = sum_{s >= t} dL/db_s with dL/db_s = q_s dq_s - k_s dk_s (+ the
    # final state's term at s = T). Summed from the front instead: dg_1 = sum_v S_0 dS_0 (a
    # shift of every b only rescales S_0), minus the exclusive prefix sums of dL/db. This
    # keeps dg_1 exactly zero without an initial state, where the reverse sum would only
    # cancel to round-off. q is scaled on both sides of q dq, so the product is unchanged.
    dg = F.pad(db[:, :-1].cumsum(1), (0, 0, 0, 0, 1, 0)).neg_()
    if initial_state is None:
        return dq, dk, dv, dg, None
    dg += (initial_state.float() * dstate).sum(-1)[:, None]
    return dq, dk, dv, dg, dstate
