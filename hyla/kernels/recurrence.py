"""The token-by-token recurrence S_t = A_t S_{t-1} + B_t, o_t = scale S_t^T q_t.

This is the ground truth every chunk kernel is tested against (docs/design.md §1). It
accumulates in fp32, or in fp64 when given fp64 inputs, and is differentiable by autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch
from torch import Tensor

# step(S, t) -> the state after token t of the current sequence, given the one before it.
Step = Callable[[Tensor, int], Tensor]


def accumulation_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64, else fp32."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


def run_recurrence(
    q: Tensor,
    v: Tensor,
    make_step: Callable[[slice], Step],
    *,
    scale: float,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    acc: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Run the recurrence over each sequence: (o [B, T, H, V] in q's dtype, final [N, H, K, V]).

    The final state is in the accumulation dtype `acc` (fp32, or fp64 for fp64 inputs).

    make_step(span) returns the step function for the tokens q[:, span].
    """
    b, t_total, h, kd = q.shape
    vd = v.shape[-1]
    if cu_seqlens is None:
        spans = [slice(0, t_total)]
        rows = [slice(0, b)]
    else:
        offsets = cu_seqlens.tolist()
        spans = [slice(s, e) for s, e in pairwise(offsets)]
        rows = [slice(i, i + 1) for i in range(len(spans))]
    outputs, finals = [], []
    for span, row in zip(spans, rows, strict=True):
        if initial_state is not None:
            state = initial_state[row].to(acc)
        else:
            state = q.new_zeros((row.stop - row.start, h, kd, vd), dtype=acc)
        step = make_step(span)
        for t in range(span.stop - span.start):
            state = step(state, t)
            q_t = q[:, span.start + t].to(acc)
            outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q_t, state))
        finals.append(state)
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros((b, 0, h, vd), dtype=acc)
    return o.to(q.dtype), torch.cat(finals, dim=0)
