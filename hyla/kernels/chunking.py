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


# |log-gate sums| up to which e^x and e^-x are both normal fp32 numbers with a wide margin
# (e^40 ~ 2e17): a decay e^(a - b) may then be formed as e^a * e^-b.
FACTOR_RANGE = 40.0


def factorable(cumulative: Tensor) -> bool:
    """Whether every cumulative log-gate of a block (<= 0) is within FACTOR_RANGE of 0."""
    return bool(cumulative.numel() == 0 or cumulative.min() >= -FACTOR_RANGE)


def decay_matrix(gam: Tensor) -> Tensor:
    """Cumulative log-gates Γ [..., C] -> [..., C, C] with exp(Γ_i - Γ_j) for j <= i, 0 above.

    Mostly the outer product e^Γ e^-Γ masked (no exp over C x C); strong gates, where e^-Γ
    could overflow, take the masked exp of differences, which are <= 0 below the diagonal.
    """
    if factorable(gam):
        return (gam.exp()[..., :, None] * (-gam).exp()[..., None, :]).tril_()
    causal = torch.ones(gam.shape[-1], gam.shape[-1], dtype=torch.bool, device=gam.device).tril()
    diff = gam[..., :, None] - gam[..., None, :]
    return torch.exp(diff.masked_fill_(~causal, float("-inf")))


def state_scan(
    updates: Tensor, decay: Tensor | None, start: Tensor | None, *, reverse: bool = False
) -> tuple[Tensor, Tensor]:
    """Scan S <- decay_n * S + updates_n over the chunks n of updates [B, H, N, K, V].

    decay: None (no decay) or per chunk, broadcastable to updates ([B, H, N, 1, 1] for a
    scalar gate, [B, H, N, K, 1] for a per-key one); start: the state before the first step
    [B, H, K, V], None for zeros. Forward, returns (the state entering each chunk
    [B, H, N, K, V], the state after the last); with `reverse` the scan runs from the last
    chunk down and the first result holds the state each chunk's step received. One op per
    chunk, each writing its result straight into place.
    """
    n = updates.shape[2]
    order = range(n - 1, -1, -1) if reverse else range(n)
    seen = torch.empty_like(updates)
    first = seen[:, :, order[0]]
    if start is None:
        first.zero_()
    else:
        first.copy_(start)
    for step, i in enumerate(order):
        out = None if step == n - 1 else seen[:, :, order[step + 1]]
        if decay is None:
            state = torch.add(seen[:, :, i], updates[:, :, i], out=out)
        else:
            state = torch.addcmul(updates[:, :, i], seen[:, :, i], decay[:, :, i], out=out)
    return seen, state
