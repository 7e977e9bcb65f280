"""Linear attention with no decay, a constant per-head decay (lightning, retention) or a
per-token scalar gate (simple GLA, Mamba2-style): A_t = exp(g_t) I, B_t = k_t v_t^T."""

from __future__ import annotations

import torch
from torch import Tensor

from hyla.kernels.autograd import ChunkCall, prepare_call
from hyla.kernels.checks import check_aux, check_common, check_log_gate
from hyla.kernels.fused_recurrent import fused_recurrent_op
from hyla.kernels.lasp import decay_summary
from hyla.kernels.recurrence import accumulation_dtype, run_recurrence


def token_gate(g: Tensor | None, q: Tensor) -> Tensor | None:
    """None, [H] constant or [B, T, H] per-token log-gate -> None or [B, T, H] fp32."""
    if g is None:
        return None
    b, t, h, _ = q.shape
    if isinstance(g, Tensor) and g.dim() == 1:
        check_aux("g", g, (h,), q)
        check_log_gate("g", g)
        return g.float().expand(b, t, h)
    if not isinstance(g, Tensor) or g.dim() != 3:
        raise ValueError(
            f"g must be None, a [H] = ({h},) constant log-decay or a [B, T, H] = {(b, t, h)} "
            f"per-token log-gate, got {getattr(g, 'shape', type(g).__name__)}"
        )
    check_aux("g", g, (b, t, h), q)
    check_log_gate("g", g)
    return g.float()


def prepare_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str | None = None,
) -> ChunkCall:
    """Validate `chunk_linear_attn`'s arguments; the call, ready to run."""
    scale = check_common(q, k, v, scale, initial_state, cu_seqlens)
    gate = token_gate(g, q)
    return prepare_call(
        "linear_attn",
        q,
        k,
        v,
        (gate,),
        scale=scale,
        cu_seqlens=cu_seqlens,
        backend=backend,
        summarize=decay_summary,
    )


def chunk_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise linear attention. q, k [B, T, H, K], v [B, T, H, V] -> o [B, T, H, V].

    g: None, [H] constant log-decay per head, or [B, T, H] per-token log-gate (all <= 0).
    backend: "auto" (default, or HYLA_KERNEL_BACKEND), "torch" or "triton".
    """
    call = prepare_linear_attn(
        q,
        k,
        v,
        g,
        scale=scale,
        initial_state=initial_state,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )
    return call.run(initial_state, output_final_state)


def recurrent_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token reference for `chunk_linear_attn` (same arguments and results)."""
    scale = check_common(q, k, v, scale, initial_state, cu_seqlens)
    gate = token_gate(g, q)
    acc = accumulation_dtype(q, k, v, g, initial_state)

    def make_step(span: slice):
        def step(state: Tensor, t: int) -> Tensor:
            i = span.start + t
            if gate is not None:
                state = state * torch.exp(gate[:, i].to(acc))[..., None, None]
            return state + torch.einsum("bhk,bhv->bhkv", k[:, i].to(acc), v[:, i].to(acc))

        return step

    o, final_state = run_recurrence(
        q, v, make_step, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, acc=acc
    )
    return o, (final_state if output_final_state else None)


def linear_attn_transition(
    k: Tensor, g: Tensor | None = None, *, cu_seqlens: Tensor | None = None
) -> Tensor:
    """The scalar a with S_end = a * S_start + (state from zero), per sequence and head.

    Returns fp32 [B, H] (or [N, H] with cu_seqlens): 1 without decay, exp(sum of g) with.
    k [B, T, H, K] only supplies the shape and device. It is the AA of the family's LASP
    summary (`hyla.kernels.lasp`), which comes in closed form: no kernel runs.
    """
    call = prepare_linear_attn(k, k, k, g, cu_seqlens=cu_seqlens, backend="torch")
    return call.summary().aa


fused_recurrent_linear_attn = fused_recurrent_op(
    chunk_linear_attn, prepare_linear_attn, lambda gate: (gate, None)
)
