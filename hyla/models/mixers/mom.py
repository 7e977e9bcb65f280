"""Mixture-of-Memories ("M"): M gated-delta-rule memories, top-k routed (Du et al., 2025).

Queries are shared. Each memory has its own key, value, beta and gate projections and one
recurrent state that runs over only the tokens routed to it, in order. All memories (and
the always-on shared memory) run in ONE kernel call: their token subsequences are packed
with cu_seqlens in (memory, batch row) order, so memory m of row b is packed sequence
m * B + b, and so is its row in the recurrent state. The sequence context cuts them further
where it must (document starts: memories restart with every document).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hyla.kernels import GroupedTokens, chunk_gated_delta_rule
from hyla.models.config import ModelConfig
from hyla.models.layers import GatedRMSNorm
from hyla.models.mixers.common import heads, l2norm
from hyla.models.mixers.deltanet import DeltaGates
from hyla.models.sequence import SequenceContext


class Memory(nn.Module):
    """One memory's projections: keys, values, beta and log-decay for its routed tokens."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.gates = DeltaGates(d_model, n_heads)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        k = l2norm(heads(F.silu(self.k_proj(x)), self.n_heads))
        v = heads(F.silu(self.v_proj(x)), self.n_heads)
        return (k, v, *self.gates(x))


class Routing:
    """Top-k routing of [B, T] tokens over memories, with the shared memory appended last."""

    def __init__(self, logits: Tensor, top_k: int, shared: bool) -> None:
        self.probs = logits.float().softmax(-1)  # [B, T, M]
        top_p, top_i = self.probs.topk(top_k, dim=-1)
        top_w = top_p / top_p.sum(-1, keepdim=True)
        self.top_k = top_k
        self.selected = torch.zeros_like(self.probs, dtype=torch.bool).scatter(-1, top_i, True)
        weights = torch.zeros_like(self.probs).scatter(-1, top_i, top_w)
        routed = self.selected
        if shared:
            ones = torch.ones_like(self.probs[..., :1])
            routed, weights = torch.cat([routed, ones.bool()], -1), torch.cat([weights, ones], -1)
        self.weights = weights  # [B, T, M(+1)]: renormalised top-k weights, 1 for shared
        # Token coordinates in (memory, batch row, time) order: each packed sequence in turn.
        m_idx, b_idx, t_idx = routed.permute(2, 0, 1).nonzero(as_tuple=True)
        self.tokens = GroupedTokens(routed.shape[-1], routed.shape[0], m_idx, b_idx, t_idx)
        self.counts_per_memory = routed.sum((0, 1)).tolist()

    def aux_loss(self, total: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Switch-style balance: M * sum_m (share of assignments to m) * (mean prob of m);
        1 at perfect balance.

        `total` sums the assignment counts and the token count over the whole sequence
        first (a sequence context's `total`), so that a part of the sequence gets its exact
        part of the loss: the parts sum to the whole sequence's loss, and so do their
        gradients."""
        n_mem = self.probs.shape[-1]
        counts = self.selected.float().sum((0, 1))
        n_tokens = counts.new_tensor([self.probs.shape[0] * self.probs.shape[1]])
        if total is not None:
            counts, n_tokens = total(torch.cat([counts, n_tokens])).split([n_mem, 1])
        share = counts / (n_tokens * self.top_k)
        return n_mem * (share * self.probs.sum((0, 1)) / n_tokens).sum()


class MixtureOfMemories(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, self.n_heads = cfg.d_model, cfg.n_heads
        self.top_k, self.aux_weight = cfg.mom_top_k, cfg.mom_aux_weight
        self.router = nn.Linear(d, cfg.mom_memories, bias=False)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.memories = nn.ModuleList(Memory(d, cfg.n_heads) for _ in range(cfg.mom_memories))
        self.shared = Memory(d, cfg.n_heads) if cfg.mom_shared_memory else None
        self.g_proj = nn.Linear(d, d, bias=False)
        self.norm = GatedRMSNorm(cfg.head_dim, cfg.norm_eps)
        self.o_proj = nn.Linear(d, d, bias=False)

    def route(self, x: Tensor) -> Routing:
        return Routing(self.router(x), self.top_k, self.shared is not None)

    def forward(self, x: Tensor, seq: SequenceContext) -> tuple[Tensor, Tensor]:
        b, t, _ = x.shape
        routing = self.route(x)
        q = l2norm(heads(F.silu(self.q_proj(x)), self.n_heads))
        memories = [*self.memories, *([self.shared] if self.shared is not None else [])]
        tokens = routing.tokens
        rows = x[tokens.row, tokens.time]
        parts = zip(
            *(
                mem(mine)
                for mem, mine in zip(memories, rows.split(routing.counts_per_memory), strict=True)
            ),
            strict=True,
        )
        k, v, beta, g = (torch.cat(p)[None] for p in parts)
        q_routed = q[tokens.row, tokens.time][None]
        o = seq.grouped_recurrence(chunk_gated_delta_rule, tokens, q_routed, k, v, beta, g)[0]
        w = routing.weights[tokens.row, tokens.time, tokens.group]
        mixed = o.new_zeros(b, t, *o.shape[1:]).index_put(
            (tokens.row, tokens.time), o * w[:, None, None].to(o.dtype), accumulate=True
        )
        out = self.o_proj(self.norm(mixed, heads(self.g_proj(x), self.n_heads)).flatten(-2))
        return out, self.aux_weight * routing.aux_loss(seq.total)
