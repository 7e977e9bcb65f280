"""Sequence parallelism: LASP-2 for linear layers, LASP-2H for softmax attention."""

from hyla.parallel.lasp2 import lasp2_gated_delta_rule, lasp2_gla, lasp2_linear_attn
from hyla.parallel.lasp2h import lasp2h_attention
from hyla.parallel.mesh import ParallelDims

__all__ = [
    "ParallelDims",
    "lasp2_gated_delta_rule",
    "lasp2_gla",
    "lasp2_linear_attn",
    "lasp2h_attention",
]
