"""Chunkwise kernels for linear attention, GLA and the gated delta rule.

Layout everywhere: q, k [B, T, H, K], v and o [B, T, H, V], states [B, H, K, V] fp32.
See shared/design/ALGORITHMS.md for the recurrence every op implements.
"""

from hyla.kernels.gated_delta_rule import (
    chunk_gated_delta_rule,
    gated_delta_rule_transition,
    recurrent_gated_delta_rule,
)
from hyla.kernels.gla import chunk_gla, gla_transition, recurrent_gla
from hyla.kernels.linear_attn import (
    chunk_linear_attn,
    linear_attn_transition,
    recurrent_linear_attn,
)

__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gla",
    "chunk_linear_attn",
    "gated_delta_rule_transition",
    "gla_transition",
    "linear_attn_transition",
    "recurrent_gated_delta_rule",
    "recurrent_gla",
    "recurrent_linear_attn",
]
