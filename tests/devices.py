"""Where the Triton kernels run in tests.

Without a CUDA device, tests/conftest.py turns on Triton's interpreter and the `triton`
backend runs on CPU tensors (fp32: the interpreter's 16-bit dots are not reliable). With a
CUDA device the interpreter stays off, so the CPU-tensor Triton cases skip, and the tests
marked `gpu` (tests/kernels/test_gpu.py) check the compiled kernels instead.
"""

from __future__ import annotations

import pytest

from hyla.kernels.backend import interpreter_on

INTERPRETED = pytest.mark.skipif(
    not interpreter_on(),
    reason="Triton on CPU tensors needs its interpreter, which tests turn on only where "
    "there is no CUDA device (the gpu tests check the compiled kernels there)",
)
TRITON_ON_CPU = pytest.param("triton", marks=INTERPRETED)
BACKENDS = ["torch", TRITON_ON_CPU]  # the backends every CPU kernel test runs
