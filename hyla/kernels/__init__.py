"""Chunkwise kernels for linear attention, GLA and the gated delta rule, and their fused
recurrent (token-step, inference-only) forms for decoding.

Layout everywhere: q, k [B, T, H, K], v and o [B, T, H, V], states [B, H, K, V] fp32.
The recurrence every op implements is in docs/design.md.

`prepare_chunk` is the one entry for code built on the ops (sequence parallelism): it
validates an op's arguments exactly as the op does and returns the `ChunkCall` to drive;
its kernel's forward, backward and LASP summary (`hyla.kernels.lasp`) go through the same
custom ops as the public ops. Softmax attention (`flash_attention`) is here too.
"""

from collections.abc import Callable

from torch import Tensor

from hyla.kernels.attention import KEEP_UNDER_CHECKPOINT, flash_attention
from hyla.kernels.autograd import ChunkCall, ChunkKernel
from hyla.kernels.custom_ops import python_implementation
from hyla.kernels.gated_delta_rule import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    gated_delta_rule_transition,
    prepare_gated_delta_rule,
    recurrent_gated_delta_rule,
)
from hyla.kernels.gla import (
    chunk_gla,
    fused_recurrent_gla,
    gla_transition,
    prepare_gla,
    recurrent_gla,
)
from hyla.kernels.lasp import (
    StateSummary,
    apply_transition,
    apply_transition_transposed,
    initial_state_grad,
    output_from,
)
from hyla.kernels.linear_attn import (
    chunk_linear_attn,
    fused_recurrent_linear_attn,
    linear_attn_transition,
    prepare_linear_attn,
    recurrent_linear_attn,
)
from hyla.kernels.varlen import GroupedTokens, Segmentation

CHUNK_OPS: dict[Callable, Callable[..., ChunkCall]] = {
    chunk_linear_attn: prepare_linear_attn,
    chunk_gla: prepare_gla,
    chunk_gated_delta_rule: prepare_gated_delta_rule,
}

# Each chunk op's fused recurrent form: same arguments and results, one token at a time.
FUSED_RECURRENT_OPS: dict[Callable, Callable] = {
    chunk_linear_attn: fused_recurrent_linear_attn,
    chunk_gla: fused_recurrent_gla,
    chunk_gated_delta_rule: fused_recurrent_gated_delta_rule,
}


def prepare_chunk(op: Callable, q: Tensor, k: Tensor, v: Tensor, *gates, **kwargs) -> ChunkCall:
    """Validate a call of the chunk op `op` (chunk_linear_attn, chunk_gla or
    chunk_gated_delta_rule) with its own arguments and keywords (scale, initial_state,
    cu_seqlens, backend): the ChunkCall, ready to run or to drive."""
    if op not in CHUNK_OPS:
        names = [f.__name__ for f in CHUNK_OPS]
        raise ValueError(f"op must be one of hyla.kernels' chunk ops {names}, got {op!r}")
    return CHUNK_OPS[op](q, k, v, *gates, **kwargs)


__all__ = [
    "FUSED_RECURRENT_OPS",
    "KEEP_UNDER_CHECKPOINT",
    "ChunkCall",
    "ChunkKernel",
    "GroupedTokens",
    "Segmentation",
    "StateSummary",
    "apply_transition",
    "apply_transition_transposed",
    "chunk_gated_delta_rule",
    "chunk_gla",
    "chunk_linear_attn",
    "flash_attention",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gla",
    "fused_recurrent_linear_attn",
    "gated_delta_rule_transition",
    "gla_transition",
    "initial_state_grad",
    "linear_attn_transition",
    "output_from",
    "prepare_chunk",
    "python_implementation",
    "recurrent_gated_delta_rule",
    "recurrent_gla",
    "recurrent_linear_attn",
]
