"""Both chunk implementations of every op against the fp64 recurrence, forward and backward."""

from __future__ import annotations

import pytest
import torch

from hyla.kernels import blocked, segments
from tests.kernels.cases import CASE_IDS, CASES, Case, assert_close, run_with_grads

BACKENDS = ["torch", "triton"]
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


SEGMENTED = [("torch", s, loss) for s in (64, 100) for loss in ("both", "o", "state")]


@pytest.mark.parametrize(
    ("backend", "segment", "loss_on"), [*SEGMENTED, ("triton", 64, "both")], ids=str
)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_long_inputs_run_in_segments(
    case: Case, segment: int, loss_on: str, backend: str, monkeypatch: pytest.MonkeyPatch
):
    """Inputs longer than SEGMENT_TOKENS run segment by segment, the state carried between
    them (at a chunk multiple and off one): still the recurrence, and no call of the
    implementation sees more than a segment."""
    monkeypatch.setattr(segments, "SEGMENT_TOKENS", segment)
    longest = 0
    original = segments.Segmented._bounds

    def spy(self, t: int) -> list[tuple[int, int]]:
        nonlocal longest
        bounds = original(self, t)
        longest = max(longest, *(stop - start for start, stop in bounds))
        return bounds

    monkeypatch.setattr(segments.Segmented, "_bounds", spy)
    inputs = case.inputs(2, 200, H, K, V, seed=11)
    _compare(case, inputs, torch.randn(2, H, K, V), backend, loss_on)
    assert longest == segment


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels are checked on a GPU only")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bf16_on_gpu(case: Case):
    """bf16 inputs through the compiled Triton kernels; bf16 keeps 8 bits of mantissa, so
    the outputs and gradients are compared against fp64 at 3e-2 of the largest entry."""
    # Round the inputs to bf16 first so that the reference sees exactly what the kernel sees.
    inputs = [
        None if x is None else x.bfloat16().double().cuda() for x in case.inputs(2, 1000, 4, 64, 64)
    ]
    s0 = torch.randn(2, 4, 64, 64, device="cuda")
    bf16 = run_with_grads(case.chunk, inputs, s0, torch.bfloat16, backend="triton")
    ref = run_with_grads(case.recurrent, inputs, s0, torch.float64)
    for name, expected in ref.items():
        assert_close(f"{case.name}/bf16/{name}", bf16[name], expected, tol=3e-2)
