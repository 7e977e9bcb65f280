"""Softmax attention ("A"): GQA with rotary positions on the tiled flash-attention kernel."""

from __future__ import annotations

from torch import Tensor, nn

from hyla.models.config import ModelConfig
from hyla.models.layers import rotary
from hyla.models.mixers.common import heads
from hyla.models.sequence import SequenceContext


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.n_heads, self.kv_heads = cfg.d_model, cfg.n_heads, cfg.kv_heads
        self.theta = cfg.rope_theta
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(d, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, seq: SequenceContext) -> tuple[Tensor, None]:
        """Rotary positions are the tokens' positions in their row (with document masking
        too: scores depend only on position differences, equal within a document; when
        decoding left-padded rows, a row's positions count its tokens only)."""
        q = rotary(heads(self.q_proj(x), self.n_heads), seq.positions, self.theta)
        k = rotary(heads(self.k_proj(x), self.kv_heads), seq.positions, self.theta)
        v = heads(self.v_proj(x), self.kv_heads)
        return self.o_proj(seq.attention(q, k, v).flatten(-2)), None
