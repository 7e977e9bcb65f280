"""Fused recurrent (token-step) forms of the chunk ops, for decoding and short inputs.

A chunk op pads its input to whole 64-token chunks, so one decoded token costs as much as
64. The fused recurrent op runs the recurrence of docs/design.md §1 one token at a time on
an fp32 state instead: O(T K V) work with no padding, the right trade for T well below a
chunk. The three families differ only in the decay A_t and the delta correction:

    S_t = a_t ⊙ S_{t-1}                       a_t: 1, exp(g_t) per head, or exp(gk_t) per key
    S_t = S_t + k_t (beta_t (v_t - S_t^T k_t))^T   (delta rule; otherwise k_t v_t^T)
    o_t = scale S_t^T q_t

so one implementation per backend serves them all: `forward` below (PyTorch) and
`hyla.kernels.triton_recurrent` (Triton). A fused op takes its chunk op's arguments and is
validated by the chunk op's own `prepare_*` (the same errors); varlen input runs on the
padded batch the ChunkCall builds (padding is an identity step, as for the chunk kernels).

Inference only: there is no backward. A call with grad mode on and an input that requires
grad raises ValueError rather than silently returning outputs detached from the graph;
training uses the chunk op (the mixers pick it themselves whenever a gradient is needed).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from hyla.kernels.autograd import ChunkCall

# The family's per-token extra inputs, as its ChunkCall holds them -> (log_decay, beta) of
# `Steps`.
StepInputs = Callable[..., tuple[Tensor | None, Tensor | None]]
Op = TypeVar("Op", bound=Callable[..., Any])


def _rows(x: Tensor) -> Tensor:
    """[N, L, H, D] -> fp32 [N * H, L, D]: each (sequence, head) one batch row of bmm."""
    n, length, h, d = x.shape
    return x.float().transpose(1, 2).reshape(n * h, length, d)


@dataclass(frozen=True)
class Steps:
    """A padded batch's tokens in the generic form: q, k [N, L, H, K] and v [N, L, H, V] in
    any float dtype; log_decay None, [N, L, H] per head or [N, L, H, K] per key channel
    (fp32); beta None (no delta correction) or [N, L, H]."""

    q: Tensor
    k: Tensor
    v: Tensor
    log_decay: Tensor | None
    beta: Tensor | None


def forward(steps: Steps, initial_state: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """The PyTorch token loop: (o fp32 [N, L, H, V], final fp32 [N, H, K, V]).

    Everything per token is precomputed in one batched op (fp32 copies, exp of the gates,
    scale and beta folded into q and k), so a step is two to four bmm-sized ops on the one
    state, updated in place: a handful of small kernels for a decoded token.
    """
    q, log_decay, beta = steps.q, steps.log_decay, steps.beta
    n, length, h, kd = q.shape
    vd = steps.v.shape[-1]
    qs, ks, vs = _rows(q) * scale, _rows(steps.k), _rows(steps.v)
    decay = None  # [N * H, L, 1] per head or [N * H, L, K] per key channel
    if log_decay is not None:
        decay = torch.exp(_rows(log_decay if log_decay.dim() == 4 else log_decay[..., None]))
    written = None if beta is None else ks * _rows(beta[..., None])
    # The caller's initial state is never written: the first update makes a new tensor (no
    # separate copy of the state), and the ones after it update that tensor in place.
    owned = initial_state is None
    if initial_state is None:
        state = q.new_zeros((n * h, kd, vd), dtype=torch.float32)
    else:
        state = initial_state.float().reshape(n * h, kd, vd)
    outputs = []
    for t in range(length):
        if decay is not None:
            a = decay[:, t, :, None]  # [NH, 1 or K, 1]
            state, owned = (state.mul_(a) if owned else state * a), True
        key, value = ks[:, t, :, None], vs[:, t, None, :]
        if written is not None:  # the delta rule writes beta k (v - S^T k)^T
            key, value = written[:, t, :, None], value - torch.bmm(ks[:, t, None, :], state)
        state = state.baddbmm_(key, value) if owned else torch.baddbmm(state, key, value)
        owned = True
        outputs.append(torch.bmm(qs[:, t, None, :], state))
    o = torch.cat(outputs, dim=1).view(n, h, length, vd).transpose(1, 2)
    return o, state.view(n, h, kd, vd)


def _needs_grad(tensors: tuple[Any, ...]) -> bool:
    return torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad for t in tensors
    )


def run(
    call: ChunkCall,
    step_inputs: StepInputs,
    initial_state: Tensor | None,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """A validated call through the fused recurrent implementation of its backend."""
    q, k, v, *gates = call.inputs
    assert q is not None and k is not None and v is not None  # always given
    steps = Steps(q, k, v, *step_inputs(*gates))
    impl = forward
    if call.kernel.backend == "triton":  # the backend prepare_* resolved
        from hyla.kernels import triton_recurrent

        impl = triton_recurrent.forward
    with torch.autocast(q.device.type, enabled=False):  # fp32 states, whatever autocast says
        o, final_state = impl(steps, initial_state, call.kernel.scale)
    return call.unpad(o.to(q.dtype)), (final_state if output_final_state else None)


def fused_recurrent_op(
    chunk_op: Op, prepare: Callable[..., ChunkCall], step_inputs: StepInputs
) -> Op:
    """The fused recurrent op of `chunk_op`: the same signature, checks and results.

    `prepare` is the family's validation (`prepare_*`); `step_inputs` maps the call's
    per-token extras to the generic recurrence above.
    """
    name = chunk_op.__name__.replace("chunk_", "fused_recurrent_", 1)

    @functools.wraps(chunk_op)
    def op(*args: Any, output_final_state: bool = False, **kwargs: Any):
        call = prepare(*args, **kwargs)
        initial_state = kwargs.get("initial_state")
        if _needs_grad((*args, initial_state)):
            raise ValueError(
                f"{name} is inference-only (no backward) but an input requires grad with "
                f"grad mode on: use {chunk_op.__name__} for training, or run under "
                "torch.no_grad()"
            )
        return run(call, step_inputs, initial_state, output_final_state)

    op.__name__ = op.__qualname__ = name
    op.__doc__ = (
        f"Fused recurrent (token-step) form of `{chunk_op.__name__}`, for decoding and "
        "short inputs: the same arguments, checks and results, computed one token at a time "
        "on an fp32 state; inference only (see `hyla.kernels.fused_recurrent`)."
    )
    return cast(Op, op)
