"""Sequence parallelism: LASP-2 for linear layers and LASP-2H for softmax attention over
contiguous or zigzag layouts, with the LASP-1 ring and Ulysses as baselines. `parallelize`
applies it to a model from outside, with every other training policy (activation
checkpointing, then DDP or FSDP2 on the one mesh)."""

from hyla.parallel.context import SequenceParallel
from hyla.parallel.lasp2h import lasp2h_attention
from hyla.parallel.layout import LAYOUTS, SequenceLayout
from hyla.parallel.mesh import ParallelDims
from hyla.parallel.ops import (
    lasp1_gated_delta_rule,
    lasp1_gla,
    lasp1_linear_attn,
    lasp2_gated_delta_rule,
    lasp2_gla,
    lasp2_linear_attn,
)
from hyla.parallel.parallelize import DATA_PARALLEL, TrainingPolicy, parallelize
from hyla.parallel.support import (
    SP_METHODS,
    ArgumentError,
    check_heads,
    check_method,
    check_model,
    check_supports,
)

__all__ = [
    "DATA_PARALLEL",
    "LAYOUTS",
    "SP_METHODS",
    "ArgumentError",
    "ParallelDims",
    "SequenceLayout",
    "SequenceParallel",
    "TrainingPolicy",
    "check_heads",
    "check_method",
    "check_model",
    "check_supports",
    "lasp1_gated_delta_rule",
    "lasp1_gla",
    "lasp1_linear_attn",
    "lasp2_gated_delta_rule",
    "lasp2_gla",
    "lasp2_linear_attn",
    "lasp2h_attention",
    "parallelize",
]
