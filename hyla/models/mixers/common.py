"""Helpers the mixers share, and what a decoding step runs around a recurrence's kernel call
(`hyla.models.decoding.DecodingContext` calls them): the layer's state, the op for the
step's length, and padded tokens kept out of the state."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from hyla.kernels import FUSED_RECURRENT_OPS, GroupedTokens
from hyla.kernels.chunking import CHUNK

# A layer's decoding state: whatever the mixer needs to continue a sequence (recurrent
# state, convolution history, KV cache). An empty dict means "start of the sequence".
LayerState = dict[str, Tensor]

# The longest decoding input, in tokens per sequence, that takes the fused recurrent op, by
# device type; longer ones take the chunk op. A chunk op pads to whole CHUNK-token chunks, so
# for a few tokens it does a full chunk's work, while the token loop's cost grows with T.
# CPU (PyTorch): measured (`benchmarks/decode.py --sweep`, docs/results.md), the token loop
# wins up to about 16 tokens, its per-token op overhead losing beyond. CUDA (Triton): one
# launch for every token, as flash-linear-attention's layers do up to 64 tokens; not yet
# measured here. benchmarks/decode.py sets them to 0 to measure the chunk path.
FUSED_MAX_TOKENS = {"cpu": 16, "cuda": CHUNK}


def decode_op(op: Callable, steps: int, q: Tensor, *inputs: Tensor | None) -> Callable:
    """The op a decoding step of `steps` tokens per sequence runs: the chunk op `op`, or its
    fused recurrent form for short inputs, unless a gradient must flow (it has no backward)."""
    limit = FUSED_MAX_TOKENS.get(q.device.type, FUSED_MAX_TOKENS["cpu"])
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, *inputs))
    return op if grad or steps > limit else FUSED_RECURRENT_OPS[op]


def tokens_per_row(tokens: GroupedTokens) -> int:
    """The most tokens any packed sequence of grouped tokens can hold: the rows' length."""
    return int(tokens.time.max()) + 1 if tokens.time.numel() else 0


def skip_padding(x: Tensor, valid: Tensor) -> Tensor:
    """A recurrence's key or gate input (k, a log-decay, beta) with every padded token's entry
    zeroed: a zero key writes nothing, a zero log-decay keeps the state undecayed, a zero beta
    corrects nothing, so a padded token passes the state through unchanged in every family.
    valid [B, T] bool; a constant per-head log-decay [H] becomes per-token [B, T, H]."""
    if x.dim() == 1:
        x = x.expand(*valid.shape, -1)
    return x.masked_fill(~valid.view(*valid.shape, *[1] * (x.dim() - 2)), 0)


def heads(x: Tensor, n_heads: int) -> Tensor:
    """[B, T, H * D] -> [B, T, H, D]."""
    return x.unflatten(-1, (n_heads, -1))


def l2norm(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1).to(x.dtype)
