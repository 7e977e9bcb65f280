"""Both chunk implementations of every op against the fp64 recurrence, forward and backward."""

from __future__ import annotations

import pytest
import torch

from hyla.kernels import blocked, spans
from tests.devices import BACKENDS, INTERPRETED
from tests.kernels.cases import (
    CASE_IDS,
    CASES,
    TOLERANCE,
    Case,
    assert_close,
    run_with_grads,
)

H, K, V = 2, 48, 80  # K != V and neither a power of two


def _compare(case: Case, inputs, s0, backend: str, loss_on: str = "both", **kwargs) -> None:
    got = run_with_grads(case.chunk, inputs, s0, torch.float32, loss_on, backend=backend, **kwargs)
    want = run_with_grads(case.recurrent, inputs, s0, torch.float64, loss_on, **kwargs)
    for name, expected in want.items():
        assert_close(f"{case.name}/{backend}/{name}", got[name], expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero-state", "initial-state"])
@pytest.mark.parametrize("seq_len", [1, 63, 64, 65, 200])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_recurrence(case: Case, seq_len: int, with_state: bool, backend: str):
    inputs = case.inputs(2, seq_len, H, K, V, seed=seq_len)
    s0 = torch.randn(2, H, K, V) if with_state else None
    _compare(case, inputs, s0, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_packed_sequences(case: Case, backend: str):
    """Three unequal sequences packed with cu_seqlens, each with its own initial state."""
    cu_seqlens = torch.tensor([0, 37, 101, 200], dtype=torch.int32)
    inputs = case.inputs(1, 200, H, K, V, seed=7)
    _compare(case, inputs, torch.randn(3, H, K, V), backend, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_on", ["o", "state"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_one_output_only(case: Case, loss_on: str, backend: str):
    """Gradients when only the output, or only the final state, reaches the loss."""
    inputs = case.inputs(1, 70, H, K, V, seed=3)
    _compare(case, inputs, torch.randn(1, H, K, V), backend, loss_on)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kd,vd", [(16, 16), (32, 8), (5, 3)])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_other_head_dims(case: Case, kd: int, vd: int, backend: str):
    inputs = case.inputs(1, 65, 3, kd, vd, seed=kd)
    _compare(case, inputs, torch.randn(1, 3, kd, vd), backend, scale=0.3)


SPANNED = [("torch", s, loss) for s in (64, 100) for loss in ("both", "o", "state")]


@pytest.mark.parametrize(
    ("backend", "span", "loss_on"),
    [*SPANNED, pytest.param("triton", 64, "both", marks=INTERPRETED)],
    ids=str,
)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_long_inputs_run_in_spans(
    case: Case, span: int, loss_on: str, backend: str, monkeypatch: pytest.MonkeyPatch
):
    """Inputs longer than SPAN_TOKENS run span by span, the state carried between
    them (at a chunk multiple and off one): still the recurrence, and no call of the
    implementation sees more than a span."""
    monkeypatch.setattr(spans, "SPAN_TOKENS", span)
    longest = 0
    original = spans.Spanned._bounds

    def spy(self, t: int) -> list[tuple[int, int]]:
        nonlocal longest
        bounds = original(self, t)
        longest = max(longest, *(stop - start for start, stop in bounds))
        return bounds

    monkeypatch.setattr(spans.Spanned, "_bounds", spy)
    inputs = case.inputs(2, 200, H, K, V, seed=11)
    _compare(case, inputs, torch.randn(2, H, K, V), backend, loss_on)
    assert longest == span


@pytest.mark.parametrize("block", [1, 6])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_torch_path_in_blocks(case: Case, block: int, monkeypatch: pytest.MonkeyPatch):
    """The PyTorch path runs in blocks of about BLOCK_CHUNK_HEADS chunk x head pairs, the
    state carried between them, with groups of rows or heads on worker threads: blocks of
    one chunk of one head, and uneven ones, give the recurrence too."""
    monkeypatch.setattr(blocked, "BLOCK_CHUNK_HEADS", block)
    for b in (3, 1):
        inputs = case.inputs(b, 200, 3, K, V, seed=5)
        _compare(case, inputs, torch.randn(b, 3, K, V), "torch")


# fp32: tl.dot multiplies fp32 exactly ("ieee"), so the CPU tolerance holds (round-off grows
# with the longer sums, to near 1e-5 of the largest entry). bf16: the inputs are rounded to
# bf16 first, so the reference sees what the kernel sees; the kernels then round tiles
# (decayed keys, chunk states) to bf16 for their dots, 8 bits of mantissa (4e-3 relative)
# each, a few times in a row: 3e-2 of the largest entry.
GPU_DTYPES = {"fp32": (torch.float32, TOLERANCE), "bf16": (torch.bfloat16, 3e-2)}


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_compiled_on_gpu(case: Case, dtype: str, packed: bool):
    """The compiled Triton kernels, forward and backward, at a realistic size (K = V = 64,
    hundreds of tokens, an initial state) on a batch or on packed sequences of 200, 1, 319
    and 180 tokens, against the fp64 recurrence."""
    torch_dtype, tol = GPU_DTYPES[dtype]
    if packed:
        cu_seqlens = torch.tensor([0, 200, 201, 520, 700], dtype=torch.int32, device="cuda")
        b, t, n = 1, 700, 4
    else:
        cu_seqlens, (b, t, n) = None, (2, 700, 2)
    inputs = [
        None if x is None else x.to(torch_dtype).double().cuda()
        for x in case.inputs(b, t, 4, 64, 64)
    ]
    s0 = torch.randn(n, 4, 64, 64, device="cuda")
    got = run_with_grads(
        case.chunk, inputs, s0, torch_dtype, backend="triton", cu_seqlens=cu_seqlens
    )
    want = run_with_grads(case.recurrent, inputs, s0, torch.float64, cu_seqlens=cu_seqlens)
    for name, expected in want.items():
        assert_close(f"{case.name}/{dtype}/{name}", got[name], expected, tol=tol)
