"""The fused recurrent step of every linear family, in Triton (see `fused_recurrent`).

One program per sequence, head and block of BV value columns (a 3-D grid) holds its
[K, BV] slice of the state in registers across all the tokens: each column of S evolves on
its own (the delta rule's correction S^T k is per column too), so the V blocks need no
communication.
Per token it loads q_t, k_t (whole key dim) and its v_t block in the input dtype, updates
the state in fp32 and stores o_t; the state is read once and written once per call. The
products are element-wise with reductions over K (tl.sum), not tl.dot: a token's products
are matrix-vector ones, which tl.dot (16 rows at least) would only pad.

BLOCK_V and NUM_WARPS are chosen by reasoning, not yet tuned on a GPU: [256, 32] fp32 is
64 registers a thread at 4 warps, and B=1 decoding at H=16, V=128 still gives 64 programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from hyla.kernels.fused_recurrent import Steps

BLOCK_V = 32  # value columns per program
NUM_WARPS = 4

# GATE: what multiplies the state before each token's write (the kernel spells them 0, 1, 2).
NO_GATE, HEAD_GATE, KEY_GATE = 0, 1, 2


@triton.jit
def _fused_recurrent_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    g_ptr,
    beta_ptr,
    s0_ptr,
    o_ptr,
    final_ptr,
    scale,
    T,
    H,
    K,
    V,
    BK: tl.constexpr,
    BV: tl.constexpr,
    GATE: tl.constexpr,
    HAS_BETA: tl.constexpr,
    HAS_INITIAL_STATE: tl.constexpr,
):
    """S = a_t S; S += k_t (beta_t (v_t - S^T k_t))^T (or k_t v_t^T); o_t = scale S^T q_t."""
    n, h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    nh = n * H + h  # the state's row
    vs = tl.program_id(2).to(tl.int64) * BV + tl.arange(0, BV)
    ks = tl.arange(0, BK).to(tl.int64)
    k_mask, v_mask = ks < K, vs < V
    state_off = ks[:, None] * V + vs[None, :]
    state_mask = k_mask[:, None] & v_mask[None, :]
    if HAS_INITIAL_STATE:
        state = tl.load(s0_ptr + nh * K * V + state_off, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    # token t of (n, h): q, k, key gates at row (n * T + t) * H + h of width K; v, o of width V
    row = n * T * H + h
    for _ in range(T):
        query = tl.load(q_ptr + row * K + ks, mask=k_mask, other=0.0).to(tl.float32) * scale
        key = tl.load(k_ptr + row * K + ks, mask=k_mask, other=0.0).to(tl.float32)
        value = tl.load(v_ptr + row * V + vs, mask=v_mask, other=0.0).to(tl.float32)
        if GATE == 1:
            state = state * tl.exp(tl.load(g_ptr + row))
        if GATE == 2:
            gate = tl.load(g_ptr + row * K + ks, mask=k_mask, other=0.0)
            state = state * tl.exp(gate)[:, None]
        if HAS_BETA:
            write = tl.load(beta_ptr + row).to(tl.float32)
            value = write * (value - tl.sum(state * key[:, None], axis=0))
        state = state + key[:, None] * value[None, :]
        tl.store(o_ptr + row * V + vs, tl.sum(state * query[:, None], axis=0), mask=v_mask)
        row += H
    tl.store(final_ptr + nh * K * V + state_off, state, mask=state_mask)


def forward(steps: Steps, initial_state: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """Same contract as `hyla.kernels.fused_recurrent.forward`."""
    log_decay, beta = steps.log_decay, steps.beta
    n, length, h, kd = steps.q.shape
    vd = steps.v.shape[-1]
    q, k, v = steps.q.contiguous(), steps.k.contiguous(), steps.v.contiguous()
    o = q.new_empty((n, length, h, vd), dtype=torch.float32)
    final = q.new_empty((n, h, kd, vd), dtype=torch.float32)
    gate = NO_GATE if log_decay is None else KEY_GATE if log_decay.dim() == 4 else HEAD_GATE
    # absent inputs: any tensor stands in for the pointer, which the kernel never reads
    g = q if log_decay is None else log_decay.float().contiguous()
    s0 = final if initial_state is None else initial_state.float().contiguous()
    block_v = min(BLOCK_V, triton.next_power_of_2(vd))
    grid = (n, h, triton.cdiv(vd, block_v))
    _fused_recurrent_kernel[grid](
        q,
        k,
        v,
        g,
        q if beta is None else beta.contiguous(),
        s0,
        o,
        final,
        scale,
        length,
        h,
        kd,
        vd,
        BK=triton.next_power_of_2(kd),
        BV=block_v,
        GATE=gate,
        HAS_BETA=beta is not None,
        HAS_INITIAL_STATE=initial_state is not None,
        num_warps=NUM_WARPS,
    )
    return o, final
