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
        self,
        x: Tensor,
        seq: SequenceContext | None,
        state: LayerState | None = None,
        valid: Tensor | None = None,
    ) -> tuple[Tensor, None]:
        """Rotary positions are the tokens' positions in their row (with document masking
        too: scores depend only on position differences, equal within a document). When
        decoding (`state`), keys and values are appended to its KV cache and the new
        queries sit after the cached positions. With left padding (`valid`), a row's
        positions count its tokens only, and no token sees a padded key."""
        if state is None:
            assert seq is not None  # HybridLM gives a context whenever it gives no state
            positions, docs = seq.positions, None
        else:
            positions, docs = decoding_positions(state, x, valid)
        q = rotary(heads(self.q_proj(x), self.n_heads), positions, self.theta)
        k = rotary(heads(self.k_proj(x), self.kv_heads), positions, self.theta)
        v = heads(self.v_proj(x), self.kv_heads)
        if state is None:
            assert seq is not None
            o = seq.attention(q, k, v)
        else:
            offset = cached_length(state)
            if "k" in state:
                k, v = torch.cat([state["k"], k], 1), torch.cat([state["v"], v], 1)
            state["k"], state["v"] = k, v
            q_doc, k_doc = (None, None) if docs is None else (docs[:, offset:], docs)
            o = flash_attention(q, k, v, causal=True, q_offset=offset, q_doc=q_doc, k_doc=k_doc)
        return self.o_proj(o.flatten(-2)), None


def decoding_positions(
    state: LayerState, x: Tensor, valid: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """The rotary positions of a decoding step's tokens x [B, T, d], and the document ids of
    the cached and new keys that keep padding out of attention (None without padding).

    Without padding so far, positions continue the cache's: [T]. Once a row has had padding,
    state["pads"] [B] counts its padded tokens, all before its first token (the decoding
    state refuses any other padding), so its tokens' positions [B, T] are their indices less
    that count, and the ids are 1 at tokens, 0 at padding: a token sees tokens only, a
    padded query padding only (so never nothing)."""
    offset = cached_length(state)
    index = torch.arange(offset, offset + x.shape[1], device=x.device)
    if valid is None and "pads" not in state:
        return index, None
    pads = state.get("pads", torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
    if valid is not None:
        pads = pads + (~valid).sum(1)
    state["pads"] = pads
    docs = (torch.arange(offset + x.shape[1], device=x.device) >= pads[:, None]).long()
    return (index - pads[:, None]).clamp_min(0), docs


def cached_length(state: LayerState) -> int:
    """Keys in a decoding state's cache (padding included)."""
    return state["k"].shape[1] if "k" in state else 0
