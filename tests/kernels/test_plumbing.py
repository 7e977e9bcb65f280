"""The pieces between the public functions and the implementations."""

from __future__ import annotations

import torch

from hyla.kernels.backend import resolve_backend
from hyla.kernels.varlen import PackedLayout
from tests.devices import INTERPRETED


def test_packed_layout_round_trip_with_empty_sequence():
    layout = PackedLayout.from_cu_seqlens(torch.tensor([0, 3, 3, 7]))
    x = torch.arange(7.0).reshape(1, 7, 1)
    padded = layout.pad(x)
    assert padded.shape == (3, 4, 1)
    assert padded[:, :, 0].tolist() == [[0, 1, 2, 0], [0, 0, 0, 0], [3, 4, 5, 6]]
    assert torch.equal(layout.unpad(padded), x)
    assert layout.segment_sum(x)[:, 0].tolist() == [3.0, 0.0, 18.0]


@INTERPRETED
def test_auto_backend_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("HYLA_KERNEL_BACKEND", raising=False)
    assert resolve_backend(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("HYLA_KERNEL_BACKEND", "triton")
    assert resolve_backend(None, torch.device("cpu")) == "triton"  # interpreter is on in tests
    assert resolve_backend("torch", torch.device("cpu")) == "torch"  # the argument wins
