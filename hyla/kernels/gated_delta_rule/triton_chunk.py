"""Chunkwise gated delta rule in Triton (same contract and WY-form math as torch_chunk).

Forward: `_wy_kernel` (one program per chunk and head) builds the chunk's cumulative
log-gates, Tm = (I + L)^-1 by blockwise inversion, W = Tm diag(beta e^Gamma) K and
U0 = Tm diag(beta) V; `_state_fwd_kernel` (one program per head and V-block) carries the
state over the chunks, writing the state entering each chunk and the pseudo-values
U = U0 - W S; `_output_kernel` (per chunk and head) forms the outputs.
Backward recomputes all of that, runs `_state_bwd_kernel` in reverse for the state
gradients, then `_grad_kernel` (per chunk and head) for every input gradient.

Head dims are padded to powers of two >= 16 with masked loads; time is masked to T, and
the padded rows (zero keys, values, beta and gates) act as identity steps. Inputs may be
bf16: they are loaded and converted to fp32, and all accumulation is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hyla.kernels.chunking import CHUNK, num_chunks
from hyla.kernels.triton_common import MIN_DIM, dot_precision, pad_dim

BLOCK_V = 64  # V-block of the state passes (one program per block)
# _grad_kernel walks V in blocks with at most this many state entries (K x V-block) per step
# and runs unpipelined: it holds many tiles, and shared memory is the limit (H100, K = 128).
GRAD_STATE_TILE = 4096


@triton.jit
def _unit_lower_inverse(a, DOT_PRECISION: tl.constexpr, C: tl.constexpr, LOG2_C: tl.constexpr):
    """(I + A)^-1 for a strictly lower triangular [C, C] tile A, by doubling the size of the
    inverted diagonal blocks: with X the inverse of the block diagonal of I + A (blocks of
    size s), each pair of blocks [[P, 0], [B, Q]] has inverse [[P^-1, 0], [-Q^-1 B P^-1, Q^-1]],
    and since X is block diagonal, X (A masked to the B blocks) X places every Q^-1 B P^-1."""
    rows = tl.arange(0, C)
    inv = (rows[:, None] == rows[None, :]).to(tl.float32)
    for step in tl.static_range(LOG2_C):
        bi = rows[:, None] // (1 << step)
        bj = rows[None, :] // (1 << step)
        off = tl.where((bi == bj + 1) & (bj % 2 == 0), a, 0.0)
        inv -= tl.dot(
            tl.dot(inv, off, input_precision=DOT_PRECISION), inv, input_precision=DOT_PRECISION
        )
    return inv


@triton.jit
def _decay(gamma, OFFSET: tl.constexpr, C: tl.constexpr):
    """e^(Gamma_i - Gamma_j) where j <= i - OFFSET (OFFSET 0: diagonal included, 1: strictly
    lower), 0 elsewhere; masked before exp, since above the diagonal the exponent is positive."""
    rows = tl.arange(0, C)
    keep = rows[:, None] >= rows[None, :] + OFFSET
    return tl.exp(tl.where(keep, gamma[:, None] - gamma[None, :], float("-inf")))


@triton.jit
def _chunk_gates(gam, pid_bh, n, T, C: tl.constexpr):
    """(Gamma on the chunk's rows, Gamma on its last row). Rows past T repeat the last
    token's value, as zero gates would, so that every decay exponent stays <= 0."""
    base = gam + pid_bh * T
    gamma = tl.load(base + tl.minimum(n * C + tl.arange(0, C), T - 1))
    return gamma, tl.load(base + tl.minimum(n * C + C, T) - 1)


@triton.jit
def _wy_kernel(
    k,
    v,
    beta,
    g,
    gam,
    w,
    u0,
    tm,
    T,
    H,
    K,
    V,
    N,
    HAS_GATE: tl.constexpr,
    STORE_TM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    C: tl.constexpr,
    LOG2_C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """The state-independent part of one chunk: Gamma, Tm = (I + L)^-1 (kept for the
    backward when STORE_TM), W = Tm diag(beta e^Gamma) K and U0 = Tm diag(beta) V."""
    pid_n, pid_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    rc, rk, rv = tl.arange(0, C), tl.arange(0, BK), tl.arange(0, BV)
    t = pid_n * C + rc
    t_ok = t < T
    row = (b * T + t) * H + h
    k_c = tl.load(
        k + row[:, None] * K + rk[None, :], mask=t_ok[:, None] & (rk < K)[None, :], other=0.0
    ).to(tl.float32)
    v_c = tl.load(
        v + row[:, None] * V + rv[None, :], mask=t_ok[:, None] & (rv < V)[None, :], other=0.0
    ).to(tl.float32)
    beta_c = tl.load(beta + row, mask=t_ok, other=0.0).to(tl.float32)
    if HAS_GATE:
        gamma = tl.cumsum(tl.load(g + row, mask=t_ok, other=0.0).to(tl.float32), 0)
    else:
        gamma = tl.zeros([C], dtype=tl.float32)
    tl.store(gam + pid_bh * T + t, gamma, mask=t_ok)

    kk = tl.dot(k_c, tl.trans(k_c), input_precision=DOT_PRECISION)
    lower = kk * _decay(gamma, 1, C) * beta_c[:, None]
    inv = _unit_lower_inverse(lower, DOT_PRECISION, C, LOG2_C)
    w_c = tl.dot(inv, k_c * (beta_c * tl.exp(gamma))[:, None], input_precision=DOT_PRECISION)
    u0_c = tl.dot(inv, v_c * beta_c[:, None], input_precision=DOT_PRECISION)
    seq = pid_bh * T + t
    tl.store(w + seq[:, None] * K + rk[None, :], w_c, mask=t_ok[:, None] & (rk < K)[None, :])
    tl.store(u0 + seq[:, None] * V + rv[None, :], u0_c, mask=t_ok[:, None] & (rv < V)[None, :])
    if STORE_TM:
        tl.store(tm + (pid_bh * N + pid_n) * C * C + rc[:, None] * C + rc[None, :], inv)


@triton.jit
def _state_fwd_kernel(
    k,
    gam,
    w,
    u0,
    s0,
    states,
    u,
    s_final,
    T,
    H,
    K,
    V,
    N,
    HAS_INITIAL_STATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """S_next = e^Gamma_C S + (K e^(Gamma_C - Gamma))^T U with U = U0 - W S, per V-block."""
    pid_bh, pid_v = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    rc, rk = tl.arange(0, C), tl.arange(0, BK)
    rv = pid_v * BV + tl.arange(0, BV)
    kv_mask = (rk < K)[:, None] & (rv < V)[None, :]
    kv_off = rk[:, None] * V + rv[None, :]
    if HAS_INITIAL_STATE:
        s = tl.load(s0 + pid_bh * K * V + kv_off, mask=kv_mask, other=0.0)
    else:
        s = tl.zeros([BK, BV], dtype=tl.float32)
    for n in range(N):
        tl.store(states + (pid_bh * N + n) * K * V + kv_off, s, mask=kv_mask)
        t = n * C + rc
        t_ok = t < T
        seq = pid_bh * T + t
        ck_mask = t_ok[:, None] & (rk < K)[None, :]
        cv_mask = t_ok[:, None] & (rv < V)[None, :]
        k_c = tl.load(
            k + ((b * T + t) * H + h)[:, None] * K + rk[None, :], mask=ck_mask, other=0.0
        ).to(tl.float32)
        w_c = tl.load(w + seq[:, None] * K + rk[None, :], mask=ck_mask, other=0.0)
        u_c = tl.load(u0 + seq[:, None] * V + rv[None, :], mask=cv_mask, other=0.0)
        gamma, g_last = _chunk_gates(gam, pid_bh, n, T, C)
        u_c -= tl.dot(w_c, s, input_precision=DOT_PRECISION)
        tl.store(u + seq[:, None] * V + rv[None, :], u_c, mask=cv_mask)
        k_end = k_c * tl.exp(g_last - gamma)[:, None]
        s = tl.exp(g_last) * s + tl.dot(tl.trans(k_end), u_c, input_precision=DOT_PRECISION)
    tl.store(s_final + pid_bh * K * V + kv_off, s, mask=kv_mask)


@triton.jit
def _output_kernel(
    q,
    k,
    gam,
    states,
    u,
    o,
    scale,
    T,
    H,
    K,
    V,
    N,
    DOT_PRECISION: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """O = scale [(Q e^Gamma) S + ((Q K^T) * D) U] for one chunk."""
    pid_n, pid_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    rc, rk, rv = tl.arange(0, C), tl.arange(0, BK), tl.arange(0, BV)
    t = pid_n * C + rc
    t_ok = t < T
    row = (b * T + t) * H + h
    seq = pid_bh * T + t
    ck_mask = t_ok[:, None] & (rk < K)[None, :]
    cv_mask = t_ok[:, None] & (rv < V)[None, :]
    q_c = tl.load(q + row[:, None] * K + rk[None, :], mask=ck_mask, other=0.0).to(tl.float32)
    k_c = tl.load(k + row[:, None] * K + rk[None, :], mask=ck_mask, other=0.0).to(tl.float32)
    u_c = tl.load(u + seq[:, None] * V + rv[None, :], mask=cv_mask, other=0.0)
    gamma, _ = _chunk_gates(gam, pid_bh, pid_n, T, C)
    s = tl.load(
        states + (pid_bh * N + pid_n) * K * V + rk[:, None] * V + rv[None, :],
        mask=(rk < K)[:, None] & (rv < V)[None, :],
        other=0.0,
    )
    scores = tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PRECISION) * _decay(gamma, 0, C)
    o_c = tl.dot(q_c * tl.exp(gamma)[:, None], s, input_precision=DOT_PRECISION)
    o_c += tl.dot(scores, u_c, input_precision=DOT_PRECISION)
    tl.store(o + row[:, None] * V + rv[None, :], scale * o_c, mask=cv_mask)


@triton.jit
def _state_bwd_kernel(
    q,
    k,
    do,
    gam,
    w,
    ds_final,
    ds_after,
    du,
    ds0,
    scale,
    T,
    H,
    K,
    V,
    N,
    DOT_PRECISION: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """Reverse pass per V-block: writes the gradient of the state leaving each chunk and
    dU = scale P^T dO + Kd dS_next; dS = scale Qg^T dO + e^Gamma_C dS_next - W^T dU."""
    pid_bh, pid_v = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    rc, rk = tl.arange(0, C), tl.arange(0, BK)
    rv = pid_v * BV + tl.arange(0, BV)
    kv_mask = (rk < K)[:, None] & (rv < V)[None, :]
    kv_off = rk[:, None] * V + rv[None, :]
    ds = tl.load(ds_final + pid_bh * K * V + kv_off, mask=kv_mask, other=0.0)
    for i in range(N):
        n = N - 1 - i
        tl.store(ds_after + (pid_bh * N + n) * K * V + kv_off, ds, mask=kv_mask)
        t = n * C + rc
        t_ok = t < T
        row = (b * T + t) * H + h
        seq = pid_bh * T + t
        ck_mask = t_ok[:, None] & (rk < K)[None, :]
        cv_mask = t_ok[:, None] & (rv < V)[None, :]
        q_c = tl.load(q + row[:, None] * K + rk[None, :], mask=ck_mask, other=0.0).to(tl.float32)
        k_c = tl.load(k + row[:, None] * K + rk[None, :], mask=ck_mask, other=0.0).to(tl.float32)
        do_c = tl.load(do + row[:, None] * V + rv[None, :], mask=cv_mask, other=0.0).to(tl.float32)
        w_c = tl.load(w + seq[:, None] * K + rk[None, :], mask=ck_mask, other=0.0)
        gamma, g_last = _chunk_gates(gam, pid_bh, n, T, C)
        scores = tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PRECISION) * _decay(gamma, 0, C)
        k_end = k_c * tl.exp(g_last - gamma)[:, None]
        du_c = scale * tl.dot(tl.trans(scores), do_c, input_precision=DOT_PRECISION)
        du_c += tl.dot(k_end, ds, input_precision=DOT_PRECISION)
        tl.store(du + seq[:, None] * V + rv[None, :], du_c, mask=cv_mask)
        q_in = q_c * tl.exp(gamma)[:, None]
        ds = (
            scale * tl.dot(tl.trans(q_in), do_c, input_precision=DOT_PRECISION)
            + tl.exp(g_last) * ds
            - tl.dot(tl.trans(w_c), du_c, input_precision=DOT_PRECISION)
        )
    tl.store(ds0 + pid_bh * K * V + kv_off, ds, mask=kv_mask)


@triton.jit
def _grad_kernel(
    q,
    k,
    v,
    beta,
    do,
    gam,
    tm,
    states,
    ds_after,
    u,
    du,
    dq,
    dk,
    dv,
    dbeta,
    dg,
    scale,
    T,
    H,
    K,
    V,
    N,
    HAS_GATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
    """Every input gradient of one chunk, the gates held fixed except for dg, which is the
    reverse cumsum of the gradient w.r.t. the cumulative log-gates Gamma. The value dim is
    walked in blocks of BV, accumulating the products that sum over it."""
    pid_n, pid_bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, h = pid_bh // H, pid_bh % H
    rc, rk = tl.arange(0, C), tl.arange(0, BK)
    t = pid_n * C + rc
    t_ok = t < T
    row = (b * T + t) * H + h
    seq = pid_bh * T + t
    ck_mask = t_ok[:, None] & (rk < K)[None, :]
    q_c = tl.load(q + row[:, None] * K + rk[None, :], mask=ck_mask, other=0.0).to(tl.float32)
    k_c = tl.load(k + row[:, None] * K + rk[None, :], mask=ck_mask, other=0.0).to(tl.float32)
    beta_c = tl.load(beta + row, mask=t_ok, other=0.0).to(tl.float32)
    gamma, g_last = _chunk_gates(gam, pid_bh, pid_n, T, C)
    inv_t = tl.trans(tl.load(tm + (pid_bh * N + pid_n) * C * C + rc[:, None] * C + rc[None, :]))

    # Sums over the value dim: dscores = dO U^T, dq_in = dO S^T (w.r.t. Q e^Gamma),
    # dk_end = U dS_next^T (w.r.t. K e^(Gamma_C - Gamma)), dw = -dU S^T, dtm_v = dU bv^T.
    dscores = tl.zeros([C, C], dtype=tl.float32)
    dtm = tl.zeros([C, C], dtype=tl.float32)
    dq_in = tl.zeros([C, BK], dtype=tl.float32)
    dk_end = tl.zeros([C, BK], dtype=tl.float32)
    dw = tl.zeros([C, BK], dtype=tl.float32)
    dbeta_c = tl.zeros([C], dtype=tl.float32)
    carry = tl.zeros([BK], dtype=tl.float32)
    for v_start in range(0, V, BV):
        rv = v_start + tl.arange(0, BV)
        cv_mask = t_ok[:, None] & (rv < V)[None, :]
        kv_mask = (rk < K)[:, None] & (rv < V)[None, :]
        kv_off = (pid_bh * N + pid_n) * K * V + rk[:, None] * V + rv[None, :]
        v_c = tl.load(v + row[:, None] * V + rv[None, :], mask=cv_mask, other=0.0).to(tl.float32)
        do_c = tl.load(do + row[:, None] * V + rv[None, :], mask=cv_mask, other=0.0).to(tl.float32)
        u_c = tl.load(u + seq[:, None] * V + rv[None, :], mask=cv_mask, other=0.0)
        du_c = tl.load(du + seq[:, None] * V + rv[None, :], mask=cv_mask, other=0.0)
        s = tl.load(states + kv_off, mask=kv_mask, other=0.0)
        ds_next = tl.load(ds_after + kv_off, mask=kv_mask, other=0.0)
        dscores += tl.dot(do_c, tl.trans(u_c), input_precision=DOT_PRECISION)
        dq_in += tl.dot(do_c, tl.trans(s), input_precision=DOT_PRECISION)
        dk_end += tl.dot(u_c, tl.trans(ds_next), input_precision=DOT_PRECISION)
        dw -= tl.dot(du_c, tl.trans(s), input_precision=DOT_PRECISION)
        dtm += tl.dot(du_c, tl.trans(v_c * beta_c[:, None]), input_precision=DOT_PRECISION)
        # U0 = Tm diag(beta) V with dU0 = dU.
        dbv = tl.dot(inv_t, du_c, input_precision=DOT_PRECISION)
        tl.store(dv + row[:, None] * V + rv[None, :], dbv * beta_c[:, None], mask=cv_mask)
        dbeta_c += tl.sum(v_c * dbv, 1)
        if HAS_GATE:
            carry += tl.sum(s * ds_next, 1)
    dscores *= scale
    dq_in *= scale

    g_in = tl.exp(gamma)
    g_end = tl.exp(g_last - gamma)
    decay = _decay(gamma, 0, C)
    kk = tl.dot(k_c, tl.trans(k_c), input_precision=DOT_PRECISION)
    dqk = dscores * decay
    dq_c = tl.dot(dqk, k_c, input_precision=DOT_PRECISION) + dq_in * g_in[:, None]
    dk_c = tl.dot(tl.trans(dqk), q_c, input_precision=DOT_PRECISION) + dk_end * g_end[:, None]

    # Through W = Tm bk and Tm = (I + L)^-1: dTm = dU bv^T + dW bk^T, dL = -Tm^T dTm Tm^T.
    bk = k_c * (beta_c * g_in)[:, None]
    dbk = tl.dot(inv_t, dw, input_precision=DOT_PRECISION)
    dtm += tl.dot(dw, tl.trans(bk), input_precision=DOT_PRECISION)
    dl = -tl.dot(
        tl.dot(inv_t, dtm, input_precision=DOT_PRECISION), inv_t, input_precision=DOT_PRECISION
    )
    dl = tl.where(rc[:, None] > rc[None, :], dl, 0.0) * decay
    dkk = dl * beta_c[:, None]
    dbeta_c += tl.sum(k_c * dbk, 1) * g_in + tl.sum(dl * kk, 1)
    dk_c += dbk * (beta_c * g_in)[:, None]
    dk_c += tl.dot(dkk + tl.trans(dkk), k_c, input_precision=DOT_PRECISION)

    tl.store(dq + row[:, None] * K + rk[None, :], dq_c, mask=ck_mask)
    tl.store(dk + row[:, None] * K + rk[None, :], dk_c, mask=ck_mask)
    tl.store(dbeta + row, dbeta_c, mask=t_ok)
    if HAS_GATE:
        # A decay e^(Gamma_i - Gamma_j) with gradient r sends r x decay to Gamma_i and minus
        # that to Gamma_j, so contributions that must cancel do so exactly.
        scores = tl.dot(q_c, tl.trans(k_c), input_precision=DOT_PRECISION) * decay
        rel = dscores * scores + dkk * kk
        end_term = tl.sum(k_c * g_end[:, None] * dk_end, 1)
        dgamma = (
            tl.sum(rel, 1)
            - tl.sum(rel, 0)
            + tl.sum(q_c * g_in[:, None] * dq_in, 1)
            + tl.sum(bk * dbk, 1)
            - end_term
        )
        last = tl.sum(end_term, 0) + tl.exp(g_last) * tl.sum(carry, 0)
        dgamma += tl.where(rc == C - 1, last, 0.0)
        tl.store(dg + row, tl.cumsum(dgamma, 0, reverse=True), mask=t_ok)


def _prepare(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    store_tm: bool,
) -> dict:
    """Runs the WY and forward state kernels; returns the buffers later kernels read."""
    b, t, h, kd = k.shape
    vd = v.shape[-1]
    n = num_chunks(t)
    precision = dot_precision(q)
    gam = k.new_empty((b, h, t), dtype=torch.float32)
    w = k.new_empty((b, h, t, kd), dtype=torch.float32)
    u0 = k.new_empty((b, h, t, vd), dtype=torch.float32)
    tm = k.new_empty((b, h, n, CHUNK, CHUNK), dtype=torch.float32) if store_tm else gam
    _wy_kernel[(n, b * h)](
        k,
        v,
        beta,
        gam if g is None else g,
        gam,
        w,
        u0,
        tm,
        t,
        h,
        kd,
        vd,
        n,
        HAS_GATE=g is not None,
        STORE_TM=store_tm,
        DOT_PRECISION=precision,
        C=CHUNK,
        LOG2_C=CHUNK.bit_length() - 1,
        BK=pad_dim(kd),
        BV=pad_dim(vd),
    )
    states = k.new_empty((b, h, n, kd, vd), dtype=torch.float32)
    u = k.new_empty((b, h, t, vd), dtype=torch.float32)
    final = k.new_empty((b, h, kd, vd), dtype=torch.float32)
    block = min(BLOCK_V, pad_dim(vd))
    _state_fwd_kernel[(b * h, triton.cdiv(vd, block))](
        k,
        gam,
        w,
        u0,
        final if initial_state is None else initial_state,
        states,
        u,
        final,
        t,
        h,
        kd,
        vd,
        n,
        HAS_INITIAL_STATE=initial_state is not None,
        DOT_PRECISION=precision,
        C=CHUNK,
        BK=pad_dim(kd),
        BV=block,
    )
    return dict(gam=gam, w=w, tm=tm, states=states, u=u, final=final, n=n, precision=precision)


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
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    g, initial_state = (None if x is None else x.contiguous() for x in (g, initial_state))
    b, t, h, kd = k.shape
    vd = v.shape[-1]
    p = _prepare(q, k, v, beta, g, initial_state, store_tm=False)
    o = torch.empty(b, t, h, vd, device=q.device, dtype=torch.float32)
    _output_kernel[(p["n"], b * h)](
        q,
        k,
        p["gam"],
        p["states"],
        p["u"],
        o,
        scale,
        t,
        h,
        kd,
        vd,
        p["n"],
        DOT_PRECISION=p["precision"],
        C=CHUNK,
        BK=pad_dim(kd),
        BV=pad_dim(vd),
    )
    return o, p["final"]


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
    q, k, v, beta, do = (x.contiguous() for x in (q, k, v, beta, do))
    g, initial_state = (None if x is None else x.contiguous() for x in (g, initial_state))
    dfinal = dfinal.float().contiguous()
    b, t, h, kd = k.shape
    vd = v.shape[-1]
    p = _prepare(q, k, v, beta, g, initial_state, store_tm=True)
    n = p["n"]
    ds_after = torch.empty_like(p["states"])
    du = torch.empty_like(p["u"])
    ds0 = q.new_empty((b, h, kd, vd), dtype=torch.float32)
    block = min(BLOCK_V, pad_dim(vd))
    _state_bwd_kernel[(b * h, triton.cdiv(vd, block))](
        q,
        k,
        do,
        p["gam"],
        p["w"],
        dfinal,
        ds_after,
        du,
        ds0,
        scale,
        t,
        h,
        kd,
        vd,
        n,
        DOT_PRECISION=p["precision"],
        C=CHUNK,
        BK=pad_dim(kd),
        BV=block,
    )
    dq = q.new_empty((b, t, h, kd), dtype=torch.float32)
    dk = q.new_empty((b, t, h, kd), dtype=torch.float32)
    dv = q.new_empty((b, t, h, vd), dtype=torch.float32)
    dbeta = q.new_empty((b, t, h), dtype=torch.float32)
    dg = None if g is None else q.new_empty((b, t, h), dtype=torch.float32)
    _grad_kernel[(n, b * h)](
        q,
        k,
        v,
        beta,
        do,
        p["gam"],
        p["tm"],
        p["states"],
        ds_after,
        p["u"],
        du,
        dq,
        dk,
        dv,
        dbeta,
        dbeta if dg is None else dg,
        scale,
        t,
        h,
        kd,
        vd,
        n,
        HAS_GATE=g is not None,
        DOT_PRECISION=p["precision"],
        C=CHUNK,
        BK=pad_dim(kd),
        BV=min(pad_dim(vd), max(MIN_DIM, GRAD_STATE_TILE // pad_dim(kd))),
        num_stages=1,
    )
    return dq, dk, dv, dbeta, dg, None if initial_state is None else ds0
