"""GLA chunkwise in Triton (contract in `hyla.kernels.autograd`; math as in `torch_chunk`).

Kernels, each on [B, T, H, D] tensors made contiguous (time stride H * D):
- `_gate_cumsum_kernel`: inclusive cumulative log-gates inside each chunk, G [B, T, H, K].
- `_state_kernel`: one program per (V block, batch * head) carries the state over the chunks
  and writes the state entering each chunk to an fp32 buffer [B, H, N, K, V].
- `_output_kernel`: one program per (chunk, batch * head): inter-chunk term plus the
  intra-chunk scores A [C, C], built from sub-chunks of SUB tokens as in `torch_chunk`.
  For each key sub-chunk b, one whole-chunk matmul gives its blocks with every later query
  sub-chunk (decays relative to the last token of b, zeroed on the other rows). Diagonal
  blocks are summed exactly over a [SUB, SUB, K] tile and put in place with one-hot
  matmuls (exact in fp32), since Triton cannot slice a register tile.
- backward: the same state pass (recomputed), `_dstate_kernel` (the reverse pass for the
  gradient of the state leaving each chunk) and `_grad_kernel` for dq, dk, dv per chunk.
  The gate gradient comes from dq and dk (see `torch_chunk.backward`) with a torch cumsum.

Head dims are padded to powers of two >= 16 with masked loads and stores; tokens past T
are masked, and every exponent is masked to -inf where it is not a difference of
cumulative log-gates that is <= 0. Inputs are loaded in their dtype and computed in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from hyla.kernels.chunking import CHUNK, num_chunks
from hyla.kernels.triton_common import dot_precision, pad_dim

SUB = 16
STATE_BLOCK_V = 64
STATE_WARPS = 4
CHUNK_WARPS = 8


@triton.jit
def _tile(row0, T, stride_t, cols, n_cols, ROWS: tl.constexpr):
    """(offsets, mask) of rows row0 .. row0 + ROWS of a [T, n_cols] slice; zero past T."""
    rows = row0 + tl.arange(0, ROWS)
    mask = (rows[:, None] < T) & (cols[None, :] < n_cols)
    return rows[:, None].to(tl.int64) * stride_t + cols[None, :], mask


@triton.jit
def _load_row(base, row, T, stride_t, cols, n_cols):
    """One row (clamped to the last token) of a [T, n_cols] slice as fp32."""
    row = tl.minimum(row, T - 1).to(tl.int64)
    return tl.load(base + row * stride_t + cols, mask=cols < n_cols, other=0.0).to(tl.float32)


@triton.jit
def _diag_decay(g, row0, T, ROWS: tl.constexpr):
    """[ROWS, ROWS, K] tile exp(G_i - G_j) for j <= i < T, zero elsewhere."""
    rows = row0 + tl.arange(0, ROWS)
    idx = tl.arange(0, ROWS)
    keep = (idx[:, None] >= idx[None, :]) & (rows[:, None] < T)
    return tl.exp(tl.where(keep[:, :, None], g[:, None, :] - g[None, :, :], float("-inf")))


@triton.jit
def _gate_cumsum_kernel(
    g,
    gcum,
    T,
    H,
    K,
    C: tl.constexpr,
    BK: tl.constexpr,
):
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    base = (b.to(tl.int64) * T * H + h) * K
    cols = tl.arange(0, BK)
    offs, mask = _tile(n * C, T, H * K, cols, K, C)
    tile = tl.load(g + base + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gcum + base + offs, tl.cumsum(tile, axis=0), mask=mask)


@triton.jit
def _state_kernel(
    k,
    v,
    gcum,
    h0,
    states,
    final,
    T,
    H,
    K,
    V,
    N,
    HAS_INITIAL_STATE: tl.constexpr,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """S_next = e^(G_C) S + (K e^(G_C - G))^T V over the chunks; stores each entering S."""
    vb, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    k_base = (b.to(tl.int64) * T * H + h) * K
    v_base = (b.to(tl.int64) * T * H + h) * V
    kc = tl.arange(0, BK)
    vc = vb * BV + tl.arange(0, BV)
    s_offs = kc[:, None] * V + vc[None, :]
    s_mask = (kc[:, None] < K) & (vc[None, :] < V)
    state = tl.zeros((BK, BV), dtype=tl.float32)
    if HAS_INITIAL_STATE:
        state = tl.load(h0 + bh.to(tl.int64) * K * V + s_offs, mask=s_mask, other=0.0)
    for n in range(N):
        tl.store(states + (bh.to(tl.int64) * N + n) * K * V + s_offs, state, mask=s_mask)
        t0 = n * C
        g_last = _load_row(gcum + k_base, t0 + C - 1, T, H * K, kc, K)
        k_offs, k_mask = _tile(t0, T, H * K, kc, K, C)
        v_offs, v_mask = _tile(t0, T, H * V, vc, V, C)
        g_tile = tl.load(gcum + k_base + k_offs, mask=k_mask, other=0.0)
        k_tile = tl.load(k + k_base + k_offs, mask=k_mask, other=0.0).to(tl.float32)
        v_tile = tl.load(v + v_base + v_offs, mask=v_mask, other=0.0).to(tl.float32)
        # Rows past T load zero gates and keys, so the exponent stays <= 0 there too.
        k_dec = k_tile * tl.exp(g_last[None, :] - g_tile)
        state = state * tl.exp(g_last)[:, None]
        state += tl.dot(tl.trans(k_dec), v_tile, input_precision=DOT_PRECISION)
    tl.store(final + bh.to(tl.int64) * K * V + s_offs, state, mask=s_mask)


@triton.jit
def _dstate_kernel(
    q,
    do,
    gcum,
    dfinal,
    dstates,
    dh0,
    scale,
    T,
    H,
    K,
    V,
    N,
    C: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dS_prev = e^(G_C) dS + scale (Q e^G)^T dO backwards over the chunks; stores each dS
    (the gradient of the state leaving the chunk) and the initial state's gradient."""
    vb, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    k_base = (b.to(tl.int64) * T * H + h) * K
    v_base = (b.to(tl.int64) * T * H + h) * V
    kc = tl.arange(0, BK)
    vc = vb * BV + tl.arange(0, BV)
    s_offs = kc[:, None] * V + vc[None, :]
    s_mask = (kc[:, None] < K) & (vc[None, :] < V)
    dstate = tl.load(dfinal + bh.to(tl.int64) * K * V + s_offs, mask=s_mask, other=0.0)
    for i in range(N):
        n = N - 1 - i
        tl.store(dstates + (bh.to(tl.int64) * N + n) * K * V + s_offs, dstate, mask=s_mask)
        t0 = n * C
        g_last = _load_row(gcum + k_base, t0 + C - 1, T, H * K, kc, K)
        k_offs, k_mask = _tile(t0, T, H * K, kc, K, C)
        v_offs, v_mask = _tile(t0, T, H * V, vc, V, C)
        g_tile = tl.load(gcum + k_base + k_offs, mask=k_mask, other=0.0)
        q_tile = tl.load(q + k_base + k_offs, mask=k_mask, other=0.0).to(tl.float32)
        do_tile = tl.load(do + v_base + v_offs, mask=v_mask, other=0.0).to(tl.float32)
        dstate = dstate * tl.exp(g_last)[:, None]
        q_dec = q_tile * tl.exp(g_tile) * scale
        dstate += tl.dot(tl.trans(q_dec), do_tile, input_precision=DOT_PRECISION)
    tl.store(dh0 + bh.to(tl.int64) * K * V + s_offs, dstate, mask=s_mask)


