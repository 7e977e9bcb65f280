"""The fused recurrent ops == the fp64 token-by-token reference, on both backends.

They run the reference's own steps in fp32, in the same order (only the Triton kernel sums
its K products in another order), so their round-off is a few fp32 ulps per step: over a
few dozen steps that stays near 1e-6 of the largest reference entry. TOLERANCE = 2e-5
leaves a margin of ten and still catches any wrong gate, beta, scale or state row (O(1)).
"""

from __future__ import annotations

import re

import pytest
import torch

from hyla.kernels import (
    FUSED_RECURRENT_OPS,
    chunk_gated_delta_rule,
    chunk_gla,
    chunk_linear_attn,
)
from tests.devices import BACKENDS
from tests.kernels.cases import CASE_IDS, CASES, Case, assert_close

TOLERANCE = 2e-5
H, K, V = 2, 8, 12
# (name, batch, tokens, cu_seqlens or None, with an initial state)
SETTINGS = [
    ("one-token-from-state", 2, 1, None, True),
    ("dozens-from-zero", 1, 37, None, False),
    ("varlen-with-empty", 1, 12, [0, 5, 5, 12], True),
]
SETTING_IDS = [s[0] for s in SETTINGS]


def _double(xs):
    return [None if x is None else x.double() for x in xs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_equals_reference(case: Case, setting, backend: str):
    _, b, t, offsets, with_state = setting
    inputs = case.inputs(b, t, H, K, V)
    cu_seqlens = None if offsets is None else torch.tensor(offsets)
    n = b if offsets is None else len(offsets) - 1
    s0 = torch.randn(n, H, K, V, generator=torch.Generator().manual_seed(7)) if with_state else None
    fused = FUSED_RECURRENT_OPS[case.chunk]
    o, final = fused(
        *inputs, initial_state=s0, output_final_state=True, cu_seqlens=cu_seqlens, backend=backend
    )
    ref_o, ref_final = case.recurrent(
        *_double(inputs),
        initial_state=None if s0 is None else s0.double(),
        output_final_state=True,
        cu_seqlens=cu_seqlens,
    )
    assert o.dtype == torch.float32 and final.dtype == torch.float32
    assert_close(f"{case.name} o", o, ref_o, TOLERANCE)
    assert_close(f"{case.name} final state", final, ref_final, TOLERANCE)
    if offsets is not None and s0 is not None:  # the empty sequence keeps its state exactly
        assert torch.equal(final[1], s0[1])


# bf16: the inputs are rounded to bf16 first, so the reference sees what the kernel sees;
# the kernel accumulates in fp32 and rounds only o to bf16 (8 bits of mantissa): 1e-2.
GPU_DTYPES = {"fp32": (torch.float32, TOLERANCE), "bf16": (torch.bfloat16, 1e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_on_gpu(case: Case, setting, dtype: str):
    """The compiled Triton kernel at a model's head size (K = V = 64, V in two blocks)."""
    _, b, t, offsets, with_state = setting
    torch_dtype, tol = GPU_DTYPES[dtype]
    inputs = [
        None if x is None else x.to(torch_dtype).double().cuda()
        for x in case.inputs(b, t, 4, 64, 64)
    ]
    cu_seqlens = None if offsets is None else torch.tensor(offsets, device="cuda")
    n = b if offsets is None else len(offsets) - 1
    s0 = torch.randn(n, 4, 64, 64, device="cuda") if with_state else None
    fused = FUSED_RECURRENT_OPS[case.chunk]
    q, k, v, *gates = inputs
    lowered = [x.to(torch_dtype) for x in (q, k, v)] + [
        None if g is None else g.float() for g in gates
    ]
    o, final = fused(*lowered, initial_state=s0, output_final_state=True,
                     cu_seqlens=cu_seqlens, backend="triton")  # fmt: skip
    ref_o, ref_final = case.recurrent(
        *inputs,
        initial_state=None if s0 is None else s0.double(),
        output_final_state=True,
        cu_seqlens=cu_seqlens,
    )
    assert_close(f"{case.name}/{dtype} o", o, ref_o, tol)
    assert_close(f"{case.name}/{dtype} final state", final, ref_final, tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_inputs(backend: str):
    """bf16 q, k, v: o comes back in bf16, the state in fp32, close to the fp32 result."""
    case = CASES[CASE_IDS.index("gdn-weak")]
    q, k, v, beta, g = case.inputs(1, 5, H, K, V)
    fused = FUSED_RECURRENT_OPS[case.chunk]
    o, final = fused(q, k, v, beta, g, output_final_state=True, backend=backend)
    low = [x.bfloat16() for x in (q, k, v)]
    o16, final16 = fused(*low, beta, g, output_final_state=True, backend=backend)
    assert o16.dtype == torch.bfloat16 and final16.dtype == torch.float32
    assert_close("bf16 o", o16, o, 2e-2)  # bf16 keeps 8 bits of mantissa: 4e-3 per input
    assert_close("bf16 final state", final16, final, 2e-2)
    assert fused(q, k, v, beta, g, backend=backend)[1] is None  # output_final_state=False


def _bad_calls():
    q, k, v = torch.randn(1, 6, H, K), torch.randn(1, 6, H, K), torch.randn(1, 6, H, V)
    gk, beta = -torch.rand(q.shape), torch.rand(q.shape[:3])
    return [
        (chunk_linear_attn, (q, k[..., :5], v), {}),
        (chunk_linear_attn, (q, k, v, torch.ones(H)), {}),
        (chunk_gla, (q, k, v, -gk), {}),
        (chunk_gla, (q, k, v, gk), {"cu_seqlens": torch.tensor([0, 4, 3, 6])}),
        (chunk_gated_delta_rule, (q, k, v, beta), {"initial_state": torch.zeros(2, H, K, V)}),
        (chunk_gated_delta_rule, (q, k, v, beta[..., :1]), {"backend": "cuda"}),
    ]


@pytest.mark.parametrize("call", range(len(_bad_calls())))
def test_bad_input_gets_the_chunk_ops_error(call: int):
    op, args, kwargs = _bad_calls()[call]
    with pytest.raises(ValueError) as expected:
        op(*args, **kwargs)
    with pytest.raises(ValueError, match=re.escape(str(expected.value))):
        FUSED_RECURRENT_OPS[op](*args, **kwargs)


def test_inference_only():
    """A gradient cannot flow through a fused op: it says so, and works without grad."""
    case = CASES[CASE_IDS.index("gla-weak")]
    q, k, v, gk = case.inputs(1, 3, H, K, V)
    fused = FUSED_RECURRENT_OPS[chunk_gla]
    assert fused.__name__ == "fused_recurrent_gla"
    with pytest.raises(ValueError, match=r"fused_recurrent_gla is inference-only.*chunk_gla"):
        fused(q.requires_grad_(), k, v, gk)
    with torch.no_grad():
        o, _ = fused(q, k, v, gk)
    assert_close("no-grad o", o, case.recurrent(q.detach(), k, v, gk)[0], TOLERANCE)
