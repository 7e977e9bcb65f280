"""The one autograd Function behind every chunk op, and the validated call that reaches it.

An implementation (`hyla.kernels.<family>.{torch,triton}_chunk`) provides

    forward(q, k, v, *gates, initial_state, *, scale) -> (o, final_state)
    backward(q, k, v, *gates, initial_state, do, dfinal, *, scale)
        -> (dq, dk, dv, *dgates, dinitial_state)

on padded batches [B, T, H, D]: q, k, v in any float dtype; gates fp32 or None;
initial_state fp32 [B, H, K, V] or None; do [B, T, H, V] and dfinal [B, H, K, V] always
given (zeros when unused). It returns fp32 tensors and None for the gradient of a None
input. Only the inputs are saved: backward recomputes the chunk states.

`ChunkCall` is the seam between the public ops and everything built on them: each family's
`prepare_*` validates its arguments once and returns one, and both the op itself
(`ChunkCall.run`) and sequence parallelism (`hyla.parallel`, which drives `impl` directly
on `inputs`) start from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hyla.kernels.backend import chunk_implementation, resolve_backend
from hyla.kernels.segments import Segmented
from hyla.kernels.varlen import PackedLayout


class ChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl: Segmented, scale: float, *inputs: Tensor | None):
        o, final_state = impl.forward(*inputs, scale=scale)
        ctx.impl, ctx.scale = impl, scale
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        q = inputs[0]
        assert q is not None  # q, k and v are always given
        return o.to(q.dtype), final_state

    @staticmethod
    def backward(ctx, do: Tensor | None, dfinal: Tensor | None):
        inputs = ctx.saved_tensors
        q, v = inputs[0], inputs[2]
        if do is None:
            do = torch.zeros_like(v)
        if dfinal is None:
            b, _, h, kd = q.shape
            dfinal = q.new_zeros((b, h, kd, v.shape[-1]), dtype=torch.float32)
        grads = ctx.impl.backward(*inputs, do, dfinal.float(), scale=ctx.scale)
        assert len(grads) == len(inputs), f"{ctx.impl.__name__}.backward returned {len(grads)}"
        return (None, None, *cast_like(grads, inputs))


def cast_like(grads, inputs) -> list[Tensor | None]:
    """Each gradient in its input's dtype (None stays None)."""
    return [None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs, strict=True)]


@dataclass(frozen=True)
class ChunkCall:
    """A validated chunk-op call: the implementation (the contract above, run over bounded
    segments), the per-token inputs q, k, v, *gates on the padded batch [N, L, H, ...], the
    scale, and the varlen layout that maps outputs back to the caller's packed tokens."""

    family: str
    impl: Segmented
    inputs: tuple[Tensor | None, ...]
    scale: float
    layout: PackedLayout | None

    def unpad(self, o: Tensor) -> Tensor:
        """An output on the padded batch -> the caller's layout."""
        return o if self.layout is None else self.layout.unpad(o)

    def run(
        self, initial_state: Tensor | None, output_final_state: bool
    ) -> tuple[Tensor, Tensor | None]:
        """The op on one process: (o, final_state if asked)."""
        if initial_state is not None:
            initial_state = initial_state.float()
        o, final_state = ChunkFunction.apply(self.impl, self.scale, *self.inputs, initial_state)
        return self.unpad(o), (final_state if output_final_state else None)


def prepare_call(
    family: str,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    per_token: tuple[Tensor | None, ...],
    *,
    scale: float,
    cu_seqlens: Tensor | None,
    backend: str | None,
) -> ChunkCall:
    """Validated inputs -> a ChunkCall: packs varlen input and picks the backend.

    `per_token` are the family's extra inputs, each [B, T, H, ...] or None.
    """
    impl = chunk_implementation(family, resolve_backend(backend, q.device))
    layout = PackedLayout.from_cu_seqlens(cu_seqlens) if cu_seqlens is not None else None
    inputs = (q, k, v, *per_token)
    if layout is not None:
        inputs = tuple(None if x is None else layout.pad(x) for x in inputs)
    return ChunkCall(family, impl, inputs, scale, layout)
