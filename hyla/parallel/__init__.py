"""Sequence parallelism: LASP-2 for linear layers, LASP-2H for softmax attention, and the
LASP-1 ring and Ulysses baselines."""

from hyla.parallel.lasp2h import lasp2h_attention
from hyla.parallel.mesh import ParallelDims
from hyla.parallel.ops import (
    lasp1_gated_delta_rule,
    lasp1_gla,
    lasp1_linear_attn,
    lasp2_gated_delta_rule,
    lasp2_gla,
    lasp2_linear_attn,
)

__all__ = [
    "ParallelDims",
    "lasp1_gated_delta_rule",
    "lasp1_gla",
    "lasp1_linear_attn",
    "lasp2_gated_delta_rule",
    "lasp2_gla",
    "lasp2_linear_attn",
    "lasp2h_attention",
]
