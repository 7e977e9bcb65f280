"""The kernels as `torch.library` custom ops: schema, fake (meta) implementations, autograd
registration and tracing, checked by PyTorch's own `opcheck` on every op (torch backend).

opcheck runs each op eagerly, under fake tensors (the fake implementation must give the
real output's shapes, dtypes and strides), through autograd against the registered
backward, and traced by AOT dispatch as torch.compile does.
"""

from __future__ import annotations

import pytest
import torch

from hyla.kernels import FUSED_RECURRENT_OPS, prepare_chunk
from hyla.kernels.attention import attention_forward
from hyla.kernels.autograd import CHUNK_FORWARD
from tests.kernels.cases import CASE_IDS, CASES, Case


@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_chunk_ops_pass_opcheck(case: Case, with_state: bool):
    """Each op as the public function calls it: the inputs prepare_chunk validated."""
    inputs = [None if x is None else x.requires_grad_() for x in case.inputs(1, 70, 2, 16, 8)]
    call = prepare_chunk(case.chunk, *inputs, backend="torch")
    s0 = torch.randn(1, 2, 16, 8, requires_grad=True) if with_state else None
    kernel = call.kernel
    op = CHUNK_FORWARD[kernel.family]
    torch.library.opcheck(op, (kernel.backend, kernel.scale, *call.inputs, s0))


@pytest.mark.parametrize("documents", [False, True], ids=["no-docs", "docs"])
def test_attention_op_passes_opcheck(documents: bool):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 20, 4, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 30, 2, 16, generator=gen, requires_grad=True) for _ in range(2))
    q_doc = k_doc = None
    if documents:
        k_doc = (torch.arange(30) >= 12).int()[None]
        q_doc = k_doc[:, 10:].contiguous()
    torch.library.opcheck(attention_forward, ("torch", q, k, v, True, 10, 0.25, q_doc, k_doc))


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
