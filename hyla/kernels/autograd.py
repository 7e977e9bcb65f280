"""The custom ops behind every chunk op, and the validated call that reaches them.

An implementation (`hyla.kernels.<family>.{torch,triton}_chunk`) provides

    forward(q, k, v, *gates, initial_state, *, scale) -> (o, final_state)
    backward(q, k, v, *gates, initial_state, do, dfinal, *, scale)
        -> (dq, dk, dv, *dgates, dinitial_state)

on padded batches [B, T, H, D]: q, k, v in any float dtype; gates fp32 or None;
initial_state fp32 [B, H, K, V] or None; do [B, T, H, V] and dfinal [B, H, K, V] always
given (zeros when unused). It returns fp32 tensors and None for the gradient of a None
input. Only the inputs are saved: backward recomputes the chunk states.

Both directions are `torch.library` custom ops (`hyla::<family>_forward` and
`hyla::<family>_backward`) with fake implementations, rather than an autograd.Function:
PyTorch then sees one op per call, so selective activation checkpointing can name it in a
policy and `torch.compile` traces a model around it without looking inside the kernels.

`ChunkCall` is the seam between the public ops and everything built on them: each family's
`prepare_*` validates its arguments once and returns one, and both the op itself
(`ChunkCall.run`) and sequence parallelism (`hyla.parallel`) start from it. Its `kernel`
(`ChunkKernel`) is the one door into the implementations: forward, backward and the
family's LASP summary (`hyla.kernels.lasp`) all go through the custom ops, so autocast,
fake tensors and a checkpointing policy see every kernel call, whoever makes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.library import CustomOpDef

from hyla.kernels.backend import chunk_implementation, resolve_backend
from hyla.kernels.custom_ops import define_op
from hyla.kernels.varlen import PackedLayout

if TYPE_CHECKING:
    from hyla.kernels.lasp import StateSummary

Inputs = tuple[Tensor | None, ...]

# Each family's per-token inputs after q, k, v: the gates its implementation takes.
GATES = {"linear_attn": ("g",), "gla": ("gk",), "gated_delta_rule": ("beta", "g")}


def _given(inputs: Sequence[Tensor | None]) -> list[bool]:
    return [x is not None for x in inputs]


def _define_ops(family: str, gates: tuple[str, ...]) -> tuple[CustomOpDef, CustomOpDef]:
    """`family`'s forward and backward custom ops (`hyla::<family>_forward`, `_backward`)
    over the inputs (q, k, v, *gates, initial_state); the schema names each one, as an
    op's autograd needs its tensors as separate arguments."""
    tensors = ", ".join(["Tensor q", "Tensor k", "Tensor v", *(f"Tensor? {g}" for g in gates)])
    inputs = f"str backend, float scale, {tensors}, Tensor? initial_state"

    def forward(backend: str, scale: float, *inputs: Tensor | None) -> tuple[Tensor, Tensor]:
        q = inputs[0]
        assert q is not None
        o, final_state = chunk_implementation(family, backend).forward(*inputs, scale=scale)
        # Contiguous results, whatever a backend's layout, as the fake implementation says.
        return o.to(q.dtype).contiguous(), final_state.contiguous()

    def forward_fake(backend, scale, q, k, v, *rest):
        b, t, h, kd = q.shape
        o = q.new_empty((b, t, h, v.shape[-1]))
        return o, q.new_empty((b, h, kd, v.shape[-1]), dtype=torch.float32)

    def backward(backend: str, scale: float, *args: Tensor | None) -> list[Tensor]:
        """The gradients of the given (not None) inputs, in order, in their dtypes."""
        *inputs, do, dfinal = args
        impl = chunk_implementation(family, backend)
        grads = impl.backward(*inputs, do, dfinal, scale=scale)
        assert len(grads) == len(inputs), f"{impl.__name__}.backward returned {len(grads)}"
        # A gradient may be a tensor passed in (dinitial_state can be dfinal itself), and a
        # custom op's outputs must not alias its inputs: such a one is copied. Contiguous,
        # whatever the inputs' or a backend's layout, as the fake implementation says.
        passed_in = {id(x) for x in args}
        out = []
        for g, x in zip(grads, inputs, strict=True):
            if x is not None:
                assert g is not None, f"{impl.__name__}.backward missed a gradient"
                out.append(g.to(x.dtype, copy=id(g) in passed_in).contiguous())
        return out

    def backward_fake(backend, scale, *args):
        return [x.new_empty(x.shape) for x in args[:-2] if x is not None]

    forward_op = define_op(
        f"{family}_forward", forward, fake=forward_fake, schema=f"({inputs}) -> (Tensor, Tensor)"
    )
    backward_op = define_op(
        f"{family}_backward",
        backward,
        fake=backward_fake,
        schema=f"({inputs}, Tensor do, Tensor dfinal) -> Tensor[]",
    )

    def save_inputs(ctx, inputs, output) -> None:
        backend, scale, *tensors = inputs
        ctx.backend, ctx.scale, ctx.given = backend, scale, _given(tensors)
        ctx.save_for_backward(*(x for x in tensors if x is not None))

    def input_grads(ctx, do: Tensor | None, dfinal: Tensor | None):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if given else None for given in ctx.given]
        q, v = inputs[0], inputs[2]
        assert q is not None and v is not None  # q, k and v are always given
        if do is None:
            do = torch.zeros_like(v)
        if dfinal is None:
            b, _, h, kd = q.shape
            dfinal = q.new_zeros((b, h, kd, v.shape[-1]), dtype=torch.float32)
        grads = iter(backward_op(ctx.backend, ctx.scale, *inputs, do, dfinal.float()))
        return None, None, *(next(grads) if given else None for given in ctx.given)

    forward_op.register_autograd(input_grads, setup_context=save_inputs)
    return forward_op, backward_op


