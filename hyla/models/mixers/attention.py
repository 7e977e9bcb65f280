"""Softmax attention ("A"): GQA with rotary positions on the tiled flash-attention kernel."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hyla.kernels.attention import flash_attention
from hyla.models.config import ModelConfig
from hyla.models.documents import Documents
from hyla.models.layers import rotary
from hyla.models.mixers.common import LayerState, heads, run_ulysses
from hyla.parallel.context import SequenceParallel
from hyla.parallel.lasp2h import lasp2h_attention


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
        state: LayerState | None = None,
        sp: SequenceParallel | None = None,
        docs: Documents | None = None,
    ) -> tuple[Tensor, None]:
        """With `state`, keys and values are appended to its KV cache and the new queries sit
        after the cached positions. Under sequence parallelism (LASP-2H) the shard's rotary
        positions are global and K/V of all shards are gathered. With `docs` a query sees
        only keys of its own document; rotary positions stay row positions."""
        t = x.shape[1]
        if sp is not None:
            offset = sp.start
        else:
            offset = 0 if state is None or "k" not in state else state["k"].shape[1]
        positions = torch.arange(offset, offset + t, device=x.device)
        q = rotary(heads(self.q_proj(x), self.n_heads), positions, self.theta)
        k = rotary(heads(self.k_proj(x), self.kv_heads), positions, self.theta)
        v = heads(self.v_proj(x), self.kv_heads)
        if state is not None:
            if "k" in state:
                k, v = torch.cat([state["k"], k], 1), torch.cat([state["v"], v], 1)
            state["k"], state["v"] = k, v
        if sp is not None and sp.method == "ulysses":
            if docs is not None:
                raise ValueError("parallel.sp_method='ulysses' does not support doc_start")
            o = run_ulysses(lambda *whole: flash_attention(*whole, causal=True), (q, k, v), sp)
        elif sp is not None:  # LASP-2H, also under the LASP-1 baseline (it has no attention)
            o = lasp2h_attention(
                q,
                k,
                v,
                group=sp.group,
                shard_lengths=list(sp.shard_lengths),
                doc_start=None if docs is None else docs.start,
            )
        else:
            doc = None if docs is None else docs.local_doc
            o = flash_attention(q, k, v, causal=True, q_offset=offset, q_doc=doc, k_doc=doc)
        return self.o_proj(o.flatten(-2)), None
