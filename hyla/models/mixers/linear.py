"""Linear attention ("L") and gated linear attention ("G")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyla.kernels import chunk_gla, chunk_linear_attn
from hyla.models.config import ModelConfig
from hyla.models.layers import GatedRMSNorm, RMSNorm
from hyla.models.mixers.common import heads
from hyla.models.sequence import SequenceContext

GATE_TEMPERATURE = 16.0  # log-gates = logsigmoid(.) / 16 keeps decays slow at init (GLA paper)


class LinearAttention(nn.Module):
    """o = SiLU(q) sums of SiLU(k) v^T, with no decay, a fixed per-head decay
    (retention: gamma_h = 1 - 2^(-5-h)) or a per-token scalar gate; RMSNorm per head."""

    log_decay: Tensor  # [H], a buffer with the constant decay

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.n_heads, self.decay = cfg.d_model, cfg.n_heads, cfg.linear_decay
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(d, d, bias=False) for _ in range(4)
        )
        self.norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        if self.decay == "constant":
            rates = 2.0 ** (-5.0 - torch.arange(self.n_heads, dtype=torch.float32))
            self.register_buffer("log_decay", torch.log1p(-rates), persistent=False)
        if self.decay == "scalar_gate":
            self.gate_proj = nn.Linear(d, self.n_heads, bias=True)

    def forward(self, x: Tensor, seq: SequenceContext) -> tuple[Tensor, None]:
        h = self.n_heads
        q, k = F.silu(heads(self.q_proj(x), h)), F.silu(heads(self.k_proj(x), h))
        v = heads(self.v_proj(x), h)
        g = None
        if self.decay == "constant":
            g = self.log_decay
        elif self.decay == "scalar_gate":
            g = F.logsigmoid(self.gate_proj(x).float()) / GATE_TEMPERATURE
        o = seq.recurrence(chunk_linear_attn, q, k, v, g)
        return self.o_proj(self.norm(o).flatten(-2)), None


class GLA(nn.Module):
    """Gated linear attention: per-key-channel gates from a low-rank projection, and a
    SiLU output gate after a per-head RMSNorm (Yang et al., 2023)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.n_heads = cfg.d_model, cfg.n_heads
        key_width = cfg.gla_key_dim * cfg.n_heads
        self.q_proj = nn.Linear(d, key_width, bias=False)
        self.k_proj = nn.Linear(d, key_width, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(d, cfg.gla_gate_rank, bias=False), nn.Linear(cfg.gla_gate_rank, key_width)
        )
        self.g_proj = nn.Linear(d, d, bias=False)
        self.norm = GatedRMSNorm(cfg.head_dim, cfg.norm_eps)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, seq: SequenceContext) -> tuple[Tensor, None]:
        h = self.n_heads
        q, k, v = (heads(p(x), h) for p in (self.q_proj, self.k_proj, self.v_proj))
        gk = F.logsigmoid(heads(self.gk_proj(x), h).float()) / GATE_TEMPERATURE
        o = seq.recurrence(chunk_gla, q, k, v, gk)
        o = self.norm(o, heads(self.g_proj(x), h))
        return self.o_proj(o.flatten(-2)), None
