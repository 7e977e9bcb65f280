"""Chunkwise linear attention with optional per-token scalar log-gates, in Triton.

Same math and contract as `torch_chunk` (see there and `hyla.kernels.autograd`):

    O      = scale [(Q ⊙ e^Γ) S + ((Q K^T) ⊙ D) V]
    S_next = e^{Γ_C} S + (K ⊙ e^{Γ_C - Γ})^T V

Kernels: a state pass over chunks (one program per batch*head and V block) that writes
the state entering every chunk; an output kernel (one program per chunk, batch*head and V
block); for the backward, the same state pass, a reverse pass for the state gradients and
one gradient kernel per chunk and batch*head. Inputs of any float dtype are loaded as they
are and everything is computed in fp32; head dims are padded to powers of two >= 16 by
masked loads. The in-chunk cumulative log-gates are prepared by torch on the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from hyla.kernels.chunking import CHUNK, num_chunks
from hyla.kernels.triton_common import dot_precision, pad_dim

BLOCK_V = 64  # V is split into blocks of at most this many columns
MAX_BLOCK_K = 256  # the whole key dim sits in one block
NUM_WARPS = 4
GRAD_NUM_WARPS = 8  # the gradient kernel holds five [C, BK] fp32 tiles at once


# Offsets are int64 (row indices are cast once): no overflow on long sequences, and the
# interpreter skips its int32 overflow checks.


@triton.jit
def _state_pass_kernel(
    k_ptr,
    v_ptr,
    gam_ptr,
    s0_ptr,
    states_ptr,
    final_ptr,
    T,
    H,
    K,
    V,
    N,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """S_{n+1} = e^{Γ_C} S_n + (K ⊙ e^{Γ_C - Γ})^T V; stores every S_n and the last state."""
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.arange(0, C).to(tl.int64)
    ks = tl.arange(0, BK).to(tl.int64)
    vs = tl.program_id(1).to(tl.int64) * BV + tl.arange(0, BV)
    state_off = ks[:, None] * V + vs[None, :]
    state_mask = (ks[:, None] < K) & (vs[None, :] < V)
    if HAS_INITIAL_STATE:
        state = tl.load(s0_ptr + bh * K * V + state_off, mask=state_mask, other=0.0)
    else:
        state = tl.full([BK, BV], 0.0, tl.float32)
    k_ptrs = k_ptr + (b * T + rows[:, None]) * H * K + h * K + ks[None, :]
    v_ptrs = v_ptr + (b * T + rows[:, None]) * H * V + h * V + vs[None, :]
    states_ptrs = states_ptr + bh * N * K * V + state_off
    gam_ptrs = gam_ptr + bh * N * C + rows
    last_ptr = gam_ptr + bh * N * C + C - 1
    k_step, v_step, state_step = C * H * K, C * H * V, K * V
    t = rows
    for _ in range(N):
        tl.store(states_ptrs, state, mask=state_mask)
        keys = tl.load(k_ptrs, mask=(t[:, None] < T) & (ks[None, :] < K), other=0.0)
        values = tl.load(v_ptrs, mask=(t[:, None] < T) & (vs[None, :] < V), other=0.0)
        keys = keys.to(tl.float32)
        if HAS_GATE:
            gam = tl.load(gam_ptrs)
            last = tl.load(last_ptr)
            keys = keys * tl.exp(last - gam)[:, None]
            state = state * tl.exp(last)
            gam_ptrs += C
            last_ptr += C
        state = tl.dot(tl.trans(keys), values.to(tl.float32), state, input_precision=DOT_PRECISION)
        k_ptrs += k_step
        v_ptrs += v_step
        states_ptrs += state_step
        t += C
    tl.store(final_ptr + bh * K * V + state_off, state, mask=state_mask)


@triton.jit
def _output_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    gam_ptr,
    states_ptr,
    o_ptr,
    scale,
    T,
    H,
    K,
    V,
    N,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One chunk's outputs for one V block: inter-chunk (from S) plus masked intra-chunk."""
    n = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.arange(0, C).to(tl.int64)
    ks = tl.arange(0, BK).to(tl.int64)
    vs = tl.program_id(2).to(tl.int64) * BV + tl.arange(0, BV)
    t = n * C + rows
    k_mask = (t[:, None] < T) & (ks[None, :] < K)
    v_mask = (t[:, None] < T) & (vs[None, :] < V)
    qk_off = (b * T + t[:, None]) * H * K + h * K + ks[None, :]
    v_off = (b * T + t[:, None]) * H * V + h * V + vs[None, :]
    queries = tl.load(q_ptr + qk_off, mask=k_mask, other=0.0).to(tl.float32) * scale
    keys = tl.load(k_ptr + qk_off, mask=k_mask, other=0.0).to(tl.float32)
    values = tl.load(v_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)
    state = tl.load(
        states_ptr + (bh * N + n) * K * V + ks[:, None] * V + vs[None, :],
        mask=(ks[:, None] < K) & (vs[None, :] < V),
        other=0.0,
    )
    causal = rows[:, None] >= rows[None, :]
    scores = tl.dot(queries, tl.trans(keys), input_precision=DOT_PRECISION)
    if HAS_GATE:
        gam = tl.load(gam_ptr + bh * N * C + t)
        scores = scores * tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float("-inf")))
        queries = queries * tl.exp(gam)[:, None]
    else:
        scores = tl.where(causal, scores, 0.0)
    out = tl.dot(queries, state, input_precision=DOT_PRECISION)
    out = tl.dot(scores, values, out, input_precision=DOT_PRECISION)
    tl.store(o_ptr + v_off, out, mask=v_mask)