_OPS = {family: _define_ops(family, gates) for family, gates in GATES.items()}
CHUNK_FORWARD = {family: ops[0] for family, ops in _OPS.items()}
CHUNK_BACKWARD = {family: ops[1] for family, ops in _OPS.items()}


@dataclass(frozen=True)
class ChunkKernel:
    """One family's kernels on one backend at one scale: the door every caller of the
    implementations goes through. Inputs are (q, k, v, *gates) on the padded batch
    [N, L, H, ...], as `ChunkCall.inputs` holds them.

    `summarize` is the family's LASP summary (`hyla.kernels.lasp`); it runs with autocast
    off, as the ops do, so its closed forms stay in fp32 under a caller's bf16 autocast."""

    family: str
    backend: str
    scale: float
    summarize: Callable[[ChunkKernel, Inputs], StateSummary]

    def forward(self, inputs: Inputs, initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
        """(o in q's dtype, fp32 final state) from `initial_state` (None: zeros), through
        hyla::<family>_forward (differentiable where grad mode is on)."""
        if initial_state is not None:
            initial_state = initial_state.float()
        forward_op = CHUNK_FORWARD[self.family]
        return forward_op(self.backend, self.scale, *inputs, initial_state)

    def backward(
        self, inputs: Inputs, initial_state: Tensor, do: Tensor, dfinal: Tensor
    ) -> tuple[Inputs, Tensor]:
        """(the gradient of each input, None for a None input; the initial state's), given
        the gradients of the output `do` and of the final state `dfinal`, through
        hyla::<family>_backward."""
        backward_op = CHUNK_BACKWARD[self.family]
        grads = iter(
            backward_op(
                self.backend, self.scale, *inputs, initial_state.float(), do, dfinal.float()
            )
        )
        input_grads = tuple(None if x is None else next(grads) for x in inputs)
        return input_grads, next(grads)

    def summary(self, inputs: Inputs) -> StateSummary:
        """What the inputs do to a state run through them (`hyla.kernels.lasp`)."""
        q = inputs[0]
        assert q is not None  # q, k and v are always given
        with torch.autocast(q.device.type, enabled=False):
            return self.summarize(self, inputs)


@dataclass(frozen=True)
class ChunkCall:
    """A validated chunk-op call: the family's `kernel`, the per-token inputs q, k, v, *gates
    on the padded batch [N, L, H, ...], and the varlen layout that maps outputs back to the
    caller's packed tokens."""

    kernel: ChunkKernel
    inputs: Inputs
    layout: PackedLayout | None

    def unpad(self, o: Tensor) -> Tensor:
        """An output on the padded batch -> the caller's layout."""
        return o if self.layout is None else self.layout.unpad(o)

    def forward(self, initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
        """The kernel on this call's inputs: (o on the padded batch, final state)."""
        return self.kernel.forward(self.inputs, initial_state)

    def summary(self) -> StateSummary:
        """The kernel's LASP summary of this call's inputs."""
        return self.kernel.summary(self.inputs)

    def run(
        self, initial_state: Tensor | None, output_final_state: bool
    ) -> tuple[Tensor, Tensor | None]:
        """The op on one process: (o, final_state if asked)."""
        o, final_state = self.forward(initial_state)
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
    summarize: Callable[[ChunkKernel, Inputs], StateSummary],
) -> ChunkCall:
    """Validated inputs -> a ChunkCall: packs varlen input and picks the backend.

    `per_token` are the family's extra inputs, each [B, T, H, ...] or None; `summarize` is
    the family's LASP summary.
    """
    chosen = resolve_backend(backend, q.device)
    layout = PackedLayout.from_cu_seqlens(cu_seqlens) if cu_seqlens is not None else None
    inputs = (q, k, v, *per_token)
    if layout is not None:
        inputs = tuple(None if x is None else layout.pad(x) for x in inputs)
    return ChunkCall(ChunkKernel(family, chosen, scale, summarize), inputs, layout)
