"""What the Triton kernels share: head-dim padding and the precision of their dot products.

The chunk size is `hyla.kernels.chunking.CHUNK`, the one the PyTorch path uses too. Like
the `triton_chunk` modules, the only modules that import this one, it imports triton at
the top: `hyla.kernels.backend` loads them only where triton is installed.

Every kernel spells its compile-time switches the same way: HAS_INITIAL_STATE (an initial
state is given), HAS_GATE (log-gates are given) and DOT_PRECISION (`dot_precision`).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

MIN_DIM = 16  # tl.dot needs every dim >= 16


def pad_dim(dim: int) -> int:
    """A head dim padded to a power of two that tl.dot accepts; masked loads fill the rest."""
    return max(MIN_DIM, triton.next_power_of_2(dim))


def dot_precision(x: Tensor) -> str:
    """tl.dot's input_precision for inputs of x's dtype: exact fp32 products ("ieee") for
    fp32 inputs; 16-bit inputs hold no more mantissa than tf32 keeps, so "tf32" for them."""
    return "ieee" if x.dtype == torch.float32 else "tf32"
