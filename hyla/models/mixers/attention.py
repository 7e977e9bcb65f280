"""Softmax attention ("A"): GQA with rotary positions on the tiled flash-attention kernel."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hyla.kernels import flash_attention
from hyla.models.config import ModelConfig
from hyla.models.layers import rotary
from hyla.models.mixers.common import LayerState, heads
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

    def forward(
        self, x: Tensor, seq: SequenceContext | None, state: LayerState | None = None
    ) -> tuple[Tensor, None]:
        """Rotary positions are the tokens' positions in their row (with document masking
        too: scores depend only on position differences, equal within a document). When
        decoding (`state`), keys and values are appended to its KV cache and the new
        queries sit after the cached positions."""
        if state is None:
            assert seq is not None  # HybridLM gives a context whenever it gives no state
            positions = seq.positions
        else:
            offset = state["k"].shape[1] if "k" in state else 0
            positions = torch.arange(offset, offset + x.shape[1], device=x.device)
        q = rotary(heads(self.q_proj(x), self.n_heads), positions, self.theta)
        k = rotary(heads(self.k_proj(x), self.kv_heads), positions, self.theta)
        v = heads(self.v_proj(x), self.kv_heads)
        if state is None:
            assert seq is not None
            o = seq.attention(q, k, v)
        else:
            if "k" in state:
                k, v = torch.cat([state["k"], k], 1), torch.cat([state["v"], v], 1)
            state["k"], state["v"] = k, v
            o = flash_attention(q, k, v, causal=True, q_offset=int(positions[0]))
        return self.o_proj(o.flatten(-2)), None