@triton.jit
def _pair_decays(
    g_c, g_ptr, t0, T, stride_t, kc, K, b: tl.constexpr, C: tl.constexpr, SUBC: tl.constexpr
):
    """Decays for the block of scores between key sub-chunk b and every later query
    sub-chunk, with reference r the last token of b: e^(G_i - G_r) on the later query rows,
    e^(G_r - G_j) on the key rows of b, zero on every other row of the chunk."""
    idx = tl.arange(0, C)
    sub = idx // SUBC
    valid = t0 + idx < T
    ref = _load_row(g_ptr, t0 + (b + 1) * SUBC - 1, T, stride_t, kc, K)[None, :]
    later = ((sub > b) & valid)[:, None]
    own = ((sub == b) & valid)[:, None]
    row_decay = tl.exp(tl.where(later, g_c - ref, float("-inf")))
    col_decay = tl.exp(tl.where(own, ref - g_c, float("-inf")))
    return row_decay, col_decay


@triton.jit
def _placement(a: tl.constexpr, C: tl.constexpr, SUBC: tl.constexpr):
    """One-hot [C, SUBC] matrix putting sub-chunk a's rows in their place in the chunk."""
    idx = tl.arange(0, C)
    return (idx[:, None] == a * SUBC + tl.arange(0, SUBC)[None, :]).to(tl.float32)