@triton.jit
def _state_grad_kernel(
    q_ptr,
    do_ptr,
    gam_ptr,
    dfinal_ptr,
    dstates_ptr,
    dinit_ptr,
    scale,
    T,
    H,
    K,
    V,
    N,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dS_n = e^{Γ_C} dS_{n+1} + scale (Q ⊙ e^Γ)^T dO from dS_N = dfinal, in reverse.

    Stores the gradient of the state leaving every chunk, and dS_0 when there is an
    initial state.
    """
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.arange(0, C).to(tl.int64)
    ks = tl.arange(0, BK).to(tl.int64)
    vs = tl.program_id(1).to(tl.int64) * BV + tl.arange(0, BV)
    state_off = ks[:, None] * V + vs[None, :]
    state_mask = (ks[:, None] < K) & (vs[None, :] < V)
    grad = tl.load(dfinal_ptr + bh * K * V + state_off, mask=state_mask, other=0.0)
    t = (N - 1) * C + rows
    q_ptrs = q_ptr + (b * T + t[:, None]) * H * K + h * K + ks[None, :]
    do_ptrs = do_ptr + (b * T + t[:, None]) * H * V + h * V + vs[None, :]
    dstates_ptrs = dstates_ptr + (bh * N + N - 1) * K * V + state_off
    gam_ptrs = gam_ptr + bh * N * C + t
    last_ptr = gam_ptr + bh * N * C + N * C - 1
    q_step, do_step, state_step = C * H * K, C * H * V, K * V
    for _ in range(N):
        tl.store(dstates_ptrs, grad, mask=state_mask)
        queries = tl.load(q_ptrs, mask=(t[:, None] < T) & (ks[None, :] < K), other=0.0)
        dout = tl.load(do_ptrs, mask=(t[:, None] < T) & (vs[None, :] < V), other=0.0)
        queries = queries.to(tl.float32) * scale
        if HAS_GATE:
            gam = tl.load(gam_ptrs)
            last = tl.load(last_ptr)
            queries = queries * tl.exp(gam)[:, None]
            grad = grad * tl.exp(last)
            gam_ptrs -= C
            last_ptr -= C
        grad = tl.dot(tl.trans(queries), dout.to(tl.float32), grad, input_precision=DOT_PRECISION)
        q_ptrs -= q_step
        do_ptrs -= do_step
        dstates_ptrs -= state_step
        t -= C
    if HAS_INITIAL_STATE:
        tl.store(dinit_ptr + bh * K * V + state_off, grad, mask=state_mask)


@triton.jit
def _grad_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    gam_ptr,
    states_ptr,
    dstates_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dg_ptr,
    scale,
    T,
    H,
    K,
    V,
    N,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_GATE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq, dk, dv and dg of one chunk, given the state S entering it and the gradient R of
    the state leaving it. V is walked in blocks; dv is finished per block, the rest after.

    dg_t = <e^{g_t} S_{t-1}, dS_t> is split into four sums that are formed without
    cancellation (see torch_chunk._gate_grad): e^{Γ_C} <S, R>; over i >= t the rows of
    (Q ⊙ e^Γ) ⊙ (dO S^T); over j < t the rows of (K ⊙ e^{Γ_C - Γ}) ⊙ (V R^T); and over
    j < t <= i the entries of ((Q K^T) ⊙ D) ⊙ (dO V^T).
    """
    n = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tl.arange(0, C).to(tl.int64)
    ks = tl.arange(0, BK).to(tl.int64)
    t = n * C + rows
    k_mask = (t[:, None] < T) & (ks[None, :] < K)
    qk_off = (b * T + t[:, None]) * H * K + h * K + ks[None, :]
    queries = tl.load(q_ptr + qk_off, mask=k_mask, other=0.0).to(tl.float32) * scale
    keys = tl.load(k_ptr + qk_off, mask=k_mask, other=0.0).to(tl.float32)
    causal = rows[:, None] >= rows[None, :]
    if HAS_GATE:
        gam = tl.load(gam_ptr + bh * N * C + t)
        last = tl.load(gam_ptr + bh * N * C + n * C + C - 1)
        decay = tl.exp(tl.where(causal, gam[:, None] - gam[None, :], float("-inf")))
        q_decay = tl.exp(gam)[:, None]
        k_decay = tl.exp(last - gam)[:, None]
    else:
        decay = tl.where(causal, 1.0, 0.0)
        q_decay = tl.full([C, 1], 1.0, tl.float32)
        k_decay = tl.full([C, 1], 1.0, tl.float32)
    scores = tl.dot(queries, tl.trans(keys), input_precision=DOT_PRECISION) * decay
    keys_in = keys * k_decay

    do_v = tl.full([C, C], 0.0, tl.float32)
    dq_inter = tl.full([C, BK], 0.0, tl.float32)
    dk_state = tl.full([C, BK], 0.0, tl.float32)
    carried = tl.full([BK, BV], 0.0, tl.float32)
    vs = tl.arange(0, BV).to(tl.int64)
    v_off = (b * T + t[:, None]) * H * V + h * V + vs[None, :]
    state_off = (bh * N + n) * K * V + ks[:, None] * V + vs[None, :]
    for _ in range(0, V, BV):
        v_mask = (t[:, None] < T) & (vs[None, :] < V)
        state_mask = (ks[:, None] < K) & (vs[None, :] < V)
        values = tl.load(v_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)
        dout = tl.load(do_ptr + v_off, mask=v_mask, other=0.0).to(tl.float32)
        state = tl.load(states_ptr + state_off, mask=state_mask, other=0.0)
        dstate = tl.load(dstates_ptr + state_off, mask=state_mask, other=0.0)
        do_v = tl.dot(dout, tl.trans(values), do_v, input_precision=DOT_PRECISION)
        dq_inter = tl.dot(dout, tl.trans(state), dq_inter, input_precision=DOT_PRECISION)
        dk_state = tl.dot(values, tl.trans(dstate), dk_state, input_precision=DOT_PRECISION)
        if HAS_GATE:
            carried += state * dstate
        dv = tl.dot(tl.trans(scores), dout, input_precision=DOT_PRECISION)
        dv = tl.dot(keys_in, dstate, dv, input_precision=DOT_PRECISION)
        tl.store(dv_ptr + v_off, dv, mask=v_mask)
        v_off += BV
        state_off += BV
        vs += BV

    dscores = do_v * decay
    dqs = tl.dot(dscores, keys, dq_inter * q_decay, input_precision=DOT_PRECISION)
    dk = tl.dot(tl.trans(dscores), queries, dk_state * k_decay, input_precision=DOT_PRECISION)
    tl.store(dq_ptr + qk_off, dqs * scale, mask=k_mask)
    tl.store(dk_ptr + qk_off, dk, mask=k_mask)
    if HAS_GATE:
        # Sums over i >= t and j < t as products with triangular 0/1 matrices: tl.sum is
        # slow in the interpreter, tl.dot is not, and the rows are summed once at the end.
        upper = tl.where(rows[:, None] <= rows[None, :], 1.0, 0.0)  # [t, i]: i >= t
        earlier = 1.0 - upper  # [t, j]: j < t
        by_key = tl.dot(upper, queries * q_decay * dq_inter, input_precision=DOT_PRECISION)
        by_key = tl.dot(earlier, keys_in * dk_state, by_key, input_precision=DOT_PRECISION)
        pairs = tl.dot(upper, scores * do_v, input_precision=DOT_PRECISION) * earlier
        dg = tl.sum(by_key, axis=1) + tl.sum(pairs, axis=1) + tl.sum(carried) * tl.exp(last)
        tl.store(dg_ptr + (b * T + t) * H + h, dg, mask=t < T)


def _block_sizes(k_dim: int, v_dim: int) -> tuple[int, int]:
    block_k = pad_dim(k_dim)
    if block_k > MAX_BLOCK_K:
        raise ValueError(f"the triton linear_attn kernels take K <= {MAX_BLOCK_K}, got {k_dim}")
    return block_k, min(BLOCK_V, pad_dim(v_dim))


def _chunk_gates(g: Tensor | None, n: int) -> Tensor | None:
    """[B, T, H] log-gates -> fp32 [B, H, N * C] inclusive cumulative sums inside each chunk
    (zero gates past T: the padding is the identity)."""
    if g is None:
        return None
    b, t, h = g.shape
    g = F.pad(g.float(), (0, 0, 0, n * CHUNK - t))
    return g.transpose(1, 2).reshape(b, h, n, CHUNK).cumsum(-1).reshape(b, h, n * CHUNK)


def _states(
    k: Tensor, v: Tensor, gam: Tensor | None, initial_state: Tensor | None, n: int
) -> tuple[Tensor, Tensor]:
    """(the state entering each chunk [B, H, N, K, V], the final state [B, H, K, V])."""
    b, t, h, k_dim = k.shape
    v_dim = v.shape[-1]
    block_k, block_v = _block_sizes(k_dim, v_dim)
    states = k.new_empty((b, h, n, k_dim, v_dim), dtype=torch.float32)
    final = k.new_empty((b, h, k_dim, v_dim), dtype=torch.float32)
    s0 = initial_state.float().contiguous() if initial_state is not None else final
    _state_pass_kernel[(b * h, triton.cdiv(v_dim, block_v))](
        k,
        v,
        k if gam is None else gam,
        s0,
        states,
        final,
        t,
        h,
        k_dim,
        v_dim,
        n,
        C=CHUNK,
        BK=block_k,
        BV=block_v,
        HAS_GATE=gam is not None,
        HAS_INITIAL_STATE=initial_state is not None,
        DOT_PRECISION=dot_precision(k),
        num_warps=NUM_WARPS,
    )
    return states, final


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    initial_state: Tensor | None,
    *,
    scale: float,
) -> tuple[Tensor, Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, t, h, k_dim = q.shape
    v_dim = v.shape[-1]
    n = num_chunks(t)
    block_k, block_v = _block_sizes(k_dim, v_dim)
    gam = _chunk_gates(g, n)
    states, final = _states(k, v, gam, initial_state, n)
    o = q.new_empty((b, t, h, v_dim), dtype=torch.float32)
    _output_kernel[(n, b * h, triton.cdiv(v_dim, block_v))](
        q,
        k,
        v,
        q if gam is None else gam,
        states,
        o,
        scale,
        t,
        h,
        k_dim,
        v_dim,
        n,
        C=CHUNK,
        BK=block_k,
        BV=block_v,
        HAS_GATE=gam is not None,
        DOT_PRECISION=dot_precision(q),
        num_warps=NUM_WARPS,
    )
    return o, final


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
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    b, t, h, k_dim = q.shape
    v_dim = v.shape[-1]
    n = num_chunks(t)
    block_k, block_v = _block_sizes(k_dim, v_dim)
    gam = _chunk_gates(g, n)
    gates = q if gam is None else gam
    precision = dot_precision(q)
    states, _ = _states(k, v, gam, initial_state, n)

    dstates = torch.empty_like(states)
    dfinal = dfinal.float().contiguous()
    dinitial = torch.empty_like(dfinal) if initial_state is not None else None
    _state_grad_kernel[(b * h, triton.cdiv(v_dim, block_v))](
        q,
        do,
        gates,
        dfinal,
        dstates,
        dfinal if dinitial is None else dinitial,
        scale,
        t,
        h,
        k_dim,
        v_dim,
        n,
        C=CHUNK,
        BK=block_k,
        BV=block_v,
        HAS_GATE=gam is not None,
        HAS_INITIAL_STATE=dinitial is not None,
        DOT_PRECISION=precision,
        num_warps=NUM_WARPS,
    )

    dq = q.new_empty(q.shape, dtype=torch.float32)
    dk = q.new_empty(k.shape, dtype=torch.float32)
    dv = q.new_empty(v.shape, dtype=torch.float32)
    dg = q.new_empty((b, t, h), dtype=torch.float32) if gam is not None else None
    _grad_kernel[(n, b * h)](
        q,
        k,
        v,
        do,
        gates,
        states,
        dstates,
        dq,
        dk,
        dv,
        dq if dg is None else dg,
        scale,
        t,
        h,
        k_dim,
        v_dim,
        n,
        C=CHUNK,
        BK=block_k,
        BV=block_v,
        HAS_GATE=gam is not None,
        DOT_PRECISION=precision,
        num_warps=GRAD_NUM_WARPS,
    )
    return dq, dk, dv, dg, dinitial
