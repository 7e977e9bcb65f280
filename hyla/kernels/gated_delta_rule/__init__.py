"""The gated delta rule (DeltaNet when g is None):
A_t = exp(g_t) (I - beta_t k_t k_t^T), B_t = beta_t k_t v_t^T."""

from __future__ import annotations

import torch
from torch import Tensor

from hyla.kernels.autograd import ChunkCall, prepare_call
from hyla.kernels.checks import check_aux, check_common, check_finite, check_log_gate
from hyla.kernels.fused_recurrent import fused_recurrent_op
from hyla.kernels.lasp import delta_summary
from hyla.kernels.recurrence import accumulation_dtype, run_recurrence


def _check_beta_g(beta: Tensor, g: Tensor | None, q: Tensor) -> tuple[Tensor, Tensor | None]:
    shape = tuple(q.shape[:3])
    check_aux("beta", beta, shape, q)
    check_finite("beta", beta)
    if g is None:
        return beta, None
    check_aux("g", g, shape, q)
    check_log_gate("g", g)
    return beta, g.float()


def prepare_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str | None = None,
) -> ChunkCall:
    """Validate `chunk_gated_delta_rule`'s arguments; the call, ready to run."""
    scale = check_common(q, k, v, scale, initial_state, cu_seqlens)
    gates = _check_beta_g(beta, g, q)
    return prepare_call(
        "gated_delta_rule",
        q,
        k,
        v,
        gates,
        scale=scale,
        cu_seqlens=cu_seqlens,
        backend=backend,
        summarize=delta_summary,
    )


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Chunkwise gated delta rule. q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H],
    g [B, T, H] log-gates <= 0 or None. Keys are normally L2-normalised by the caller."""
    call = prepare_gated_delta_rule(
        q,
        k,
        v,
        beta,
        g,
        scale=scale,
        initial_state=initial_state,
        cu_seqlens=cu_seqlens,
        backend=backend,
    )
    return call.run(initial_state, output_final_state)


def recurrent_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Token-by-token reference for `chunk_gated_delta_rule` (same arguments and results)."""
    scale = check_common(q, k, v, scale, initial_state, cu_seqlens)
    beta, gate = _check_beta_g(beta, g, q)
    acc = accumulation_dtype(q, k, v, beta, g, initial_state)

    def make_step(span: slice):
        def step(state: Tensor, t: int) -> Tensor:
            i = span.start + t
            if gate is not None:
                state = state * torch.exp(gate[:, i].to(acc))[..., None, None]
            k_t, v_t, b_t = k[:, i].to(acc), v[:, i].to(acc), beta[:, i].to(acc)
            error = v_t - torch.einsum("bhkv,bhk->bhv", state, k_t)
            return state + torch.einsum("bhk,bhv->bhkv", k_t * b_t[..., None], error)

        return step

    o, final_state = run_recurrence(
        q, v, make_step, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens, acc=acc
    )
    return o, (final_state if output_final_state else None)


def gated_delta_rule_transition(
    k: Tensor,
    beta: Tensor,
    g: Tensor | None = None,
    *,
    cu_seqlens: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """The matrix M = A_T ... A_1 with S_end = M S_start + (state from zero): fp32
    [B, H, K, K] (or [N, H, K, K] with cu_seqlens), differentiable in k, beta and g.

    It is the AA of the family's LASP summary (`hyla.kernels.lasp`): the chunk op's final
    state from the identity, through the chunk kernels and their backward. q and v play no
    part in it: k stands in for them.
    """
    call = prepare_gated_delta_rule(k, k, k, beta, g, cu_seqlens=cu_seqlens, backend=backend)
    return call.summary().aa


fused_recurrent_gated_delta_rule = fused_recurrent_op(
    chunk_gated_delta_rule, prepare_gated_delta_rule, lambda beta, g: (g, beta)
)
