"""The chunk size of every chunkwise kernel, PyTorch and Triton alike, and the chunk layout
of the PyTorch paths: [B, T, H, ...] <-> [B, H, N, C, ...]."""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 64  # tokens per chunk


def num_chunks(t: int) -> int:
    return -(-t // CHUNK)


def to_chunks(x: Tensor) -> Tensor:
    """[B, T, H, *rest] in any dtype -> contiguous fp32 [B, H, N, CHUNK, *rest], zero padded
    at the end of T (zero keys, values, betas and log-gates are identity steps). One copy
    here saves the batched matmuls from copying strided operands on every use."""
    b, t, h, *rest = x.shape
    n = num_chunks(t)
    out = x.new_zeros((b, h, n * CHUNK, *rest), dtype=torch.float32)
    out[:, :, :t] = x.transpose(1, 2)
    return out.view(b, h, n, CHUNK, *rest)


def from_chunks(x: Tensor, t: int) -> Tensor:
    """[B, H, N, CHUNK, *rest] -> contiguous [B, T, H, *rest], dropping the padding."""
    return x.flatten(2, 3)[:, :, :t].transpose(1, 2).contiguous()
