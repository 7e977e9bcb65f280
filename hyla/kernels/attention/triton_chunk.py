"""Tiled softmax attention in Triton: forward, and a flash-attention-2 style backward.

Forward: one program per (query block, batch * query head) walks the key blocks with an
online softmax and writes o and the row log-sum-exp. Backward recomputes the scores from
that lse: one program per (key block, batch * k/v head) accumulates dK and dV over every
query head of its GQA group (so no atomics are needed), and one program per (query block,
batch * query head) accumulates dQ. With a causal mask, key blocks wholly above the
diagonal are never visited, and neither are query blocks wholly before a key block.

Inputs may be fp32, fp16 or bf16; loads keep their dtype, every accumulation is fp32 and
fp32 products use IEEE precision (no TF32). Head dims are padded to a power of two >= 16
by masked loads; ragged sequence ends are masked. Scores are kept in base-2 units
(scaled by log2 e) so that the kernels use exp2; the stored lse is in natural units.
With document ids (DOC_MASK), a key is visible only to queries of its document; a row that
has seen no key yet keeps its running max at -inf and is guarded against inf - inf, and a
row that sees none at all gets o = 0 and lse = +inf (so backward gives it p = 0).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from hyla.kernels.triton_common import dot_precision, pad_dim

BLOCK_M = 64  # query rows per tile
BLOCK_N = 64  # key rows per tile
NUM_WARPS = 4
LOG2E = tl.constexpr(math.log2(math.e))


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, Q_DOC, K_DOC,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h,
    tq, tk, n_heads, group, q_offset, qk_scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    DOC_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """o = softmax(scale q k^T) v for one query block of one head, online over key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    hk = h // group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < tq
    q = tl.load(
        Q + b * sq_b + h * sq_h + rows.to(tl.int64)[:, None] * sq_t + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D),
        other=0.0,
    )
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    if DOC_MASK:
        q_doc = tl.load(Q_DOC + b * tq + rows, mask=row_ok, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    # Causal: keys past the block's last query position are hidden from all of its rows.
    hi = tl.minimum(tk, q_offset + (pid_m + 1) * BLOCK_M) if CAUSAL else tk
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < tk
        k = tl.load(
            k_base + cols.to(tl.int64)[:, None] * sk_t + offs_d[None, :],
            mask=col_ok[:, None] & (offs_d[None, :] < HEAD_D),
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= q_offset + rows[:, None])
        if DOC_MASK:
            k_doc = tl.load(K_DOC + b * tk + cols, mask=col_ok, other=-2)
            visible = visible & (q_doc[:, None] == k_doc[None, :])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key seen yet
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + cols.to(tl.int64)[:, None] * sv_t + offs_dv[None, :],
            mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DV),
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    seen = l_i > 0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(
        O + b * so_b + h * so_h + rows.to(tl.int64)[:, None] * so_t + offs_dv[None, :],
        acc.to(O.dtype.element_ty),
        mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV),
    )
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / LOG2E, float("inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * tq + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_DOC, K_DOC,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
    tq, tk, n_kv_heads, group, q_offset, qk_scale, scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    DOC_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dV = sum over the group's query heads of P^T dO, dK = scale * sum dS^T Q."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_kv_heads).to(tl.int64)
    hk = (pid_bh % n_kv_heads).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = cols < tk
    k_mask = col_ok[:, None] & (offs_d[None, :] < HEAD_D)
    v_mask = col_ok[:, None] & (offs_dv[None, :] < HEAD_DV)
    k_off = b * sk_b + hk * sk_h + cols.to(tl.int64)[:, None] * sk_t + offs_d[None, :]
    v_off = b * sv_b + hk * sv_h + cols.to(tl.int64)[:, None] * sv_t + offs_dv[None, :]
    k = tl.load(K + k_off, mask=k_mask, other=0.0)
    v = tl.load(V + v_off, mask=v_mask, other=0.0)
    if DOC_MASK:
        k_doc = tl.load(K_DOC + b * tk + cols, mask=col_ok, other=-2)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # Query i sees key j iff j <= q_offset + i: earlier queries see none of this block.
    lo = tl.maximum(pid_n * BLOCK_N - q_offset, 0) if CAUSAL else 0
    for g in range(group):
        h = hk * group + g
        row_base = (b * n_kv_heads * group + h) * tq
        for start_m in range(lo, tq, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < tq
            q = tl.load(
                Q + b * sq_b + h * sq_h + rows.to(tl.int64)[:, None] * sq_t + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D),
                other=0.0,
            )
            do = tl.load(
                DO + b * sdo_b + h * sdo_h + rows.to(tl.int64)[:, None] * sdo_t + offs_dv[None, :],
                mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV),
                other=0.0,
            )
            lse = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0) * LOG2E
            delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            visible = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= q_offset + rows[:, None])
            if DOC_MASK:
                q_doc = tl.load(Q_DOC + b * tq + rows, mask=row_ok, other=-1)
                visible = visible & (q_doc[:, None] == k_doc[None, :])
            p = tl.exp2(tl.where(visible, s, float("-inf")) - lse[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    tl.store(DK + k_off, dk * scale, mask=k_mask)
    tl.store(DV + v_off, dv, mask=v_mask)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, Q_DOC, K_DOC,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
    tq, tk, n_heads, group, q_offset, qk_scale, scale,
    HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    DOC_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dQ = scale * sum over key blocks of dS K, dS = P * (dO V^T - delta)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    hk = h // group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = rows < tq
    q_off = b * sq_b + h * sq_h + rows.to(tl.int64)[:, None] * sq_t + offs_d[None, :]
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_D)
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    do = tl.load(
        DO + b * sdo_b + h * sdo_h + rows.to(tl.int64)[:, None] * sdo_t + offs_dv[None, :],
        mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DV),
        other=0.0,
    )
    lse = tl.load(LSE + pid_bh.to(tl.int64) * tq + rows, mask=row_ok, other=0.0)
    lse = lse * LOG2E
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * tq + rows, mask=row_ok, other=0.0)
    k_base = K + b * sk_b + hk * sk_h
    v_base = V + b * sv_b + hk * sv_h
    if DOC_MASK:
        q_doc = tl.load(Q_DOC + b * tq + rows, mask=row_ok, other=-1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Causal: keys past the block's last query position are hidden from all of its rows.
    hi = tl.minimum(tk, q_offset + (pid_m + 1) * BLOCK_M) if CAUSAL else tk
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < tk
        k = tl.load(
            k_base + cols.to(tl.int64)[:, None] * sk_t + offs_d[None, :],
            mask=col_ok[:, None] & (offs_d[None, :] < HEAD_D),
            other=0.0,
        )
        v = tl.load(
            v_base + cols.to(tl.int64)[:, None] * sv_t + offs_dv[None, :],
            mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DV),
            other=0.0,
        )
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= q_offset + rows[:, None])
        if DOC_MASK:
            k_doc = tl.load(K_DOC + b * tk + cols, mask=col_ok, other=-2)
            visible = visible & (q_doc[:, None] == k_doc[None, :])
        p = tl.exp2(tl.where(visible, s, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + q_off, dq * scale, mask=q_mask)


def _kernel_inputs(*xs: Tensor) -> tuple[Tensor, ...]:
    """Contiguous copies the kernels can load: fp16, bf16 and fp32 stay, others become fp32."""
    keep = (torch.float16, torch.bfloat16, torch.float32)
    return tuple((x if x.dtype in keep else x.float()).contiguous() for x in xs)


def _strides(x: Tensor) -> tuple[int, int, int]:
    """(batch, time, head) strides of a [B, T, H, D] tensor with unit last stride."""
    return x.stride(0), x.stride(1), x.stride(2)


def _doc_args(q: Tensor, q_doc: Tensor | None, k_doc: Tensor | None) -> tuple[Tensor, Tensor]:
    """The document-id pointers (q itself stands in when there are none: never read)."""
    if q_doc is None:
        return q, q
    assert k_doc is not None, "q_doc and k_doc come together (checked by flash_attention)"
    return q_doc, k_doc


def forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    q_offset: int,
    scale: float,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(o fp32 [B, Tq, Hq, Dv], lse fp32 [B, Hq, Tq])."""
    q, k, v = _kernel_inputs(q, k, v)
    b, tq, hq, d = q.shape
    tk, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    o = q.new_empty(b, tq, hq, dv, dtype=torch.float32)
    lse = q.new_empty(b, hq, tq, dtype=torch.float32)
    grid = (triton.cdiv(tq, BLOCK_M), b * hq)
    _attn_fwd[grid](
        q, k, v, o, lse, *_doc_args(q, q_doc, k_doc),
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        tq, tk, hq, hq // hkv, q_offset, scale * LOG2E.value,
        HEAD_D=d, HEAD_DV=dv, BLOCK_D=pad_dim(d), BLOCK_DV=pad_dim(dv),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=causal, DOC_MASK=q_doc is not None,
        DOT_PRECISION=dot_precision(q), num_warps=NUM_WARPS,
    )  # fmt: skip
    return o, lse


def backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    *,
    causal: bool,
    q_offset: int,
    scale: float,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in fp32; delta_i = rowsum(dO_i * O_i) is O(T D) glue done in torch."""
    q, k, v = _kernel_inputs(q, k, v)
    do = do.to(q.dtype).contiguous()
    b, tq, hq, d = q.shape
    tk, hkv, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hkv
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # [B, Hq, Tq]
    lse = lse.contiguous()
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    dims = {
        "HEAD_D": d, "HEAD_DV": dv_dim, "BLOCK_D": pad_dim(d), "BLOCK_DV": pad_dim(dv_dim),
        "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "CAUSAL": causal,
        "DOC_MASK": q_doc is not None, "DOT_PRECISION": dot_precision(q), "num_warps": NUM_WARPS,
    }  # fmt: skip
    docs = _doc_args(q, q_doc, k_doc)
    _attn_bwd_dkdv[(triton.cdiv(tk, BLOCK_N), b * hkv)](
        q, k, v, do, lse, delta, dk, dv, *docs, *strides,
        tq, tk, hkv, group, q_offset, scale * LOG2E.value, scale, **dims,
    )  # fmt: skip
    _attn_bwd_dq[(triton.cdiv(tq, BLOCK_M), b * hq)](
        q, k, v, do, lse, delta, dq, *docs, *strides,
        tq, tk, hq, group, q_offset, scale * LOG2E.value, scale, **dims,
    )  # fmt: skip
    return dq, dk, dv
