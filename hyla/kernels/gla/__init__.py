"""Gated linear attention (GLA): per-key-channel data-dependent decay,
A_t = diag(exp(gk_t)), B_t = k_t v_t^T."""

from __future__ import annotations

import torch
from torch import Tensor

from hyla.kernels.autograd import ChunkCall, prepare_call
from hyla.kernels.checks import check_aux, check_common, check_log_gate
from hyla.kernels.fused_recurrent import fused_recurrent_op
from hyla.kernels.lasp import decay_summary
from hyla.kernels.recurrence import accumulation_dtype, run_recurrence


def _check_gk(gk: Tensor, q: Tensor) -> Tensor:
    check_aux("gk", gk, tuple(q.shape), q)
    check_log_gate("gk", gk)
    return gk.float()


def prepare_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str | None = None,
) -> ChunkCall:
    """Validate `chunk_gla`'s arguments; the call, ready to run."""
    scale = check_common(q, k, v, scale, initial_state, cu_seqlens)
    gate = _check_gk(gk, q)
    return prepare_call(
        "gla",
        q,
        k,
        v,
        (gate,),
        scale=scale,
        cu_seqlens=cu_seqlens,
        backend=backend,
        summarize=decay_summary,
    )


def chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise GLA. q, k, gk [B, T, H, K] (gk: log-gates <= 0), v [B, T, H, V]."""
    call = prepare_gla(
        q,
        k,
        v,
        gk,
        scale=scale,
        initial_state=initial_state,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )
    return call.run(initial_state, output_final_state)


def recurrent_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gk: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token reference for `chunk_gla` (same arguments and results)."""
    scale = check_common(q, k, v, scale, initial_state, cu_seqlens)
    _check_gk(gk, q)
    acc = accumulation_dtype(q, k, v, gk, initial_state)

    def make_step(span: slice):
        def step(state: Tensor, t: int) -> Tensor:
            i = span.start + t
            decay = torch.exp(gk[:, i].to(acc))[..., None]
            return state * decay + torch.einsum("bhk,bhv->bhkv", k[:, i].to(acc), v[:, i].to(acc))

        return step

    o, final_state = run_recurrence(
        q, v, make_step, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, acc=acc
    )
    return o, (final_state if output_final_state else None)


def gla_transition(gk: Tensor, *, cu_seqlens: Tensor | None = None) -> Tensor:
    """The diagonal a with S_end = diag(a) S_start + (state from zero): fp32 [B, H, K]
    (or [N, H, K] with cu_seqlens), exp of each sequence's summed log-gates. It is the AA
    of the family's LASP summary (`hyla.kernels.lasp`), which comes in closed form: no
    kernel runs."""
    call = prepare_gla(gk, gk, gk, gk, cu_seqlens=cu_seqlens, backend="torch")
    return call.summary().aa


fused_recurrent_gla = fused_recurrent_op(chunk_gla, prepare_gla, lambda gk: (gk, None))
