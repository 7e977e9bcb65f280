import os

import pytest
import torch

# Without a CUDA device, Triton's interpreter runs the Triton kernels on CPU tensors. Triton
# reads the variable when a kernel is decorated, so it is set before any Triton module is
# imported (torch does not import triton); importing triton right after also fixes the mode
# of Triton's own library functions (tl.sum and friends are jit functions) no matter what a
# test does to the variable later. With a CUDA device the kernels compile: see tests/devices.py.
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402, F401


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked gpu check compiled kernels: they skip where there is no CUDA device."""
    if CUDA:
        return
    skip = pytest.mark.skip(reason="compiled Triton kernels need a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
