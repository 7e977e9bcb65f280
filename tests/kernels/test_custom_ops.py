"""The kernels as `torch.library` custom ops: schema, fake (meta) implementations, autograd
registration and tracing, checked by PyTorch's own `opcheck` on every op (torch backend),
the backward ops too, on contiguous inputs and on inputs laid out as torch.compile may hand
them over (the time axis innermost, as a transposed view's gradient arrives).

opcheck runs each op eagerly, under fake tensors (the fake implementation must give the
real output's shapes, dtypes and strides), through autograd against the registered
backward, and traced by AOT dispatch as torch.compile does. Every op's outputs are
contiguous whatever its inputs' layout; a fake that followed an input's strides instead
failed inductor's stride assertions in a compiled model's backward.
"""

from __future__ import annotations

import pytest
import torch

from hyla.kernels import FUSED_RECURRENT_OPS, prepare_chunk
from hyla.kernels.attention import attention_backward, attention_forward
from hyla.kernels.autograd import CHUNK_BACKWARD, CHUNK_FORWARD
from tests.kernels.cases import CASE_IDS, CASES, Case

LAYOUTS = ["contiguous", "time-innermost"]


def _laid_out(x: torch.Tensor | None, layout: str) -> torch.Tensor | None:
    """x with the same values, its memory in `layout` ([B, T, ...] with T's stride 1)."""
    if x is None or layout == "contiguous" or x.dim() < 3:
        return x
    order = (0, *range(2, x.dim()), 1)  # T last in memory
    inverse = sorted(range(x.dim()), key=order.__getitem__)
    return x.permute(order).contiguous().permute(inverse)


@pytest.mark.parametrize(
    ("with_state", "layout"),
    [(False, "contiguous"), (True, "contiguous"), (True, "time-innermost")],
    ids=["zero-state", "initial-state", "initial-state-time-innermost"],
)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chunk_ops_pass_opcheck(case: Case, with_state: bool, layout: str):
    """Each forward op as the public function calls it (the inputs prepare_chunk
    validated), and its backward op on the same inputs."""
    inputs = [None if x is None else x.requires_grad_() for x in case.inputs(1, 70, 2, 16, 8)]
    call = prepare_chunk(case.chunk, *inputs, backend="torch")
    s0 = torch.randn(1, 2, 16, 8, requires_grad=True) if with_state else None
    kernel = call.kernel
    laid_out = [_laid_out(x, layout) for x in call.inputs]
    forward = CHUNK_FORWARD[kernel.family]
    torch.library.opcheck(forward, (kernel.backend, kernel.scale, *laid_out, s0))
    plain = [None if x is None else x.detach() for x in laid_out]
    s0 = torch.zeros(1, 2, 16, 8) if s0 is None else s0.detach()
    do = _laid_out(torch.randn(1, 70, 2, 8), layout)
    backward = CHUNK_BACKWARD[kernel.family]
    torch.library.opcheck(
        backward, (kernel.backend, kernel.scale, *plain, s0, do, torch.randn(1, 2, 16, 8))
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("documents", [False, True], ids=["no-docs", "docs"])
def test_attention_ops_pass_opcheck(documents: bool, layout: str):
    gen = torch.Generator().manual_seed(0)
    q = _laid_out(torch.randn(1, 20, 4, 16, generator=gen), layout)
    k, v = (_laid_out(torch.randn(1, 30, 2, 16, generator=gen), layout) for _ in range(2))
    q_doc = k_doc = None
    if documents:
        k_doc = (torch.arange(30) >= 12).int()[None]
        q_doc = k_doc[:, 10:].contiguous()
    mask = (True, 10, 0.25, q_doc, k_doc)
    qkv = [x.requires_grad_() for x in (q, k, v)]
    torch.library.opcheck(attention_forward, ("torch", *qkv, *mask))
    q, k, v = (x.detach() for x in qkv)
    o, lse = attention_forward("torch", q, k, v, *mask)
    do = _laid_out(torch.randn(1, 20, 4, 16, generator=gen), layout)
    torch.library.opcheck(attention_backward, ("torch", q, k, v, o, lse, do, *mask))


@pytest.mark.parametrize("threads", [1, 2], ids=["one-thread", "worker-threads"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_autocast_does_not_reach_inside_the_kernels(case: Case, threads: int):
    """bf16 autocast (how the trainer runs bf16) leaves the kernels' own precision alone:
    the same results as without it, with one torch thread (the blocks run on this thread,
    where autocast is on) and with two (they run on worker threads, where it is not)."""
    inputs = case.inputs(2, 130, 2, 16, 8)
    s0 = torch.randn(2, 2, 16, 8)
    ops = (case.chunk, FUSED_RECURRENT_OPS[case.chunk])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plain = [op(*inputs, initial_state=s0, output_final_state=True) for op in ops]
        with torch.autocast("cpu", torch.bfloat16):
            cast = [op(*inputs, initial_state=s0, output_final_state=True) for op in ops]
    finally:
        torch.set_num_threads(before)
    for (o, state), (o_cast, state_cast) in zip(plain, cast, strict=True):
        assert torch.equal(o, o_cast) and torch.equal(state, state_cast)
