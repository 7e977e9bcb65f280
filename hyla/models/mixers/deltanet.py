"""Gated DeltaNet ("D"): the gated delta rule with short convolutions (Yang et al., 2024)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyla.kernels import chunk_gated_delta_rule
from hyla.models.config import ModelConfig
from hyla.models.layers import GatedRMSNorm, ShortConv, causal_conv
from hyla.models.mixers.common import heads, l2norm
from hyla.models.sequence import SequenceContext


class DeltaGates(nn.Module):
    """Per-head write strength beta = sigmoid(W_b x) and log-decay
    g = -exp(A_log) * softplus(W_a x + dt_bias) (Mamba2's parametrisation)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.b_proj = nn.Linear(d_model, n_heads, bias=False)
        self.a_proj = nn.Linear(d_model, n_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.A_log.copy_(torch.log(torch.empty_like(self.A_log).uniform_(1, 16)))
            # dt log-uniform in [1e-3, 1e-1]; dt_bias is its inverse softplus.
            dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        beta = torch.sigmoid(self.b_proj(x).float())
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        return beta, g


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.n_heads = cfg.d_model, cfg.n_heads
        self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.o_proj = (
            nn.Linear(d, d, bias=False) for _ in range(5)
        )
        self.q_conv, self.k_conv, self.v_conv = (ShortConv(d, cfg.conv_size) for _ in range(3))
        self.gates = DeltaGates(d, cfg.n_heads)
        self.norm = GatedRMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: Tensor, seq: SequenceContext) -> tuple[Tensor, None]:
        h, width = self.n_heads, self.q_conv.kernel_size - 1
        projected = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        # the three depthwise convolutions as one, over the concatenated channels
        weight = torch.cat([c.weight for c in (self.q_conv, self.k_conv, self.v_conv)])

        def convolve(padded: Tensor, reach: Tensor | None) -> Tensor:
            return causal_conv(padded, weight, reach)

        mixed = seq.causal(convolve, projected, width)
        q, k, v = (heads(y, h) for y in mixed.chunk(3, dim=-1))
        q, k = l2norm(q), l2norm(k)
        beta, g = self.gates(x)
        o = seq.recurrence(chunk_gated_delta_rule, q, k, v, beta, g)
        o = self.norm(o, heads(self.g_proj(x), h))
        return self.o_proj(o.flatten(-2)), None