@triton.jit
def _output_kernel(
    q,
    k,
    v,
    gcum,
    states,
    o,
    scale,
    T,
    H,
    K,
    V,
    N,
    C: tl.constexpr,
    SUBC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """O = scale [(Q e^G) S + A V] for one chunk; A from sub-chunk blocks (module doc)."""
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    k_base = (b.to(tl.int64) * T * H + h) * K
    v_base = (b.to(tl.int64) * T * H + h) * V
    kc = tl.arange(0, BK)
    vc = tl.arange(0, BV)
    t0 = n * C
    s_offs = kc[:, None] * V + vc[None, :]
    s_mask = (kc[:, None] < K) & (vc[None, :] < V)
    state = tl.load(states + (bh.to(tl.int64) * N + n) * K * V + s_offs, mask=s_mask, other=0.0)
    k_offs, k_mask = _tile(t0, T, H * K, kc, K, C)
    v_offs, v_mask = _tile(t0, T, H * V, vc, V, C)
    q_c = tl.load(q + k_base + k_offs, mask=k_mask, other=0.0).to(tl.float32) * scale
    k_c = tl.load(k + k_base + k_offs, mask=k_mask, other=0.0).to(tl.float32)
    g_c = tl.load(gcum + k_base + k_offs, mask=k_mask, other=0.0)
    v_c = tl.load(v + v_base + v_offs, mask=v_mask, other=0.0).to(tl.float32)

    scores = tl.zeros((C, C), dtype=tl.float32)
    for bb in tl.static_range(C // SUBC - 1):
        row_decay, col_decay = _pair_decays(g_c, gcum + k_base, t0, T, H * K, kc, K, bb, C, SUBC)
        scores += tl.dot(q_c * row_decay, tl.trans(k_c * col_decay), input_precision=DOT_PRECISION)
    for a in tl.static_range(C // SUBC):
        ta = t0 + a * SUBC
        a_offs, a_mask = _tile(ta, T, H * K, kc, K, SUBC)
        q_a = tl.load(q + k_base + a_offs, mask=a_mask, other=0.0).to(tl.float32) * scale
        k_a = tl.load(k + k_base + a_offs, mask=a_mask, other=0.0).to(tl.float32)
        g_a = tl.load(gcum + k_base + a_offs, mask=a_mask, other=0.0)
        block = tl.sum(q_a[:, None, :] * k_a[None, :, :] * _diag_decay(g_a, ta, T, SUBC), axis=2)
        place = _placement(a, C, SUBC)
        block = tl.dot(place, block, input_precision="ieee")
        scores += tl.dot(block, tl.trans(place), input_precision="ieee")

    acc = tl.dot(q_c * tl.exp(g_c), state, input_precision=DOT_PRECISION)
    acc += tl.dot(scores, v_c, input_precision=DOT_PRECISION)
    tl.store(o + v_base + v_offs, acc, mask=v_mask)


@triton.jit
def _grad_kernel(
    q,
    k,
    v,
    gcum,
    do,
    states,
    dstates,
    dq,
    dk,
    dv,
    scale,
    T,
    H,
    K,
    V,
    N,
    C: tl.constexpr,
    SUBC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dq, dk, dv of one chunk, with S entering it and dS the gradient of S leaving it.
    q is scaled on load, so dA = dO V^T and dq is scaled again on store."""
    n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    k_base = (b.to(tl.int64) * T * H + h) * K
    v_base = (b.to(tl.int64) * T * H + h) * V
    kc = tl.arange(0, BK)
    vc = tl.arange(0, BV)
    t0 = n * C
    s_offs = (bh.to(tl.int64) * N + n) * K * V + kc[:, None] * V + vc[None, :]
    s_mask = (kc[:, None] < K) & (vc[None, :] < V)
    state = tl.load(states + s_offs, mask=s_mask, other=0.0)
    dstate = tl.load(dstates + s_offs, mask=s_mask, other=0.0)
    k_offs, k_mask = _tile(t0, T, H * K, kc, K, C)
    v_offs, v_mask = _tile(t0, T, H * V, vc, V, C)
    q_c = tl.load(q + k_base + k_offs, mask=k_mask, other=0.0).to(tl.float32) * scale
    k_c = tl.load(k + k_base + k_offs, mask=k_mask, other=0.0).to(tl.float32)
    g_c = tl.load(gcum + k_base + k_offs, mask=k_mask, other=0.0)
    v_c = tl.load(v + v_base + v_offs, mask=v_mask, other=0.0).to(tl.float32)
    do_c = tl.load(do + v_base + v_offs, mask=v_mask, other=0.0).to(tl.float32)
    g_last = _load_row(gcum + k_base, t0 + C - 1, T, H * K, kc, K)[None, :]

    to_end = tl.exp(g_last - g_c)  # rows past T: zero gates, zero k and v
    dq_c = tl.dot(do_c, tl.trans(state), input_precision=DOT_PRECISION) * tl.exp(g_c)
    dk_c = tl.dot(v_c, tl.trans(dstate), input_precision=DOT_PRECISION) * to_end
    dv_c = tl.dot(k_c * to_end, dstate, input_precision=DOT_PRECISION)

    # Off-diagonal blocks: dscores is not masked, the decays zero every row outside a block.
    dscores = tl.dot(do_c, tl.trans(v_c), input_precision=DOT_PRECISION)
    scores = tl.zeros((C, C), dtype=tl.float32)
    for bb in tl.static_range(C // SUBC - 1):
        row_decay, col_decay = _pair_decays(g_c, gcum + k_base, t0, T, H * K, kc, K, bb, C, SUBC)
        rows = q_c * row_decay
        cols = k_c * col_decay
        scores += tl.dot(rows, tl.trans(cols), input_precision=DOT_PRECISION)
        dq_c += tl.dot(dscores, cols, input_precision=DOT_PRECISION) * row_decay
        dk_c += tl.dot(tl.trans(dscores), rows, input_precision=DOT_PRECISION) * col_decay
    for a in tl.static_range(C // SUBC):
        ta = t0 + a * SUBC
        a_offs, a_mask = _tile(ta, T, H * K, kc, K, SUBC)
        av_offs, av_mask = _tile(ta, T, H * V, vc, V, SUBC)
        q_a = tl.load(q + k_base + a_offs, mask=a_mask, other=0.0).to(tl.float32) * scale
        k_a = tl.load(k + k_base + a_offs, mask=a_mask, other=0.0).to(tl.float32)
        g_a = tl.load(gcum + k_base + a_offs, mask=a_mask, other=0.0)
        v_a = tl.load(v + v_base + av_offs, mask=av_mask, other=0.0).to(tl.float32)
        do_a = tl.load(do + v_base + av_offs, mask=av_mask, other=0.0).to(tl.float32)
        decay = _diag_decay(g_a, ta, T, SUBC)
        block = tl.sum(q_a[:, None, :] * k_a[None, :, :] * decay, axis=2)
        dblock = tl.dot(do_a, tl.trans(v_a), input_precision=DOT_PRECISION)[:, :, None] * decay
        place = _placement(a, C, SUBC)
        block = tl.dot(place, block, input_precision="ieee")
        scores += tl.dot(block, tl.trans(place), input_precision="ieee")
        dq_a = tl.sum(dblock * k_a[None, :, :], axis=1)
        dk_a = tl.sum(dblock * q_a[:, None, :], axis=0)
        dq_c += tl.dot(place, dq_a, input_precision="ieee")
        dk_c += tl.dot(place, dk_a, input_precision="ieee")
    dv_c += tl.dot(tl.trans(scores), do_c, input_precision=DOT_PRECISION)

    tl.store(dq + k_base + k_offs, dq_c * scale, mask=k_mask)
    tl.store(dk + k_base + k_offs, dk_c, mask=k_mask)
    tl.store(dv + v_base + v_offs, dv_c, mask=v_mask)


def _gate_cumsum(gk: Tensor) -> Tensor:
    b, t, h, kd = gk.shape
    gcum = torch.empty(gk.shape, device=gk.device, dtype=torch.float32)
    grid = (num_chunks(t), b * h)
    _gate_cumsum_kernel[grid](gk, gcum, t, h, kd, C=CHUNK, BK=pad_dim(kd), num_warps=STATE_WARPS)
    return gcum


def _states(
    k: Tensor, v: Tensor, gcum: Tensor, initial_state: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(state entering each chunk [B, H, N, K, V], final state [B, H, K, V]), fp32."""
    b, t, h, kd = k.shape
    vd = v.shape[-1]
    n = num_chunks(t)
    states = torch.empty((b, h, n, kd, vd), device=k.device, dtype=torch.float32)
    final = torch.empty((b, h, kd, vd), device=k.device, dtype=torch.float32)
    block_v = min(pad_dim(vd), STATE_BLOCK_V)
    h0 = initial_state.float().contiguous() if initial_state is not None else final
    _state_kernel[(triton.cdiv(vd, block_v), b * h)](
        k,
        v,
        gcum,
        h0,
        states,
        final,
        t,
        h,
        kd,
        vd,
        n,
        HAS_INITIAL_STATE=initial_state is not None,
        C=CHUNK,
        BK=pad_dim(kd),
        BV=block_v,
        DOT_PRECISION=dot_precision(k),
        num_warps=STATE_WARPS,
    )
    return states, final


def forward(
    q: Tensor, k: Tensor, v: Tensor, gk: Tensor, initial_state: Tensor | None, *, scale: float
) -> tuple[Tensor, Tensor]:
    q, k, v, gk = (x.contiguous() for x in (q, k, v, gk))
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    gcum = _gate_cumsum(gk)
    states, final = _states(k, v, gcum, initial_state)
    o = torch.empty((b, t, h, vd), device=q.device, dtype=torch.float32)
    _output_kernel[(states.shape[2], b * h)](
        q,
        k,
        v,
        gcum,
        states,
        o,
        scale,
        t,
        h,
        kd,
        vd,
        states.shape[2],
        C=CHUNK,
        SUBC=SUB,
        BK=pad_dim(kd),
        BV=pad_dim(vd),
        DOT_PRECISION=dot_precision(q),
        num_warps=CHUNK_WARPS,
    )
    return o, final


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
    q, k, v, gk, do = (x.contiguous() for x in (q, k, v, gk, do))
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    gcum = _gate_cumsum(gk)
    states, _ = _states(k, v, gcum, initial_state)
    n = states.shape[2]

    dstates = torch.empty_like(states)
    dh0 = torch.empty((b, h, kd, vd), device=q.device, dtype=torch.float32)
    block_v = min(pad_dim(vd), STATE_BLOCK_V)
    _dstate_kernel[(triton.cdiv(vd, block_v), b * h)](
        q,
        do,
        gcum,
        dfinal.float().contiguous(),
        dstates,
        dh0,
        scale,
        t,
        h,
        kd,
        vd,
        n,
        C=CHUNK,
        BK=pad_dim(kd),
        BV=block_v,
        DOT_PRECISION=dot_precision(q),
        num_warps=STATE_WARPS,
    )

    dq = torch.empty((b, t, h, kd), device=q.device, dtype=torch.float32)
    dk = torch.empty_like(dq)
    dv = torch.empty((b, t, h, vd), device=q.device, dtype=torch.float32)
    _grad_kernel[(n, b * h)](
        q,
        k,
        v,
        gcum,
        do,
        states,
        dstates,
        dq,
        dk,
        dv,
        scale,
        t,
        h,
        kd,
        vd,
        n,
        C=CHUNK,
        SUBC=SUB,
        BK=pad_dim(kd),
        BV=pad_dim(vd),
        DOT_PRECISION=dot_precision(q),
        num_warps=CHUNK_WARPS,
    )

    # dg_t = sum_v S_0 dS_0 - sum_{s < t} (q_s dq_s - k_s dk_s): see torch_chunk.backward.
    db = q.float() * dq - k.float() * dk
    dg = F.pad(db[:, :-1].cumsum(1), (0, 0, 0, 0, 1, 0)).neg()
    if initial_state is None:
        return dq, dk, dv, dg, None
    dg += (initial_state.float() * dh0).sum(-1)[:, None]
    return dq, dk, dv, dg, dh0
