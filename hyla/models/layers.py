"""Small building blocks shared by the mixers and the blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm over each head's output, times SiLU of a gate (GLA / Gated DeltaNet outputs)."""

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x) * F.silu(gate)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def causal_conv(padded: Tensor, weight: Tensor, reach: Tensor | None = None) -> Tensor:
    """Causal depthwise convolution over time, then SiLU: [B, w + n, C] -> [B, n, C] for a
    weight [C, 1, w + 1], the input being n tokens preceded by the w before them (zeros at
    the start of a sequence, the previous inputs when decoding). `reach` [B, n] (document
    masking) limits how many past tokens each output may read: taps further back are
    dropped."""
    c, kernel = padded.shape[2], weight.shape[-1]
    weight = weight.to(padded.dtype)
    if reach is None:
        y = F.conv1d(padded.transpose(1, 2), weight, groups=c).transpose(1, 2)
    else:  # window slot i reads `kernel - 1 - i` tokens back
        back = torch.arange(kernel - 1, -1, -1, device=padded.device)
        taps = (back <= reach[..., None]).to(padded.dtype)  # [B, n, kernel]
        windows = padded.unfold(1, kernel, 1)  # [B, n, C, kernel]
        y = torch.einsum("btck,btk,ck->btc", windows, taps, weight[:, 0])
    return F.silu(y)


class ShortConv(nn.Module):
    """The weight of one `causal_conv` over `channels` channels."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)


def rotary(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate [B, T, H, D] by the angles of token `positions` (pairs (i, i + D/2)): [T], the
    same for every row, or [B, T], each row's own (left-padded rows when decoding)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d // 2, device=x.device, dtype=torch.float32) * 2 / d)
    angles = positions.to(torch.float32)[..., None] * freqs  # [(B,) T, D/2]
    cos, sin = angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)  # broadcast over heads
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
